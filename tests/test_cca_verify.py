"""CCA verification against test tokens: each signature, binding, claim and lifecycle failure
gives its reason; the CPAK JWK; policy knobs; appraise never raises."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from services.mesh.errors import ParseError, PolicyError
from services.testing.amd_pki import ec_key
from services.testing.cca_tokens import CcaTestPlatform, jwk, rak_bytes
from services.verifier.families.base import (
    TV_AFFIRMING,
    TV_CONTRAINDICATED,
    TV_NO_CLAIM,
    Appraisal,
    Status,
    VerifyOptions,
)
from services.verifier.families.cca import CcaPolicy, CcaVerifier, lifecycle_state, parse_cpak
from services.verifier.families.cca import parse as p
from services.verifier.trust import TrustStore

NOW = datetime(2025, 3, 1, tzinfo=UTC)
CHALLENGE = bytes(range(64))
PLATFORM = CcaTestPlatform()


def _appraise(
    token: bytes,
    *,
    policy: CcaPolicy | None = None,
    collateral: dict[str, bytes] | None = None,
    expected: bytes | None = CHALLENGE,
) -> Appraisal:
    options = VerifyOptions(
        now=NOW,
        trust=TrustStore(),
        collateral=PLATFORM.collateral() if collateral is None else collateral,
        expected_report_data=expected,
    )
    return CcaVerifier(policy).appraise(token, options)


def _codes(appraisal: Appraisal) -> list[str]:
    return [r.code for r in appraisal.reasons]


@pytest.mark.parametrize("encoding", ["raw", "cose_key"])
@pytest.mark.parametrize("rak_hash", ["sha-256", "sha-384", "sha-512"])
def test_good_tokens_are_affirming(encoding: str, rak_hash: str) -> None:
    token = PLATFORM.token(CHALLENGE, rak_encoding=encoding, rak_hash=rak_hash)
    appraisal = _appraise(token)
    assert appraisal.status is Status.AFFIRMING and appraisal.verified, appraisal.reasons
    claims = appraisal.claims
    assert claims["realm_challenge"] == CHALLENGE.hex()
    assert claims["realm_public_key"] == rak_bytes(PLATFORM.rak.public_key(), encoding).hex()
    assert claims["realm_public_key_hash_algo_id"] == rak_hash
    assert claims["platform_lifecycle"] == "3000"
    assert claims["platform_lifecycle_state"] == "secured"
    assert claims["realm_profile"] == "tag:arm.com,2023:realm#1.0.0"
    assert len(claims["realm_extensible_measurements"]) == 4
    assert claims["platform_sw_components"][0]["type"] == "RSE_BL1_2"
    assert appraisal.trust_vector["hardware"] == TV_AFFIRMING
    assert appraisal.trust_vector["executables"] == TV_NO_CLAIM


def test_es256_and_es512_keys() -> None:
    for curve in (ec.SECP256R1(), ec.SECP521R1()):
        platform = CcaTestPlatform(
            cpak=ec.generate_private_key(curve), rak=ec.generate_private_key(curve)
        )
        options = VerifyOptions(now=NOW, trust=TrustStore(), collateral=platform.collateral())
        appraisal = CcaVerifier().appraise(platform.token(CHALLENGE), options)
        assert appraisal.status is Status.AFFIRMING, (curve.name, appraisal.reasons)


ROGUE = ec_key("cca:rogue")
SIGNATURE_CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("platform-by-rogue", {"platform_signer": ROGUE}, ["cca.platform_signature_invalid"]),
    ("realm-by-rogue", {"realm_signer": ROGUE}, ["cca.realm_signature_invalid"]),
    (
        "platform-challenge-not-rak-hash",
        {"platform": {p.NONCE: bytes(32)}},
        ["cca.rak_binding_invalid"],
    ),
    (
        "rak-hash-md5",
        {"realm": {p.REALM_PUBLIC_KEY_HASH_ALGO: "md5"}, "platform": {p.NONCE: bytes(32)}},
        ["cca.unsupported_hash_algorithm"],
    ),
    ("realm-alg-es256", {"realm_alg": -7}, ["cca.unsupported_algorithm"]),
    ("platform-alg-es512", {"platform_alg": -36}, ["cca.unsupported_algorithm"]),
    (
        "rak-not-on-curve",
        {"realm": {p.REALM_PUBLIC_KEY: b"\x04" + bytes(96)}},
        ["cca.rak_invalid", "cca.rak_binding_invalid"],
    ),
    (
        "rak-odd-size",
        {"realm": {p.REALM_PUBLIC_KEY: b"\x04" + bytes(50)}},
        ["cca.rak_invalid", "cca.rak_binding_invalid"],
    ),
    (
        "rak-cose-key-okp",
        {"realm": {p.REALM_PUBLIC_KEY: cbor2.dumps({1: 1, -1: 6, -2: bytes(32)})}},
        ["cca.rak_invalid", "cca.rak_binding_invalid"],
    ),
    (
        "rak-garbage",
        {"realm": {p.REALM_PUBLIC_KEY: b"\xff\x00"}},
        ["cca.rak_invalid", "cca.rak_binding_invalid"],
    ),
]


@pytest.mark.parametrize(
    ("knobs", "expected"), [c[1:] for c in SIGNATURE_CASES], ids=[c[0] for c in SIGNATURE_CASES]
)
def test_each_broken_signature_or_binding_gives_its_reason(
    knobs: dict[str, Any], expected: list[str]
) -> None:
    appraisal = _appraise(PLATFORM.token(CHALLENGE, **knobs))
    assert _codes(appraisal) == expected
    assert appraisal.status is Status.CONTRAINDICATED and not appraisal.verified
    assert appraisal.trust_vector["instance-identity"] == TV_CONTRAINDICATED


def test_realm_challenge_binding() -> None:
    token = PLATFORM.token(bytes(64))
    appraisal = _appraise(token)
    assert _codes(appraisal) == ["cca.report_data_mismatch"] and appraisal.verified
    assert _appraise(token, expected=None).status is Status.AFFIRMING
    assert "32 bytes" in _appraise(token, expected=bytes(32)).reasons[0].message


@pytest.mark.parametrize(
    ("lifecycle", "state", "codes"),
    [
        (0x3000, "secured", []),
        (0x30FF, "secured", []),
        (0x0000, "unknown", ["cca.lifecycle_not_secured"]),
        (0x1000, "assembly-and-test", ["cca.lifecycle_not_secured"]),
        (0x2010, "cca-platform-rot-provisioning", ["cca.lifecycle_not_secured"]),
        (0x4000, "non-cca-platform-rot-debug", ["cca.debug_enabled"]),
        (0x5001, "recoverable-cca-platform-rot-debug", ["cca.debug_enabled"]),
        (0x6000, "decommissioned", ["cca.lifecycle_not_secured"]),
    ],
)
def test_lifecycle_states(lifecycle: int, state: str, codes: list[str]) -> None:
    assert lifecycle_state(lifecycle) == state
    appraisal = _appraise(PLATFORM.token(CHALLENGE, lifecycle=lifecycle))
    assert _codes(appraisal) == codes and appraisal.verified
    assert appraisal.claims["platform_lifecycle_state"] == state
    assert appraisal.claims["debug"] is (codes == ["cca.debug_enabled"])
    if codes:
        assert appraisal.trust_vector["hardware"] == TV_CONTRAINDICATED
        policy = CcaPolicy(allowed_lifecycles=frozenset({"secured", state}))
        assert _appraise(PLATFORM.token(CHALLENGE, lifecycle=lifecycle), policy=policy).status is (
            Status.AFFIRMING
        )


@pytest.mark.parametrize("lifecycle", [0x7000, 0x00FF + 1, 0x10000, -1])
def test_undefined_lifecycles_are_schema_errors(lifecycle: int) -> None:
    assert lifecycle_state(lifecycle) is None
    assert _codes(_appraise(PLATFORM.token(CHALLENGE, lifecycle=lifecycle))) == [
        "cca.schema_invalid"
    ]


SCHEMA_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("no-profile", {"platform": {p.PROFILE: None}}, "profile"),
    ("no-instance-id", {"platform": {p.INSTANCE_ID: None}}, "instance id"),
    ("instance-id-type", {"platform": {p.INSTANCE_ID: b"\x02" + bytes(32)}}, "UEID"),
    ("implementation-id-31", {"platform": {p.IMPLEMENTATION_ID: bytes(31)}}, "implementation id"),
    ("platform-challenge-16", {"platform": {p.NONCE: bytes(16)}}, "challenge"),
    ("no-config", {"platform": {p.CONFIG: None}}, "config"),
    ("lifecycle-text", {"platform": {p.LIFECYCLE: "secured"}}, "lifecycle"),
    ("no-sw-components", {"platform": {p.SW_COMPONENTS: []}}, "software components"),
    ("sw-no-signer", {"platform": {p.SW_COMPONENTS: [{2: bytes(32)}]}}, "signer id"),
    (
        "sw-type-bytes",
        {"platform": {p.SW_COMPONENTS: [{1: b"x", 2: bytes(32), 5: bytes(32)}]}},
        "claim 1",
    ),
    ("sw-not-map", {"platform": {p.SW_COMPONENTS: [1]}}, "not a map"),
    ("no-hash-algo", {"platform": {p.HASH_ALGO: None}}, "hash algo"),
    ("service-bytes", {"platform": {p.VERIFICATION_SERVICE: b"x"}}, "verification service"),
    ("realm-challenge-32", {"realm": {p.NONCE: bytes(32)}}, "realm challenge"),
    ("no-perso", {"realm": {p.PERSONALIZATION: None}}, "personalization"),
    ("rim-20", {"realm": {p.REALM_RIM: bytes(20)}}, "initial measurement"),
    ("rems-3", {"realm": {p.REALM_REMS: [bytes(32)] * 3}}, "array of 4"),
    ("rem-size", {"realm": {p.REALM_REMS: [bytes(32)] * 3 + [bytes(1)]}}, "REM3"),
    ("rak-empty", {"realm": {p.REALM_PUBLIC_KEY: b""}}, "public key"),
    ("rak-hash-missing", {"realm": {p.REALM_PUBLIC_KEY_HASH_ALGO: None}}, "hash algo"),
    ("realm-profile-int", {"realm": {p.PROFILE: 5}}, "realm profile"),
]


@pytest.mark.parametrize(
    ("knobs", "fragment"), [c[1:] for c in SCHEMA_CASES], ids=[c[0] for c in SCHEMA_CASES]
)
def test_claim_schema_violations(knobs: dict[str, Any], fragment: str) -> None:
    appraisal = _appraise(PLATFORM.token(CHALLENGE, **knobs))
    assert _codes(appraisal) == ["cca.schema_invalid"]
    assert re.search(fragment, appraisal.reasons[0].message), appraisal.reasons[0].message
    assert appraisal.claims == {}


def test_unknown_claims_are_ignored_as_eat_requires() -> None:
    token = PLATFORM.token(CHALLENGE, platform={99999: "x"}, realm={"text-key": 1})
    assert _appraise(token).status is Status.AFFIRMING


@pytest.mark.parametrize(
    ("knobs", "code"),
    [
        ({"tagged": False}, "cca.cose_malformed"),
        ({"wrap": False}, "cca.token_malformed"),
        ({"collection": {1: b"x"}}, "cca.token_malformed"),
        ({"collection": {p.REALM_TOKEN: None}}, "cca.token_malformed"),
        ({"collection": {p.PLATFORM_TOKEN: b"\xa0"}}, "cca.cose_malformed"),
    ],
    ids=["untagged-cose", "unwrapped", "extra-entry", "no-realm", "platform-not-cose"],
)
def test_collection_structure(knobs: dict[str, Any], code: str) -> None:
    assert _codes(_appraise(PLATFORM.token(CHALLENGE, **knobs))) == [code]


def test_the_collection_must_be_tag_399() -> None:
    token = cbor2.loads(PLATFORM.token(CHALLENGE))
    assert _codes(_appraise(cbor2.dumps(dict(token.value)))) == ["cca.token_malformed"]
    other = cbor2.dumps(cbor2.CBORTag(18, dict(token.value)))
    assert _codes(_appraise(other)) == ["cca.token_malformed"]


def _jwk(**changes: Any) -> bytes:
    body = json.loads(jwk(PLATFORM.cpak.public_key()))
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


@pytest.mark.parametrize(
    ("blob", "fragment"),
    [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (_jwk(kty="RSA"), "kty"),
        (_jwk(crv="P-192"), "crv"),
        (_jwk(d="AAAA"), "private"),
        (_jwk(x=None), "x must be"),
        (_jwk(x=base64.urlsafe_b64encode(bytes(48)).decode() + "="), "unpadded"),
        (_jwk(x="!!!!"), "x must decode to 48 bytes|not base64url"),
        (_jwk(y=base64.urlsafe_b64encode(bytes(32)).decode().rstrip("=")), "48 bytes"),
        (_jwk(y=base64.urlsafe_b64encode(bytes(48)).decode().rstrip("=")), "not on"),
        (b" " * 9000, "larger"),
    ],
)
def test_cpak_jwk_validation(blob: bytes, fragment: str) -> None:
    with pytest.raises(ParseError, match=fragment) as info:
        parse_cpak(blob)
    assert info.value.reason == "cca.cpak_invalid"
    appraisal = _appraise(PLATFORM.token(CHALLENGE), collateral={"cpak.jwk.json": blob})
    assert _codes(appraisal) == ["cca.cpak_invalid"] and not appraisal.verified


def test_cpak_thumbprint_is_rfc_7638() -> None:
    # RFC 7638 section 3.1 hashes the required members in lexicographic order.
    body = json.loads(jwk(PLATFORM.cpak.public_key(), kid="ignored"))
    canonical = json.dumps({k: body[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"))
    expected = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=")
    assert parse_cpak(json.dumps(body).encode()).thumbprint == expected.decode()


def test_reference_value_policy() -> None:
    token = PLATFORM.token(CHALLENGE)
    claims = _appraise(token).claims
    good = CcaPolicy(
        allowed_realm_initial_measurements=frozenset({PLATFORM.initial_measurement}),
        allowed_realm_extensible_measurements={0: frozenset({bytes(64)})},
        allowed_personalization_values=frozenset({PLATFORM.personalization_value}),
        allowed_implementation_ids=frozenset({PLATFORM.implementation_id}),
        allowed_instance_ids=frozenset({PLATFORM.instance_id}),
        allowed_platform_profiles=frozenset({claims["platform_profile"]}),
        allowed_sw_measurements=frozenset(
            bytes.fromhex(c["measurement"]) for c in claims["platform_sw_components"]
        ),
    )
    appraisal = _appraise(token, policy=good)
    assert appraisal.status is Status.AFFIRMING
    assert appraisal.trust_vector["executables"] == TV_AFFIRMING
    other = bytes(64)
    bad = CcaPolicy(
        allowed_realm_initial_measurements=frozenset({other}),
        allowed_realm_extensible_measurements={3: frozenset({b"\x01" * 64})},
        allowed_personalization_values=frozenset({b"\x01" * 64}),
        allowed_implementation_ids=frozenset({bytes(32)}),
        allowed_instance_ids=frozenset({b"\x01" + bytes(32)}),
        allowed_platform_profiles=frozenset({"tag:example"}),
        allowed_sw_measurements=frozenset({bytes(32)}),
    )
    appraisal = _appraise(token, policy=bad)
    assert _codes(appraisal) == [
        "cca.rim_not_allowed",
        "cca.rem_not_allowed",
        "cca.personalization_value_not_allowed",
        "cca.implementation_id_not_allowed",
        "cca.instance_id_not_allowed",
        "cca.profile_not_allowed",
        "cca.sw_component_not_allowed",
    ]
    assert appraisal.trust_vector["executables"] == TV_CONTRAINDICATED
    assert appraisal.trust_vector["configuration"] == TV_CONTRAINDICATED


def test_policy_from_mapping() -> None:
    policy = CcaPolicy.from_mapping(
        {
            "allowed_lifecycles": ["secured", "non-cca-platform-rot-debug"],
            "allowed_realm_initial_measurements": ["00" * 64],
            "allowed_realm_extensible_measurements": {"1": ["11" * 32]},
        }
    )
    assert policy.allowed_realm_extensible_measurements == {1: frozenset({b"\x11" * 32})}
    bad_policies: list[dict[str, Any]] = [
        {"nope": []},
        {"allowed_lifecycles": ["insecure"]},
        {"allowed_realm_extensible_measurements": {"4": []}},
        {"allowed_instance_ids": ["zz"]},
    ]
    for bad in bad_policies:
        with pytest.raises(PolicyError, match="cca.policy_invalid"):
            CcaPolicy.from_mapping(bad)


_TOKEN = PLATFORM.token(CHALLENGE)


@settings(max_examples=250, deadline=None)
@given(st.integers(0, len(_TOKEN) - 1), st.integers(1, 255), st.integers(0, 20))
def test_appraise_never_raises_on_mutated_tokens(index: int, xor: int, cut: int) -> None:
    data = bytearray(_TOKEN)
    data[index] ^= xor
    appraisal = _appraise(bytes(data[: len(data) - cut]))
    assert appraisal.status is Status.CONTRAINDICATED
    assert not appraisal.verified or _codes(appraisal) == ["cca.report_data_mismatch"]


@settings(max_examples=250, deadline=None)
@given(st.binary(max_size=1024))
def test_appraise_never_raises_on_random_bytes(data: bytes) -> None:
    appraisal = _appraise(data)
    assert appraisal.status is Status.CONTRAINDICATED and not appraisal.verified


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_random_claim_maps_only_raise_parse_error(data: bytes) -> None:
    for parse in (p.parse_platform_claims, p.parse_realm_claims):
        try:
            parse(data)
        except ParseError as exc:
            assert exc.reason in ("cca.cose_malformed", "cca.schema_invalid")
