"""The packaged release policy, evaluated through the compiled regopy bundle."""

from __future__ import annotations

from typing import Any

import pytest

from services.mesh.errors import PolicyError
from services.policy.engine import PolicyEngine, default_policy

GOOD: dict[str, Any] = {
    "family": "snp",
    "status": "affirming",
    "verified": True,
    "claims": {"measurement": "aa", "host_data": "00"},
    "simulated": False,
}


def _engine(**data: Any) -> PolicyEngine:
    """The packaged policy; snp's reference values default to the explicit opt-out ``{}``."""
    return PolicyEngine(default_policy(), {"refvalues": {"snp": {}}, **data})


def test_affirming_verified_evidence_is_released() -> None:
    outcome = _engine().evaluate(GOOD)
    assert outcome.allow and outcome.reasons == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"status": "contraindicated"}, "verdict status contraindicated is not acceptable"),
        ({"status": "warning"}, "verdict status warning is not acceptable"),
        ({"verified": False}, "evidence signatures did not verify"),
        ({"simulated": True}, "simulated evidence is not accepted"),
    ],
)
def test_each_violation_denies_with_its_reason(change: dict[str, Any], reason: str) -> None:
    outcome = _engine().evaluate({**GOOD, **change})
    assert not outcome.allow
    assert reason in outcome.reasons


@pytest.mark.parametrize("missing", ["status", "verified", "simulated"])
def test_missing_input_fails_closed(missing: str) -> None:
    document = {k: v for k, v in GOOD.items() if k != missing}
    assert not _engine().evaluate(document).allow


def test_settings_loosen_only_what_they_name() -> None:
    engine = _engine(settings={"allow_warning": True, "allow_simulated": True})
    assert engine.evaluate({**GOOD, "status": "warning", "simulated": True}).allow
    assert not engine.evaluate({**GOOD, "status": "contraindicated"}).allow


def test_reference_values_gate_release_and_report_all_violations() -> None:
    engine = _engine(refvalues={"snp": {"measurement": ["bb", "cc"], "host_data": ["11"]}})
    outcome = engine.evaluate({**GOOD, "status": "warning"})
    assert not outcome.allow
    assert outcome.reasons == [
        "claim host_data is not among the reference values",
        "claim measurement is not among the reference values",
        "verdict status warning is not acceptable",
    ]
    ok = {**GOOD, "claims": {"measurement": "cc", "host_data": "11"}}
    assert engine.evaluate(ok).allow
    assert _engine(refvalues={"snp": {}, "tdx": {"mrtd": ["zz"]}}).evaluate(GOOD).allow


@pytest.mark.parametrize("refvalues", [{}, {"tdx": {"mrtd": ["zz"]}}, None])
def test_a_family_without_reference_values_is_denied(refvalues: dict[str, Any] | None) -> None:
    """Purged or never provisioned: absence must never read as "any measurement will do"."""
    data: dict[str, Any] = {} if refvalues is None else {"refvalues": refvalues}
    outcome = PolicyEngine(default_policy(), data).evaluate(GOOD)
    assert not outcome.allow
    assert outcome.reasons == ["no reference values are provisioned for this family"]


def test_a_broken_policy_fails_to_compile_with_a_reason() -> None:
    with pytest.raises(PolicyError) as err:
        PolicyEngine("package attestmesh.release\nthis is not rego", {})
    assert err.value.reason == "policy.compile_failed"


def test_a_policy_that_answers_badly_denies() -> None:
    weird = 'package attestmesh.release\nimport rego.v1\ndecision := {"allow": "yes"}'
    with pytest.raises(PolicyError, match="policy.bad_output"):
        PolicyEngine(weird, {}).evaluate(GOOD)
