"""The resource policy in-process: the packaged default as a table, the input the broker
builds, the bounded appraisal summary, and the regopy input path it relies on."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.mesh.errors import PolicyError
from services.policy.engine import (
    RESOURCE,
    PolicyEngine,
    default_policy,
    default_resource_policy,
    plain,
)
from services.policy.resource_policy import reads_claims, request_input, split
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


def _ask(engine: PolicyEngine, node: str, resource: str, *, claims: bool = False) -> bool:
    return engine.evaluate(request_input(node, resource, SNP, with_claims=claims)).allow


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
    outcome = default.evaluate(request_input(node, resource, SNP, with_claims=False))
    assert outcome.allow is allowed
    assert outcome.reasons == ([] if allowed else [NOT_OWN])
    assert _ask(default, node, resource, claims=True) is allowed  # claims change nothing


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
    assert _ask(engine, "node-1", "prod/key/db", claims=True)
    other = AppraisalSummary("snp", "affirming", "", {"measurement": "bb" * 48})
    doc = request_input("node-1", "prod/key/db", other, with_claims=True)
    assert not engine.evaluate(doc).allow
    # Without the claims in the input the same request is denied, never allowed.
    assert not _ask(engine, "node-1", "prod/key/db", claims=False)


@pytest.mark.parametrize(
    ("source", "reads"),
    [
        ('allow if input.node == "x"', False),
        ('allow if input.resource.repository == "x"', False),
        ("allow if input.resource == {}", False),
        ('allow if input.appraisal.family == "snp"', False),
        ('allow if input.appraisal.status == "affirming"', False),
        ('allow if input.appraisal.hwid != ""', False),
        ('allow if input.appraisal.claims.measurement == "x"', True),
        ("allow if input.appraisal.claims_omitted == []", True),
        ("allow if count(input.appraisal) > 3", True),
        ('allow if input.appraisal["claims"]', True),
        ('allow if input["appraisal"].family', True),
        ("allow if { walk(input, [p, v]); v == 1 }", True),
        ("import input.appraisal as a\nallow if a.claims", True),
        ("import input\nallow if input.node", True),
        ('allow if input.appraisal.family_extra == "x"', True),
        ('allow if input.nodes == "x"', True),
        ("# the input decides\nallow if input.node", True),  # even in a comment: err safe
        ('allow if data.input.x == 1\nallow if input.node == "a"', True),
        ("allow if my_input.appraisal == 1", False),  # another variable
    ],
)
def test_only_a_policy_that_cannot_read_the_claims_goes_without(source: str, reads: bool) -> None:
    assert reads_claims(source) is reads


def test_the_packaged_default_gets_the_small_input() -> None:
    assert not reads_claims(default_resource_policy())


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
    assert len(json.dumps(kept)) <= MAX_CLAIMS_BYTES
    assert list(kept) == sorted(kept) and set(kept) | set(omitted) == set(big)
    assert omitted == sorted(omitted) and min(omitted) > max(kept)  # taken in name order


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
    assert plain({"v": ["A-z_0.9:/ +=~", 2**63 - 1, -(2**63), 1.5, True, None]})


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
