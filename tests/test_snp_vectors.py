"""Real SEV-SNP vectors, verified at their pinned time against the pinned AMD roots."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest

from services.testing.vectors import (
    Vector,
    iter_vectors,
    pick,
    roots_dir,
    vectors_root,
    verify_options,
)
from services.verifier.families.base import Status
from services.verifier.families.snp import SnpVerifier, encode_report, parse_report
from services.verifier.families.snp.certtable import VCEK_GUID, VLEK_GUID, encode_cert_table
from services.verifier.families.snp.parse import REPORT_SIZE
from services.verifier.trust import TrustStore

pytestmark = [
    pytest.mark.vectors,
    pytest.mark.skipif(
        vectors_root() is None or roots_dir() is None,
        reason="shared vectors not found: set ATTESTMESH_VECTORS or provide ../shared/vectors",
    ),
]

VECTORS = list(iter_vectors("snp")) if vectors_root() is not None else []
BY_ID = {v.id: v for v in VECTORS}


def test_every_vector_family_is_present() -> None:
    assert {v.kind for v in VECTORS} == {"positive", "negative"}


@pytest.mark.parametrize("vector", VECTORS, ids=[v.id for v in VECTORS])
def test_vector_verifies_as_expected(vector: Vector, store: TrustStore) -> None:
    appraisal = SnpVerifier().appraise(vector.evidence, verify_options(vector, store))
    expect = vector.expect
    assert appraisal.status == Status(expect["status"]), appraisal.reasons
    assert appraisal.verified is expect["verifies"]
    for name, value in expect["claims"].items():
        assert appraisal.claims[name] == value, name
    if expect["verifies"]:
        assert appraisal.claims["trust_anchor"] == "amd:milan"
        assert appraisal.claims["debug"] is expect["debug"]
    if expect["status"] == "contraindicated":
        assert appraisal.reasons


@pytest.mark.parametrize("vector", VECTORS, ids=[v.id for v in VECTORS])
def test_real_reports_roundtrip_through_the_encoder(vector: Vector) -> None:
    report = parse_report(vector.evidence)
    assert encode_report(report) == vector.evidence


@pytest.mark.parametrize("vector_id", ["snp-trustee-milan-vcek-v2", "snp-trustee-milan-vlek-v3"])
def test_every_byte_flip_of_the_report_is_contraindicated(
    vector_id: str, store: TrustStore
) -> None:
    vector = pick(BY_ID, vector_id)
    options = verify_options(vector, store)
    verifier = SnpVerifier()
    assert verifier.appraise(vector.evidence, options).status is Status.AFFIRMING
    accepted = []
    for offset in range(REPORT_SIZE):
        flipped = bytearray(vector.evidence)
        flipped[offset] ^= 0x01
        appraisal = verifier.appraise(bytes(flipped), options)
        if appraisal.status is not Status.CONTRAINDICATED or appraisal.verified:
            accepted.append(offset)
    assert accepted == []


@pytest.mark.parametrize(
    ("vector_id", "reason"),
    [
        ("snp-trustee-milan-vcek-v2", "snp.vcek_chain_invalid"),
        ("snp-trustee-milan-vlek-v3", "snp.vlek_chain_invalid"),
    ],
)
def test_every_byte_flip_of_the_vek_signature_breaks_the_chain(
    vector_id: str, reason: str, store: TrustStore
) -> None:
    vector = pick(BY_ID, vector_id)
    ((name, der),) = vector.collateral.items()
    verifier = SnpVerifier()
    signature_size = 512
    for offset in range(len(der) - signature_size, len(der)):
        flipped = bytearray(der)
        flipped[offset] ^= 0x01
        appraisal = verifier.appraise(
            vector.evidence, verify_options(vector, store, collateral={name: bytes(flipped)})
        )
        assert appraisal.status is Status.CONTRAINDICATED and not appraisal.verified
        assert [r.code for r in appraisal.reasons] == [reason], offset


def test_every_byte_flip_of_the_vcek_is_contraindicated(store: TrustStore) -> None:
    vector = pick(BY_ID, "snp-trustee-milan-vcek-v2")
    der = vector.collateral["vcek.der"]
    verifier = SnpVerifier()
    for offset in range(len(der)):
        flipped = bytearray(der)
        flipped[offset] ^= 0x80
        appraisal = verifier.appraise(
            vector.evidence, verify_options(vector, store, collateral={"vcek.der": bytes(flipped)})
        )
        assert appraisal.status is Status.CONTRAINDICATED and not appraisal.verified, offset


@pytest.mark.parametrize(
    ("vector_id", "guid"),
    [("snp-trustee-milan-vcek-v2", VCEK_GUID), ("snp-trustee-milan-vlek-v3", VLEK_GUID)],
)
def test_vek_from_an_attached_certificate_table(
    vector_id: str, guid: uuid.UUID, store: TrustStore
) -> None:
    vector = pick(BY_ID, vector_id)
    (der,) = vector.collateral.values()
    evidence = vector.evidence + encode_cert_table([(guid, der)])
    appraisal = SnpVerifier().appraise(evidence, verify_options(vector, store, collateral={}))
    assert appraisal.status is Status.AFFIRMING and appraisal.verified
    assert any(c.name == "vek" and "certificate table" in c.detail for c in appraisal.checks)


def test_binding_on_a_real_report(store: TrustStore) -> None:
    vector = pick(BY_ID, "snp-trustee-milan-vcek-v2")
    report_data = bytes.fromhex(vector.expect["claims"]["report_data"])
    bound = SnpVerifier().appraise(
        vector.evidence, verify_options(vector, store, expected_report_data=report_data)
    )
    assert bound.status is Status.AFFIRMING
    other = bytes(64)
    unbound = SnpVerifier().appraise(
        vector.evidence, verify_options(vector, store, expected_report_data=other)
    )
    assert [r.code for r in unbound.reasons] == ["snp.report_data_mismatch"]
    assert unbound.status is Status.CONTRAINDICATED and unbound.verified


def test_vlek_outside_its_one_year_validity(store: TrustStore) -> None:
    vector = pick(BY_ID, "snp-trustee-milan-vlek-v3")
    later = vector.at + timedelta(days=365)
    appraisal = SnpVerifier().appraise(vector.evidence, verify_options(vector, store, now=later))
    assert [r.code for r in appraisal.reasons] == ["snp.cert_expired"]
    earlier = datetime.fromisoformat("2024-06-01T00:00:00+00:00")
    appraisal = SnpVerifier().appraise(vector.evidence, verify_options(vector, store, now=earlier))
    assert [r.code for r in appraisal.reasons] == ["snp.cert_not_yet_valid"]


def test_no_anchor_without_roots() -> None:
    vector = pick(BY_ID, "snp-trustee-milan-vcek-v2")
    appraisal = SnpVerifier().appraise(vector.evidence, verify_options(vector, TrustStore()))
    assert [r.code for r in appraisal.reasons] == ["snp.no_trust_anchor"]
    assert appraisal.trust_vector["hardware"] == 96
