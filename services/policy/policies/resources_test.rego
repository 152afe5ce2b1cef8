package attestmesh.resource_test

import rego.v1

test_own_repository if {
	data.attestmesh.resource.may_read("node-1", "node-1")
}

test_shared if {
	data.attestmesh.resource.may_read("node-1", "default")
}

test_another_nodes if {
	not data.attestmesh.resource.may_read("node-1", "node-2")
}

test_malformed if {
	not data.attestmesh.resource.may_read("", "")
	not data.attestmesh.resource.may_read(7, 7)
}

test_nothing_without_a_request if {
	not data.attestmesh.resource.allow
	not data.attestmesh.resource.decision.allow
}
