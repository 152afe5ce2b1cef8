# Default release policy (fail closed: a missing field denies): a node gets secrets only on an
# affirming verdict whose claims match the family's provisioned reference values. Every violated
# rule adds a reason; allow means none did.
#
# The policy service hands a policy only the fields it names, and only the claims it names
# (services/policy/appraisal_input.py); input.refclaims holds the claims the family's reference
# values name. Reference values are read from data.refindex (the same values as
# data.refvalues, arranged for lookups): an object key is found at the same cost among ten
# values or ten thousand, while `x in array`, a function call, or a subtree of data taken
# whole costs time in proportion to its size in this interpreter. So every path into data
# below is written out in full and ends at one value.
package attestmesh.release

import rego.v1

default allow := false

acceptable contains "affirming"

acceptable contains "warning" if data.settings.allow_warning == true

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
	not data.refindex[input.family].claims
}

deny contains sprintf("claim %s is not among the reference values", [name]) if {
	some name in data.refindex[input.family].claims
	not data.refindex[input.family].strings[name][input.refclaims[name]]
	not input.refclaims[name] in data.refindex[input.family].others[name]
}

allow_simulated if data.settings.allow_simulated == true

deny contains "simulated evidence is not accepted" if {
	not input.simulated == false
	not allow_simulated
}

allow if count(deny) == 0

decision := {"allow": allow, "reasons": sort([r | some r in deny])}
