"""The appraisal policy gets only the input it can read, and reference values arranged for
lookups; neither may change a decision (:mod:`services.policy.appraisal_input`)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.mesh import events
from services.policy import refvalues
from services.policy.appraisal_input import EVERYTHING, Reads, index, reads, restrict
from services.policy.engine import PolicyEngine, default_policy

SCANNING = """package attestmesh.release
import rego.v1
refs := data.refvalues[input.family]
deny contains "no reference values are provisioned for this family" if {
	not data.refvalues[input.family]
}
deny contains sprintf("claim %s is not among the reference values", [name]) if {
	some name, allowed in refs
	is_array(allowed)
	count(allowed) > 0
	not input.claims[name] in allowed
}
decision := {"allow": count(deny) == 0, "reasons": sort([r | some r in deny])}
"""
"""The reference-value rules of the packaged policy before data.refindex: scans the arrays."""

PASSING = {"status": "affirming", "verified": True, "simulated": False, "node": "n1"}


def _document(claims: dict[str, Any], family: str = "snp", **more: Any) -> dict[str, Any]:
    return {"family": family, "claims": claims, "reasons": [], **PASSING, **more}


VALUES = st.one_of(
    st.sampled_from(["aa", "bb", "7", "", "A-z 0.9", 'a"b', "a\\b", "é", "x\x00y"]),
    st.text(max_size=4),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.just(refvalues.ALL_EXPIRED),
)
CLAIM_VALUES = st.one_of(
    VALUES, st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none()
)


@settings(max_examples=40, deadline=None)
@given(
    data=st.dictionaries(
        st.sampled_from(["snp", "tdx"]),
        st.dictionaries(st.sampled_from(["m", "h", "v"]), st.lists(VALUES, max_size=4)),
        max_size=2,
    ),
    claims=st.dictionaries(st.sampled_from(["m", "h", "v", "x"]), CLAIM_VALUES, max_size=4),
    reuse=st.booleans(),
)
def test_lookups_decide_exactly_as_the_array_scan(
    data: dict[str, dict[str, list[Any]]], claims: dict[str, Any], reuse: bool
) -> None:
    """Whatever the values and claims, the packaged policy allows and denies, with the same
    reasons, as the rules that scanned data.refvalues did."""
    if reuse:  # mostly claims that are among the values, which a random draw seldom hits
        for name, allowed in data.get("snp", {}).items():
            if allowed:
                claims[name] = allowed[-1]
    settings_ = {"allow_simulated": True}
    packaged = PolicyEngine(default_policy(), {"refvalues": data, "settings": settings_})
    scanning = PolicyEngine(SCANNING, {"refvalues": data})
    document = _document(claims)
    assert packaged.evaluate(document) == scanning.evaluate(document)


def test_every_value_of_a_claim_is_found_as_before() -> None:
    values = ["aa", 'quote"d', "back\\slash", "é", 7, 2**64 - 1, refvalues.ALL_EXPIRED]
    engine = PolicyEngine(default_policy(), {"refvalues": {"snp": {"m": values}}})
    for value in values[:-1]:
        assert engine.evaluate(_document({"m": value})).allow, value
    for value in ["7", 7.5, "AA", "", None, True, [7], {"m": 7}, {"attestmesh": 1}]:
        outcome = engine.evaluate(_document({"m": value}))
        assert outcome.reasons == ["claim m is not among the reference values"], value


def test_the_index_keeps_only_exact_strings_as_keys() -> None:
    found = index({"snp": {"m": ["aa", 'q"', 7], "h": [], "x": "not a list"}, "tdx": []})
    assert found == {
        "snp": {"claims": ["m"], "strings": {"m": {"aa": True}}, "others": {"m": ['q"', 7]}}
    }


def test_an_emptied_or_unprovisioned_family_is_denied_as_before() -> None:
    now = events.utcnow()
    expired = refvalues.effective({"m": [refvalues.Entry(value="aa", expires=now)]}, now)
    engine = PolicyEngine(default_policy(), {"refvalues": {"snp": expired}})
    assert engine.evaluate(_document({"m": "aa"})).reasons == [
        "claim m is not among the reference values"
    ]
    assert PolicyEngine(default_policy(), {"refvalues": {"tdx": {}}}).evaluate(
        _document({"m": "aa"})
    ).reasons == ["no reference values are provisioned for this family"]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("allow if input.status == 1", Reads(frozenset({"status"}), frozenset())),
        (
            "x := input.claims.measurement\ny := input.claims.chip_id[0]",
            Reads(frozenset({"claims"}), frozenset({"measurement", "chip_id"})),
        ),
        ("y := input.refclaims[name]", Reads(frozenset({"refclaims"}), frozenset())),
        ("some k, v in input.claims", Reads(frozenset({"claims"}), None)),
        ('x := input.claims["measurement"]', Reads(frozenset({"claims"}), None)),
        ("x := input.claims.a\ny := input.claims[k]", Reads(frozenset({"claims"}), None)),
        ("import input.claims", Reads(frozenset({"claims"}), None)),
        ("x := input.claims_extra", EVERYTHING),
        ("x := input[k]", EVERYTHING),
        ("x := walk(input)", EVERYTHING),
        ("import input as i", EVERYTHING),
        ("x := input.unknown_field", EVERYTHING),
        ("# what the input holds\nx := input.status", EVERYTHING),
        ("x := 1", Reads(frozenset(), frozenset())),
    ],
)
def test_what_a_policy_can_read(source: str, expected: Reads) -> None:
    assert reads(source) == expected


def test_the_packaged_policy_reads_no_claim_but_those_with_reference_values() -> None:
    assert reads(default_policy()) == Reads(
        frozenset({"family", "status", "verified", "simulated", "refclaims"}), frozenset()
    )


def test_only_what_is_read_is_handed_over() -> None:
    document = _document({"m": "aa", "h": "bb", "other": "cc"}, reasons=["snp.x"])
    narrow = Reads(frozenset({"status", "claims"}), frozenset({"h", "absent"}))
    assert restrict(document, narrow, {"m"}) == {"status": "affirming", "claims": {"h": "bb"}}
    every = restrict(document, EVERYTHING, {"m", "absent"})
    assert every == {**document, "refclaims": {"m": "aa"}}


ATTACKS = {
    "a claim read through a variable": """
deny contains "bad claim" if {
	some name, value in input.claims
	value == "bad"
}""",
    "a claim named as a string": """
deny contains "bad claim" if input.claims["debug"] == "bad"
""",
    "the whole input walked": """
deny contains "bad claim" if {
	walk(input, [_, value])
	value == "bad"
}""",
    "a claim named": """
deny contains "bad claim" if input.claims.debug == "bad"
""",
    "reason codes": """
deny contains "bad claim" if "bad" in input.reasons
""",
}


@pytest.mark.parametrize("rules", ATTACKS.values(), ids=list(ATTACKS))
def test_a_policy_sees_whatever_it_can_reach(rules: str) -> None:
    """However a policy reaches a claim (or a reason), it is there: a deny rule on a value
    the input left out would silently never fire."""
    source = (
        "package attestmesh.release\nimport rego.v1\n"
        + rules
        + '\ndecision := {"allow": count(deny) == 0, "reasons": [r | some r in deny]}\n'
    )
    engine = PolicyEngine(source, {"refvalues": {"snp": {"m": ["aa"]}}})
    bad = _document({"m": "aa", "debug": "bad"}, reasons=["bad"])
    assert not engine.evaluate(bad).allow
    good = _document({"m": "aa", "debug": "fine"}, reasons=["fine"])
    assert engine.evaluate(good).allow
