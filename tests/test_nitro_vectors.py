"""Real AWS Nitro attestation documents, verified at their pinned time against the pinned root."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import cbor2
import pytest

from services.testing.nitro_pki import NitroTestPki
from services.testing.vectors import (
    Vector,
    iter_vectors,
    pick,
    roots_dir,
    vectors_root,
    verify_options,
)
from services.verifier.families.base import TV_AFFIRMING, TV_CONTRAINDICATED, Status, VerifyOptions
from services.verifier.families.nitro import NitroPolicy, NitroVerifier, parse_document
from services.verifier.trust import TrustStore

pytestmark = [
    pytest.mark.vectors,
    pytest.mark.skipif(
        vectors_root() is None or roots_dir() is None,
        reason="shared vectors not found: set ATTESTMESH_VECTORS or provide ../shared/vectors",
    ),
]

VECTORS = list(iter_vectors("nitro")) if vectors_root() is not None else []
BY_ID = {v.id: v for v in VECTORS}
BASE = "nitro-base-2024-11-30"


def _codes(evidence: bytes, options: VerifyOptions, **kwargs: object) -> list[str]:
    appraisal = NitroVerifier(**kwargs).appraise(evidence, options)  # type: ignore[arg-type]
    return [r.code for r in appraisal.reasons]


def test_positive_and_negative_vectors_are_present() -> None:
    assert {v.kind for v in VECTORS} == {"positive", "negative"}


@pytest.mark.parametrize("vector", VECTORS, ids=[v.id for v in VECTORS])
def test_vector_verifies_as_expected(vector: Vector, store: TrustStore) -> None:
    appraisal = NitroVerifier().appraise(vector.evidence, verify_options(vector, store))
    expect = vector.expect
    assert appraisal.status == Status(expect["status"]), appraisal.reasons
    assert appraisal.verified is expect["verifies"]
    for name, value in expect["claims"].items():
        assert appraisal.claims[name] == value, name
    if expect["verifies"]:
        assert appraisal.claims["trust_anchor"] == "aws:nitro_root_g1"
        assert appraisal.claims["debug"] is expect["debug"]
        leaf_window = [appraisal.claims["certificate"][k] for k in ("not_before", "not_after")]
        assert [t.replace("Z", "+00:00") for t in leaf_window] == vector.meta["checks"][
            "leaf_validity"
        ]
    if expect["status"] == "contraindicated":
        assert appraisal.reasons
    if expect["debug"]:
        assert [r.code for r in appraisal.reasons] == ["nitro.debug_enabled"]
        assert appraisal.trust_vector["runtime-opaque"] == TV_CONTRAINDICATED


def test_debug_vectors_pass_when_debug_is_allowed(store: TrustStore) -> None:
    for vector in VECTORS:
        if vector.expect["debug"] and vector.expect["verifies"]:
            policy = NitroPolicy(allow_debug=True)
            appraisal = NitroVerifier(policy).appraise(
                vector.evidence, verify_options(vector, store)
            )
            assert appraisal.status is Status.AFFIRMING, vector.id


def test_self_signed_document_without_cabundle_is_refused(store: TrustStore) -> None:
    vector = pick(BY_ID, "nitro-blocky-selfsigned-NEG")
    appraisal = NitroVerifier().appraise(vector.evidence, verify_options(vector, store))
    assert appraisal.status is Status.CONTRAINDICATED and not appraisal.verified
    assert [r.code for r in appraisal.reasons] == ["nitro.cose_malformed"]


def _regions(evidence: bytes) -> dict[str, range]:
    """Byte ranges of the protected header, payload and signature inside the COSE array."""
    signed = parse_document(evidence).cose
    out = {}
    for name, value in (
        ("protected", signed.protected),
        ("payload", signed.payload),
        ("signature", signed.signature),
    ):
        start = evidence.index(cbor2.dumps(value))
        out[name] = range(start, start + len(cbor2.dumps(value)))
    return out


@pytest.mark.parametrize(("region", "stride"), [("protected", 1), ("signature", 1), ("payload", 3)])
def test_byte_flips_of_every_signed_region_are_contraindicated(
    region: str, stride: int, store: TrustStore
) -> None:
    vector = pick(BY_ID, BASE)
    options = verify_options(vector, store)
    verifier = NitroVerifier()
    assert verifier.appraise(vector.evidence, options).status is Status.AFFIRMING
    accepted = []
    offsets = _regions(vector.evidence)[region]
    for offset in offsets[::stride]:
        flipped = bytearray(vector.evidence)
        flipped[offset] ^= 0x01
        appraisal = verifier.appraise(bytes(flipped), options)
        if appraisal.status is not Status.CONTRAINDICATED or appraisal.verified:
            accepted.append(offset)
    assert accepted == []


def test_tagged_form_of_a_real_document_verifies(store: TrustStore) -> None:
    vector = pick(BY_ID, BASE)
    tagged = cbor2.dumps(cbor2.CBORTag(18, cbor2.loads(vector.evidence)))
    appraisal = NitroVerifier().appraise(tagged, verify_options(vector, store))
    assert appraisal.status is Status.AFFIRMING and appraisal.verified


def test_outside_the_three_hour_leaf_window(store: TrustStore) -> None:
    vector = pick(BY_ID, BASE)
    later = _codes(
        vector.evidence, verify_options(vector, store, now=vector.at + timedelta(hours=2))
    )
    assert later == ["nitro.cert_expired"]
    earlier = vector.at - timedelta(hours=2)
    codes = _codes(
        vector.evidence, verify_options(vector, store, now=earlier), policy=NitroPolicy()
    )
    assert codes == ["nitro.cert_not_yet_valid", "nitro.timestamp_in_future"]


def test_document_age_policy(store: TrustStore) -> None:
    vector = pick(BY_ID, BASE)
    policy = NitroPolicy(max_document_age=timedelta(minutes=30))
    assert _codes(vector.evidence, verify_options(vector, store), policy=policy) == [
        "nitro.document_too_old"
    ]


def test_no_trust_anchor(store: TrustStore, tmp_path: Path) -> None:
    vector = pick(BY_ID, BASE)
    appraisal = NitroVerifier().appraise(vector.evidence, verify_options(vector, TrustStore()))
    assert [r.code for r in appraisal.reasons] == ["nitro.no_trust_anchor"]
    assert appraisal.trust_vector["hardware"] == TV_CONTRAINDICATED
    test_roots = NitroTestPki(now=vector.at).write_trust_dir(tmp_path)
    foreign = TrustStore.load(None, test_dir=test_roots)
    assert _codes(vector.evidence, verify_options(vector, foreign)) == ["nitro.no_trust_anchor"]


def test_binding_is_user_data(store: TrustStore) -> None:
    vector = pick(BY_ID, "nitro-evervault-ga")
    user_data = bytes.fromhex(vector.expect["claims"]["user_data"])
    policy = NitroPolicy(allow_debug=True)
    bound = NitroVerifier(policy).appraise(
        vector.evidence, verify_options(vector, store, expected_report_data=user_data)
    )
    assert bound.status is Status.AFFIRMING
    assert bound.trust_vector["instance-identity"] == TV_AFFIRMING
    unbound = NitroVerifier(policy).appraise(
        vector.evidence, verify_options(vector, store, expected_report_data=bytes(64))
    )
    assert [r.code for r in unbound.reasons] == ["nitro.report_data_mismatch"]
    assert unbound.verified and unbound.trust_vector["instance-identity"] == TV_CONTRAINDICATED
    no_user_data = pick(BY_ID, "nitro-evervault-beta-nondebug-bytes")
    codes = _codes(
        no_user_data.evidence, verify_options(no_user_data, store, expected_report_data=bytes(64))
    )
    assert codes == ["nitro.report_data_mismatch"]


def test_pcr_allow_list_on_a_real_document(store: TrustStore) -> None:
    vector = pick(BY_ID, BASE)
    pcr0 = bytes.fromhex(vector.expect["claims"]["pcr0"])
    allowed = NitroPolicy(allowed_pcrs={0: frozenset({pcr0}), 8: frozenset({bytes(48)})})
    appraisal = NitroVerifier(allowed).appraise(vector.evidence, verify_options(vector, store))
    assert appraisal.status is Status.AFFIRMING
    assert appraisal.trust_vector["executables"] == TV_AFFIRMING
    refused = NitroPolicy(allowed_pcrs={2: frozenset({bytes(48)}), 20: frozenset({bytes(48)})})
    appraisal = NitroVerifier(refused).appraise(vector.evidence, verify_options(vector, store))
    assert [r.code for r in appraisal.reasons] == ["nitro.pcr_not_allowed"] * 2
    assert appraisal.trust_vector["executables"] == TV_CONTRAINDICATED
