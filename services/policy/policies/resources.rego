# Default resource policy. The broker asks it, for every secret request of a node holding an
# allow decision, whether that node may have that resource. A node may read the shared
# `default` repository and the repository named after itself; nothing else. Resources are
# named <repository>/<type>/<tag> (the key broker's form); the broker splits the name.
# Fail closed: an absent, empty or non-string node or repository matches nothing.
package attestmesh.resource

import rego.v1

default allow := false

node := input.node if {
	is_string(input.node)
	input.node != ""
}

repository := input.resource.repository if {
	is_string(input.resource.repository)
	input.resource.repository != ""
}

allow if repository == "default"

allow if repository == node

decision := {"allow": true, "reasons": []} if {
	allow
} else := {"allow": false, "reasons": ["the resource is neither shared (default) nor the node's own"]}
