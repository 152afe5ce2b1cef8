"""Nitro verification against the test PKI: each chain override and schema violation gives its
reason; policy knobs; the user_data binding; appraise never raises."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.mesh.errors import ParseError, PolicyError
from services.testing.amd_pki import ec_key
from services.testing.nitro_pki import CertOverride, NitroTestPki, TestEnclave
from services.verifier.families import cose
from services.verifier.families.base import (
    TRUST_CLAIMS,
    TV_AFFIRMING,
    TV_CONTRAINDICATED,
    TV_NO_CLAIM,
    Appraisal,
    Status,
    VerifyOptions,
)
from services.verifier.families.nitro import NitroPolicy, NitroVerifier, parse_payload
from services.verifier.trust import TrustStore

NOW = datetime(2025, 3, 1, 12, tzinfo=UTC)
BINDING = bytes(range(64))


@pytest.fixture(scope="module")
def pki() -> NitroTestPki:
    return NitroTestPki(now=NOW)


@pytest.fixture(scope="module")
def enclave(pki: NitroTestPki) -> TestEnclave:
    return pki.enclave()


def _appraise(
    document: bytes,
    store: TrustStore,
    *,
    policy: NitroPolicy | None = None,
    now: datetime = NOW,
    expected: bytes | None = BINDING,
) -> Appraisal:
    options = VerifyOptions(now=now, trust=store, expected_report_data=expected)
    return NitroVerifier(policy).appraise(document, options)


def _codes(appraisal: Appraisal) -> list[str]:
    return [r.code for r in appraisal.reasons]


def test_a_good_document_is_affirming(pki: NitroTestPki, enclave: TestEnclave) -> None:
    appraisal = _appraise(enclave.document(user_data=BINDING), pki.trust_store())
    assert appraisal.status is Status.AFFIRMING and appraisal.verified
    assert set(appraisal.trust_vector) == set(TRUST_CLAIMS)
    assert appraisal.trust_vector["hardware"] == TV_AFFIRMING
    assert appraisal.trust_vector["instance-identity"] == TV_AFFIRMING
    assert appraisal.trust_vector["executables"] == TV_NO_CLAIM
    claims = appraisal.claims
    assert claims["trust_anchor"] == "test:aws:nitro_root_g1"
    assert claims["module_id"] == enclave.module_id
    assert claims["timestamp"] == "2025-03-01T12:00:00.000Z"
    assert claims["timestamp_ms"] == int(NOW.timestamp() * 1000)
    assert claims["user_data"] == BINDING.hex() and claims["nonce"] is None
    assert claims["pcr0"] == enclave.pcrs[0].hex() and claims["pcr8"] == bytes(48).hex()
    assert set(claims["pcrs"]) == {str(i) for i in range(16)}
    assert claims["debug"] is False
    assert appraisal.to_json()["status"] == "affirming"


def test_the_test_root_loads_from_a_trust_directory(pki: NitroTestPki, tmp_path: Path) -> None:
    store = TrustStore.load(None, test_dir=pki.write_trust_dir(tmp_path))
    assert _appraise(pki.enclave().document(user_data=BINDING), store).status is Status.AFFIRMING


def test_nonce_and_public_key_are_claims(pki: NitroTestPki, enclave: TestEnclave) -> None:
    document = enclave.document(user_data=BINDING, nonce=b"n" * 32, public_key=b"k" * 91)
    policy = NitroPolicy(require_nonce=True, require_public_key=True)
    appraisal = _appraise(document, pki.trust_store(), policy=policy)
    assert appraisal.status is Status.AFFIRMING
    assert appraisal.claims["nonce"] == (b"n" * 32).hex()
    assert appraisal.claims["public_key"] == (b"k" * 91).hex()
    bare = _appraise(enclave.document(user_data=BINDING), pki.trust_store(), policy=policy)
    assert _codes(bare) == ["nitro.nonce_missing", "nitro.public_key_missing"]
    assert bare.trust_vector["instance-identity"] == TV_CONTRAINDICATED


CHAIN_CASES: list[tuple[str, dict[str, CertOverride], list[str]]] = [
    ("root-expired", {"root": CertOverride(expired=True)}, ["nitro.cert_expired"]),
    ("regional-expired", {"regional": CertOverride(expired=True)}, ["nitro.cert_expired"]),
    (
        "zonal-not-yet-valid",
        {"zonal": CertOverride(not_yet_valid=True)},
        ["nitro.cert_not_yet_valid"],
    ),
    ("instance-expired", {"instance": CertOverride(expired=True)}, ["nitro.cert_expired"]),
    (
        "leaf-expired",
        {"leaf": CertOverride(expired=True)},
        ["nitro.cert_expired", "nitro.timestamp_outside_leaf_validity"],
    ),
    (
        "leaf-not-yet-valid",
        {"leaf": CertOverride(not_yet_valid=True)},
        ["nitro.cert_not_yet_valid", "nitro.timestamp_outside_leaf_validity"],
    ),
    ("root-wrong-key", {"root": CertOverride(wrong_key=True)}, ["nitro.chain_invalid"]),
    (
        "regional-wrong-issuer",
        {"regional": CertOverride(wrong_issuer=True)},
        ["nitro.chain_invalid"],
    ),
    ("zonal-wrong-issuer", {"zonal": CertOverride(wrong_issuer=True)}, ["nitro.chain_invalid"]),
    ("instance-wrong-key", {"instance": CertOverride(wrong_key=True)}, ["nitro.chain_invalid"]),
    ("leaf-wrong-issuer", {"leaf": CertOverride(wrong_issuer=True)}, ["nitro.chain_invalid"]),
    ("leaf-wrong-key", {"leaf": CertOverride(wrong_key=True)}, ["nitro.signature_invalid"]),
    (
        "leaf-issuer-name",
        {"leaf": CertOverride(issuer_name="someone else")},
        ["nitro.chain_invalid"],
    ),
    ("zonal-not-ca", {"zonal": CertOverride(not_ca=True)}, ["nitro.chain_invalid"]),
    (
        "instance-no-cert-sign",
        {"instance": CertOverride(no_cert_sign=True)},
        ["nitro.chain_invalid"],
    ),
    ("regional-path-length", {"regional": CertOverride(path_length=1)}, ["nitro.chain_invalid"]),
    ("zonal-sha256", {"zonal": CertOverride(sha256=True)}, ["nitro.chain_invalid"]),
    ("leaf-is-ca", {"leaf": CertOverride(not_ca=True)}, ["nitro.chain_invalid"]),
    (
        "leaf-no-digital-signature",
        {"leaf": CertOverride(no_cert_sign=True)},
        ["nitro.chain_invalid"],
    ),
    ("leaf-p256", {"leaf": CertOverride(p256=True)}, ["nitro.signing_key_invalid"]),
]


@pytest.mark.parametrize(
    ("overrides", "expected"), [c[1:] for c in CHAIN_CASES], ids=[c[0] for c in CHAIN_CASES]
)
def test_each_broken_certificate_gives_its_reason(
    overrides: dict[str, CertOverride], expected: list[str]
) -> None:
    chain: dict[str, Any] = dict(overrides)
    leaf = chain.pop("leaf", CertOverride())
    pki = NitroTestPki(now=NOW, **chain)
    appraisal = _appraise(pki.enclave(leaf=leaf).document(user_data=BINDING), pki.trust_store())
    assert _codes(appraisal) == expected
    assert appraisal.status is Status.CONTRAINDICATED and not appraisal.verified
    assert appraisal.trust_vector["hardware"] == TV_CONTRAINDICATED


def test_a_root_copy_with_the_same_key_is_the_anchor(enclave: TestEnclave) -> None:
    """Processes of one deployment each re-sign the test root; the key is what is trusted."""
    other = NitroTestPki(now=NOW + timedelta(minutes=1))
    assert other.cabundle[0] != enclave.cabundle[0]
    assert _appraise(enclave.document(user_data=BINDING), other.trust_store()).verified


def test_a_foreign_bundle_root_is_no_anchor(pki: NitroTestPki, enclave: TestEnclave) -> None:
    """A bundle whose root has the right name but another key is not the anchor."""
    forged = NitroTestPki(now=NOW, root=CertOverride(wrong_key=True)).cabundle[0]
    document = enclave.document(user_data=BINDING, cabundle=[forged, *enclave.cabundle[1:]])
    assert _codes(_appraise(document, pki.trust_store())) == ["nitro.no_trust_anchor"]


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        (NOW - timedelta(hours=1), ["nitro.timestamp_outside_leaf_validity"]),
        (
            NOW + timedelta(hours=3),
            ["nitro.timestamp_outside_leaf_validity", "nitro.timestamp_in_future"],
        ),
        (NOW + timedelta(hours=1), ["nitro.timestamp_in_future"]),
        (NOW + timedelta(minutes=4), []),
    ],
    ids=["before-leaf", "after-leaf", "future", "small-skew"],
)
def test_timestamp_against_the_leaf_window(
    pki: NitroTestPki, enclave: TestEnclave, stamp: datetime, expected: list[str]
) -> None:
    document = enclave.document(user_data=BINDING, timestamp=stamp)
    assert _codes(_appraise(document, pki.trust_store())) == expected


def test_signature_and_algorithm(pki: NitroTestPki, enclave: TestEnclave) -> None:
    other_key = enclave.document(user_data=BINDING)
    forged = cose.sign_sign1(
        cose.parse_sign1(other_key, family="t", max_size=1 << 15).payload, ec_key("nitro:forger")
    )
    assert _codes(_appraise(forged, pki.trust_store())) == ["nitro.signature_invalid"]
    es256 = enclave.document(user_data=BINDING, protected={1: -7})
    assert _codes(_appraise(es256, pki.trust_store())) == ["nitro.unsupported_algorithm"]
    tagged = enclave.document(user_data=BINDING, tagged=True)
    assert _appraise(tagged, pki.trust_store()).status is Status.AFFIRMING


def test_binding_mismatch_keeps_the_document_verified(
    pki: NitroTestPki, enclave: TestEnclave
) -> None:
    document = enclave.document(user_data=bytes(64))
    appraisal = _appraise(document, pki.trust_store())
    assert _codes(appraisal) == ["nitro.report_data_mismatch"]
    assert appraisal.verified and appraisal.trust_vector["instance-identity"] == TV_CONTRAINDICATED
    assert _appraise(document, pki.trust_store(), expected=None).status is Status.AFFIRMING
    short = enclave.document(user_data=BINDING[:32])
    assert "32 bytes, expected 64" in _appraise(short, pki.trust_store()).reasons[0].message


def test_debug_enclave_and_policy_knobs(pki: NitroTestPki, enclave: TestEnclave) -> None:
    pcrs = dict(enclave.pcrs) | {0: bytes(48), 1: bytes(48), 2: bytes(48)}
    debug = enclave.document(user_data=BINDING, pcrs=pcrs)
    appraisal = _appraise(debug, pki.trust_store())
    assert _codes(appraisal) == ["nitro.debug_enabled"] and appraisal.claims["debug"] is True
    assert appraisal.trust_vector["configuration"] == TV_CONTRAINDICATED
    allowed = _appraise(debug, pki.trust_store(), policy=NitroPolicy(allow_debug=True))
    assert allowed.status is Status.AFFIRMING
    no_test = NitroPolicy(allow_test_anchor=False)
    good = enclave.document(user_data=BINDING)
    assert _codes(_appraise(good, pki.trust_store(), policy=no_test)) == [
        "nitro.test_anchor_not_allowed"
    ]


def test_policy_from_mapping() -> None:
    policy = NitroPolicy.from_mapping(
        {"allow_debug": True, "allowed_pcrs": {"0": ["00" * 48]}, "max_document_age": 60}
    )
    assert policy.allowed_pcrs == {0: frozenset({bytes(48)})}
    assert policy.max_document_age == timedelta(seconds=60)
    for bad in (
        {"nope": 1},
        {"allowed_pcrs": {"40": ["00" * 48]}},
        {"allowed_pcrs": {"0": ["0"]}},
        {"require_nonce": "yes"},
    ):
        with pytest.raises(PolicyError, match="nitro.policy_invalid"):
            NitroPolicy.from_mapping(bad)


def _payload(enclave: TestEnclave, **fields: Any) -> dict[str, Any]:
    document = cbor2.loads(enclave.document(user_data=BINDING))
    payload: dict[str, Any] = cbor2.loads(document[2])
    payload.update(fields)
    return payload


SCHEMA_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("empty-module-id", {"module_id": ""}, "module_id"),
    ("module-id-bytes", {"module_id": b"x"}, "module_id"),
    ("digest-sha256", {"digest": "SHA256"}, "digest"),
    ("timestamp-zero", {"timestamp": 0}, "timestamp"),
    ("timestamp-text", {"timestamp": "now"}, "timestamp"),
    ("timestamp-negative", {"timestamp": -5}, "timestamp"),
    ("timestamp-uint64-max", {"timestamp": 2**64 - 1}, "timestamp"),
    ("pcrs-empty", {"pcrs": {}}, "pcrs"),
    ("pcrs-33", {"pcrs": {i: bytes(48) for i in range(32)} | {32: bytes(48)}}, "pcrs"),
    ("pcr-index-32", {"pcrs": {32: bytes(48)}}, "index"),
    ("pcr-index-text", {"pcrs": {"0": bytes(48)}}, "index"),
    ("pcr-size-20", {"pcrs": {0: bytes(20)}}, "PCR0"),
    ("certificate-null", {"certificate": None}, "mandatory"),
    ("certificate-large", {"certificate": bytes(1025)}, "certificate"),
    ("cabundle-empty", {"cabundle": []}, "cabundle"),
    ("cabundle-null", {"cabundle": None}, "mandatory"),
    ("cabundle-entry-empty", {"cabundle": [b""]}, "cabundle[0]"),
    ("public-key-empty", {"public_key": b""}, "public_key"),
    ("user-data-1025", {"user_data": bytes(1025)}, "user_data"),
    ("nonce-text", {"nonce": "abc"}, "nonce"),
    ("unknown-field", {"extra": 1}, "extra"),
]


@pytest.mark.parametrize(
    ("fields", "fragment"), [c[1:] for c in SCHEMA_CASES], ids=[c[0] for c in SCHEMA_CASES]
)
def test_schema_violations(
    enclave: TestEnclave, pki: NitroTestPki, fields: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ParseError, match=re.escape(fragment)) as info:
        parse_payload(cbor2.dumps(_payload(enclave, **fields)))
    assert info.value.reason == "nitro.schema_invalid"
    document = enclave.document(user_data=BINDING, fields=fields)
    appraisal = _appraise(document, pki.trust_store())
    assert _codes(appraisal) == ["nitro.schema_invalid"] and appraisal.claims == {}


def test_size_limits_accept_the_largest_fields(pki: NitroTestPki, enclave: TestEnclave) -> None:
    big = bytes(1024)
    document = enclave.document(user_data=big, nonce=big, public_key=big)
    assert _appraise(document, pki.trust_store(), expected=None).status is Status.AFFIRMING
    missing = enclave.document(drop=("nonce", "public_key", "user_data"))
    assert _appraise(missing, pki.trust_store(), expected=None).status is Status.AFFIRMING


_DOCUMENT = NitroTestPki(now=NOW).enclave().document(user_data=BINDING)


@settings(max_examples=250, deadline=None)
@given(st.integers(0, len(_DOCUMENT) - 1), st.integers(1, 255), st.integers(0, 40))
def test_appraise_never_raises_on_mutated_documents(index: int, xor: int, cut: int) -> None:
    data = bytearray(_DOCUMENT)
    data[index] ^= xor
    mutated = bytes(data[: len(data) - cut])
    store = NitroTestPki(now=NOW).trust_store()
    appraisal = _appraise(mutated, store)
    assert appraisal.status is Status.CONTRAINDICATED
    assert not appraisal.verified or _codes(appraisal) == ["nitro.report_data_mismatch"]


@settings(max_examples=250, deadline=None)
@given(st.binary(max_size=2048))
def test_appraise_never_raises_on_random_bytes(data: bytes) -> None:
    appraisal = _appraise(data, TrustStore())
    assert appraisal.status is Status.CONTRAINDICATED and not appraisal.verified


_FIELD_VALUES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.binary(max_size=64)
    | st.text(max_size=8)
    | st.lists(st.binary(max_size=8), max_size=3)
    | st.dictionaries(st.integers(-2, 40) | st.text(max_size=2), st.binary(max_size=70), max_size=4)
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "module_id",
                "digest",
                "timestamp",
                "pcrs",
                "certificate",
                "cabundle",
                "public_key",
                "user_data",
                "nonce",
                "other",
            ]
        ),
        _FIELD_VALUES,
        max_size=10,
    )
)
def test_random_payload_maps_only_raise_parse_error(payload: dict[str, Any]) -> None:
    try:
        document = parse_payload(cbor2.dumps(payload))
    except ParseError as exc:
        assert exc.reason in ("nitro.schema_invalid", "nitro.cose_malformed")
        return
    assert document.timestamp.year <= 9999 and 1 <= len(document.pcrs) <= 32
