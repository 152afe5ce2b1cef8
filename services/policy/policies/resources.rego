# Default resource policy. The broker asks it, for every secret request of a node holding an
# allow decision, whether that node may have that resource: a node may read the shared
# `default` repository and the repository named after itself, nothing else. Resources are
# named <repository>/<type>/<tag> (the key broker's form); the broker splits the name.
# Fail closed: an absent, empty or non-string node or repository matches nothing.
#
# The rule is a function so that tests can call it directly: regopy crashes when a test's
# `with` replaces the request for a rule that calls a builtin.
package attestmesh.resource

import rego.v1

default allow := false

allow if may_read(input.node, input.resource.repository)

may_read(_, repository) if repository == "default"

may_read(node, repository) if {
	is_string(node)
	node != ""
	repository == node
}

decision := {"allow": true, "reasons": []} if {
	allow
} else := {"allow": false, "reasons": ["the resource is neither shared (default) nor the node's own"]}
