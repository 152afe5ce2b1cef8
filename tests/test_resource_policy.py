"""The resource policy in-process: the packaged default as a table, the input the broker
builds, the bounded appraisal summary, and the regopy input path it relies on."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.broker.resources import REMEMBER_S, ResourcePolicy, deterministic
from services.mesh import subjects
from services.mesh.errors import PolicyError
from services.mesh.keys import SigningKey, TrustedKeys
from services.policy import documents
from services.policy.engine import (
    RESOURCE,
    Outcome,
    PolicyEngine,
    default_policy,
    default_resource_policy,
)
from services.policy.regovalues import plain
from services.policy.resource_policy import ALL_CLAIMS, claims_read, request_input, split
from services.policy.summary import (
    MAX_CLAIMS_BYTES,
    MAX_SUMMARY_BYTES,
    MAX_TEXT,
    AppraisalSummary,
    bound_claims,
    decode,
    digest,
    encode,
    matches,
)

SNP = AppraisalSummary("snp", "affirming", "ab" * 32, {"measurement": "aa" * 48}, ())
NOT_OWN = "the resource is neither shared (default) nor the node's own"


@pytest.fixture(scope="module")
def default() -> PolicyEngine:
    return PolicyEngine(default_resource_policy(), {}, kind=RESOURCE)


NONE: frozenset[str] = frozenset()


def _ask(
    engine: PolicyEngine, node: str, resource: str, *, claims: frozenset[str] | None = NONE
) -> bool:
    return engine.evaluate(request_input(node, resource, SNP, claims=claims)).allow


@pytest.mark.parametrize(
    ("node", "resource", "allowed"),
    [
        ("node-1", "node-1/key/tls", True),  # its own repository
        ("node-1", "node-1/tls", True),  # the older <namespace>/<name> form
        ("node-1", "default/key/workload", True),  # shared
        ("node-1", "default/workload", True),
        ("node-1", "node-2/key/tls", False),  # another node's
        ("node-1", "node-10/key/tls", False),  # a prefix is not the node
        ("node-10", "node-1/key/tls", False),
        ("node-1", "Default/key/workload", False),  # case matters
        ("node-1", "defaults/key/workload", False),
        ("default", "default/key/x", True),  # a node called "default" reads only default/*
        ("node-1", "node-1", False),  # malformed: one part
        ("node-1", "node-1/a/b/c", False),  # four parts
        ("node-1", "node-1//tls", False),  # an empty part
        ("node-1", "/node-1/tls", False),
        ("node-1", "", False),
        ("node-1", "../node-1/key", False),
        ("", "default/key/workload", True),  # the shared repository needs no name
        ("", "/key/tls", False),  # an empty node never equals an empty repository
    ],
)
def test_the_packaged_default_is_todays_rule(
    default: PolicyEngine, node: str, resource: str, allowed: bool
) -> None:
    outcome = default.evaluate(request_input(node, resource, SNP, claims=NONE))
    assert outcome.allow is allowed
    assert outcome.reasons == ([] if allowed else [NOT_OWN])
    assert _ask(default, node, resource, claims=ALL_CLAIMS) is allowed  # claims change nothing


@pytest.mark.parametrize(
    "document",
    [
        {},
        {"node": "node-1"},
        {"node": "node-1", "resource": "node-1/key/tls"},  # unsplit
        {"node": "node-1", "resource": {"repository": 7}},
        {"node": 7, "resource": {"repository": 7}},
        {"node": None, "resource": {"repository": None}},
        {"node": ["node-1"], "resource": {"repository": ["node-1"]}},
    ],
)
def test_malformed_input_denies(default: PolicyEngine, document: dict[str, Any]) -> None:
    outcome = default.evaluate(document)
    assert not outcome.allow and outcome.reasons == [NOT_OWN]


def test_names_split_into_the_key_brokers_parts() -> None:
    assert split("r/t/g") == {"path": "r/t/g", "repository": "r", "type": "t", "tag": "g"}
    assert split("ns/name") == {"path": "ns/name", "repository": "ns", "type": "", "tag": "name"}
    for bad in ("", "a", "a/b/c/d", "a//b", "/a/b", "a/b/", "//"):
        assert split(bad) == {"path": bad, "repository": "", "type": "", "tag": ""}


def test_a_policy_of_the_wrong_kind_does_not_compile() -> None:
    with pytest.raises(PolicyError) as err:
        PolicyEngine(default_policy(), {}, kind=RESOURCE)
    assert err.value.reason == "resource_policy.compile_failed"
    assert "attestmesh.resource" in err.value.detail
    with pytest.raises(PolicyError) as err:
        PolicyEngine(default_resource_policy(), {})
    assert err.value.reason == "policy.compile_failed"
    with pytest.raises(PolicyError, match="resource_policy.compile_failed"):
        PolicyEngine("package attestmesh.resource\nallow if {", {}, kind=RESOURCE)


MEASURED = """package attestmesh.resource
import rego.v1
default allow := false
allow if {
    input.resource.repository == "prod"
    input.appraisal.claims.measurement == "%s"
}
decision := {"allow": allow, "reasons": []}
"""


def test_a_custom_policy_reads_the_signed_claims() -> None:
    engine = PolicyEngine(MEASURED % ("aa" * 48), {}, kind=RESOURCE)
    assert claims_read(MEASURED) == frozenset({"measurement"})
    assert _ask(engine, "node-1", "prod/key/db", claims=ALL_CLAIMS)
    assert _ask(engine, "node-1", "prod/key/db", claims=frozenset({"measurement", "absent"}))
    other = AppraisalSummary("snp", "affirming", "", {"measurement": "bb" * 48})
    doc = request_input("node-1", "prod/key/db", other, claims=ALL_CLAIMS)
    assert not engine.evaluate(doc).allow
    # Without the claim in the input the same request is denied, never allowed.
    assert not _ask(engine, "node-1", "prod/key/db", claims=NONE)


@pytest.mark.parametrize(
    ("source", "reads"),
    [
        ('allow if input.node == "x"', NONE),
        ('allow if input.resource.repository == "x"', NONE),
        ("allow if input.resource == {}", NONE),
        ('allow if input.appraisal.family == "snp"', NONE),
        ('allow if input.appraisal.status == "affirming"', NONE),
        ('allow if input.appraisal.hwid != ""', NONE),
        ("allow if input.appraisal.claims_omitted == []", NONE),
        ('allow if input.appraisal.claims.measurement == "x"', {"measurement"}),
        ('allow if input.appraisal.claims.pcrs["0"] == "x"', {"pcrs"}),
        ("allow if { input.appraisal.claims.a; input.appraisal.claims.b_2 }", {"a", "b_2"}),
        ('# input.appraisal.claims.debug\nallow if input.node == "x"', {"debug"}),  # err safe
        ("allow if input.appraisal.claims == {}", ALL_CLAIMS),
        ('allow if input.appraisal.claims["measurement"]', ALL_CLAIMS),
        ("allow if { some k; input.appraisal.claims[k] }", ALL_CLAIMS),
        ("allow if input.appraisal.claims.measurement_x.y", {"measurement_x"}),
        ("allow if count(input.appraisal) > 3", ALL_CLAIMS),
        ('allow if input.appraisal["claims"]', ALL_CLAIMS),
        ('allow if input["appraisal"].family', ALL_CLAIMS),
        ("allow if { walk(input, [p, v]); v == 1 }", ALL_CLAIMS),
        ("import input.appraisal as a\nallow if a.claims", ALL_CLAIMS),
        ("import input.appraisal.claims as c\nallow if c.debug", ALL_CLAIMS),
        ("import input\nallow if input.node", ALL_CLAIMS),
        ('allow if input.appraisal.family_extra == "x"', ALL_CLAIMS),
        ('allow if input.nodes == "x"', ALL_CLAIMS),
        ("# the input decides\nallow if input.node", ALL_CLAIMS),  # even in a comment
        ('allow if data.input.x == 1\nallow if input.node == "a"', ALL_CLAIMS),
        ("allow if my_input.appraisal == 1", NONE),  # another variable
    ],
)
def test_a_policy_gets_the_claims_it_names_and_no_fewer(
    source: str, reads: frozenset[str] | set[str] | None
) -> None:
    assert claims_read(source) == reads


def test_the_packaged_default_gets_the_small_input() -> None:
    assert claims_read(default_resource_policy()) == NONE


def test_claims_are_bounded_whole_never_truncated() -> None:
    claims: dict[str, Any] = {
        "measurement": "aa" * 48,
        "guest_svn": 7,
        "debug": False,
        "ratio": 0.5,
        "nothing": None,
        "pcrs": {str(i): "00" * 48 for i in range(24)},
        "advisories": ["INTEL-SA-00960"],
        "tcb": {"current": {"snp": 8}},  # nested: left out
        "events": [{"pcr": 0}],
        "long": "x" * (MAX_TEXT + 1),
        "many": list(range(33)),
        "nan": float("nan"),
        "n" * 65: 1,
    }
    kept, omitted = bound_claims(claims)
    assert set(kept) == {"measurement", "guest_svn", "debug", "ratio", "nothing", "pcrs"} | {
        "advisories"
    }
    assert all(kept[k] == claims[k] for k in kept)
    assert sorted(omitted) == sorted(["tcb", "events", "long", "many", "nan", "n" * 64])
    big = {f"c{i:03}": "ab" * 200 for i in range(40)}
    kept, omitted = bound_claims(big)
    assert len(msgspec.json.encode(kept)) <= MAX_CLAIMS_BYTES < len(msgspec.json.encode(big))
    assert list(kept) == sorted(kept) and set(kept) | set(omitted) == set(big)
    assert omitted == sorted(omitted) and min(omitted) > max(kept)  # taken in name order
    wide = {f"c{i:03}": "\u00e9\U0001f600" * 100 for i in range(40)}  # 6 UTF-8 bytes a pair
    kept, _ = bound_claims(wide)
    assert MAX_CLAIMS_BYTES - 700 < len(msgspec.json.encode(kept)) <= MAX_CLAIMS_BYTES


def test_the_summary_reads_back_bound_to_its_digest() -> None:
    raw = encode({"a": "b", "tcb": {"x": {"y": 1}}}, "cafe")
    signed = digest(raw)
    assert matches(raw, signed) and not matches(raw + b" ", signed)
    assert not matches(raw.replace(b'"b"', b'"c"'), signed)
    found = decode(raw, family="snp", status="affirming")
    assert found == AppraisalSummary("snp", "affirming", "cafe", {"a": "b"}, ("tcb",))
    huge = {f"c{i:03}": "ab" * 256 for i in range(100)}
    assert len(encode(huge, "f" * 1000)) <= MAX_SUMMARY_BYTES


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b'{"hwid": 1}',
        b'{"claims": []}',
        b'{"claims_omitted": "a"}',
        b'{"claims_omitted": [1]}',
        b'{"extra": 1}',
        json.dumps({"claims": {str(i): i for i in range(129)}}).encode(),
        b" " * (MAX_SUMMARY_BYTES + 1),
    ],
)
def test_malformed_summary_bytes_are_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        decode(raw, family="snp", status="affirming")


def _equal_to(value: Any) -> PolicyEngine:
    return PolicyEngine(
        "package attestmesh.resource\nimport rego.v1\ndefault allow := false\n"
        f"allow if input.v == {json.dumps(value)}\n"
        'decision := {"allow": allow, "reasons": []}\n',
        {},
        kind=RESOURCE,
    )


@pytest.mark.parametrize("value", ['a"b', "é", "a\\b", "tab\there", 2**64 - 1, "x\x00y"])
def test_values_regopy_input_would_mangle_go_as_json(value: Any) -> None:
    """regopy's Input passes strings unescaped and integers as signed 64 bits."""
    assert not plain({"v": value})
    assert _equal_to(value).evaluate({"v": value}).allow
    assert plain({"v": {"a": "A-z_0.9:/ +=~", "b": 2**63 - 1, "c": -(2**63), "d": 1.5}})
    assert plain({"v": {"e": True, "f": None, "g": []}})


