# Default release policy (fail closed: a missing input field denies): a node gets secrets only on an affirming verdict whose claims match
# the provisioned reference values. Every violated rule adds a reason; allow means none did.
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
