# Default release policy (fail closed: a missing input field denies): a node gets secrets only on
# an affirming verdict whose claims match the family's provisioned reference values. Every violated rule adds a reason; allow means none did.
package attestmesh.release

import rego.v1

default allow := false

acceptable contains "affirming"

acceptable contains "warning" if data.settings.allow_warning == true

refs := data.refvalues[input.family]

status_text := input.status if {
	is_string(input.status)
} else := "missing"

deny contains sprintf("verdict status %s is not acceptable", [status_text]) if {
	not input.status in acceptable
}

deny contains "evidence signatures did not verify" if {
	not input.verified == true
}

# A family with no signed reference values document is denied, never waved through: a purged
# or deleted document must not read as "anything goes". An operator who wants a family released
# on status alone signs an explicit empty document ({}) for it.
deny contains "no reference values are provisioned for this family" if {
	not data.refvalues[input.family]
}

deny contains sprintf("claim %s is not among the reference values", [name]) if {
	some name, allowed in refs
	is_array(allowed)
	count(allowed) > 0
	not input.claims[name] in allowed
}

allow_simulated if data.settings.allow_simulated == true

deny contains "simulated evidence is not accepted" if {
	not input.simulated == false
	not allow_simulated
}

allow if count(deny) == 0

decision := {"allow": allow, "reasons": sort([r | some r in deny])}