def test_an_array_reaches_the_policy_exactly() -> None:
    """regopy's Input builds arrays that ``json.marshal`` cannot render (undefined): a rule
    on one would never fire, so a document holding one goes as JSON."""
    document = {"v": {"advisories": ["INTEL-SA-00001"]}}
    assert not plain(document)
    engine = PolicyEngine(
        "package attestmesh.resource\nimport rego.v1\n"
        'deny contains "listed" if contains(json.marshal(input.v), "SA-00001")\n'
        'decision := {"allow": count(deny) == 0, "reasons": [r | some r in deny]}\n',
        {},
        kind=RESOURCE,
    )
    assert engine.evaluate(document) == Outcome(allow=False, reasons=["listed"])


@settings(max_examples=60, deadline=None)
@given(
    value=st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=6,
    )
)
def test_any_value_compares_equal_to_itself(value: Any) -> None:
    """Whichever path a document takes, the policy sees exactly the value sent."""
    assert _equal_to(value).evaluate({"v": value}).allow


def _signed(operator: SigningKey, source: str, version: int) -> bytes:
    return documents.seal(
        operator,
        bucket=subjects.BUCKET_POLICIES,
        key=RESOURCE.key,
        payload=source.encode(),
        version=version,
        issued_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def test_the_broker_keeps_the_last_good_policy_from_history() -> None:
    """A restarted broker whose newest signed document does not compile takes the newest
    earlier one that does; the stored one stays refused, and an older one put back later is
    still a rollback."""
    operator = SigningKey.generate("operator")
    policy = ResourcePolicy(TrustedKeys({"operator": operator.public_key()}))
    shared_only = default_resource_policy().replace("may_read(node, repository) if", "x(node) if")
    history = [
        _signed(operator, default_resource_policy(), 1),
        _signed(operator, shared_only, 2),
        b"junk",
        _signed(operator, "package attestmesh.resource\nallow if {", 3),
    ]
    policy.prime(history)
    policy.offer(history[-1])
    assert policy.engine is not None and policy.engine.policy_id == "resources@v2"
    assert policy.refusal == "resource_policy.compile_failed" and policy.blocked is None
    assert policy.check("node-1", "default/key/a", SNP) is None
    assert policy.check("node-1", "node-1/key/a", SNP) == "broker.resource_forbidden"
    policy.offer(history[0])
    assert policy.refusal == "resource_policy.rollback"
    assert policy.engine.policy_id == "resources@v2"


def test_the_broker_refuses_every_release_without_a_good_policy() -> None:
    operator = SigningKey.generate("operator")
    policy = ResourcePolicy(TrustedKeys({"operator": operator.public_key()}))
    assert policy.check("node-1", "default/key/a", SNP) == "broker.resource_policy_unavailable"
    for raw, reason in (
        (None, None),
        (default_resource_policy().encode(), "resource_policy.unsigned"),
        (
            _signed(SigningKey.generate("operator"), default_resource_policy(), 1),
            "resource_policy.unknown_signer",
        ),
        (_signed(operator, default_policy(), 2), "resource_policy.compile_failed"),
    ):
        policy.offer(raw)
        assert policy.refusal == reason
        assert policy.check("node-1", "default/key/a", SNP) == "broker.resource_policy_unavailable"
    policy.offer(_signed(operator, default_resource_policy(), 3))
    assert policy.check("node-1", "default/key/a", SNP) is None
    policy.block("the bucket cannot be read")
    assert policy.check("node-1", "default/key/a", SNP) == "broker.resource_policy_unavailable"
    policy.offer(_signed(operator, default_resource_policy(), 3))
    assert policy.check("node-1", "default/key/a", SNP) is None


def test_an_evaluation_error_refuses() -> None:
    operator = SigningKey.generate("operator")
    policy = ResourcePolicy(TrustedKeys({"operator": operator.public_key()}))
    policy.offer(_signed(operator, 'package attestmesh.resource\ndecision := {"allow": 1}\n', 1))
    assert policy.check("node-1", "default/key/a", SNP) == "broker.resource_policy_failed"


def _counting(policy: ResourcePolicy) -> list[int]:
    """Count the engine's evaluations (the policy in force, wrapped)."""
    assert policy.engine is not None
    calls: list[int] = []
    evaluate = policy.engine.evaluate

    def counted(document: dict[str, Any]) -> Any:
        calls.append(1)
        return evaluate(document)

    policy.engine.evaluate = counted  # type: ignore[method-assign]
    return calls


def test_a_deterministic_policy_answers_the_same_question_once() -> None:
    operator = SigningKey.generate("operator")
    policy = ResourcePolicy(TrustedKeys({"operator": operator.public_key()}))
    policy.offer(_signed(operator, default_resource_policy(), 1))
    calls = _counting(policy)
    for _ in range(3):
        assert policy.check("node-1", "default/key/a", SNP) is None
        assert policy.check("node-1", "node-2/key/a", SNP) == "broker.resource_forbidden"
    assert len(calls) == 2  # one per distinct question
    assert policy.check("node-2", "node-2/key/a", SNP) is None and len(calls) == 3
    shared_only = default_resource_policy().replace("may_read(node, repository) if", "x(node) if")
    policy.offer(_signed(operator, shared_only, 2))  # a new policy forgets every answer
    assert policy.check("node-2", "node-2/key/a", SNP) == "broker.resource_forbidden"


def test_a_policy_reading_the_clock_is_asked_every_time() -> None:
    operator = SigningKey.generate("operator")
    policy = ResourcePolicy(TrustedKeys({"operator": operator.public_key()}))
    clocked = (
        "package attestmesh.resource\nimport rego.v1\n"
        'decision := {"allow": time.now_ns() > 0, "reasons": []}\n'
    )
    policy.offer(_signed(operator, clocked, 1))
    assert policy.engine is not None
    calls = _counting(policy)
    for _ in range(3):
        policy.check("node-1", "default/key/a", SNP)
    assert len(calls) == 3


@pytest.mark.parametrize(
    "call",
    [
        "time.now_ns()",
        "time .now_ns()",
        "time\n  .now_ns()",
        'io.jwt.decode_verify("x", {"secret": "s"})',
        'crypto.x509.parse_and_verify_certificates("x")',
        'rand.intn("x", 5)',
        'uuid.rfc4122("x")',
    ],
)
def test_a_varying_builtin_is_seen_however_it_is_written(call: str) -> None:
    assert not deterministic(f"package attestmesh.resource\nx := {call}\n")


def test_a_remembered_answer_is_asked_again_after_a_while() -> None:
    operator = SigningKey.generate("operator")
    now = [0.0]
    policy = ResourcePolicy(TrustedKeys({"operator": operator.public_key()}), clock=lambda: now[0])
    policy.offer(_signed(operator, default_resource_policy(), 1))
    calls = _counting(policy)
    policy.check("node-1", "default/key/a", SNP)
    now[0] = REMEMBER_S - 1
    policy.check("node-1", "default/key/a", SNP)
    assert len(calls) == 1
    now[0] = REMEMBER_S + 1
    policy.check("node-1", "default/key/a", SNP)
    assert len(calls) == 2
