"""Real Azure SEV-SNP CVM evidence (trustee's v0/v1 samples) at its `at`, and every tamper."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from services.testing.vectors import (
    Vector,
    iter_vectors,
    pick,
    roots_dir,
    vectors_root,
    verify_options,
)
from services.verifier.families.azure import AzSnpVtpmVerifier, AzTdxVtpmVerifier
from services.verifier.families.azure.hcl import (
    HEADER_SIZE,
    VARIABLE_DATA_OFFSET,
    parse_hcl_report,
)
from services.verifier.families.base import Status
from services.verifier.families.tpm import TpmPolicy
from services.verifier.trust import TrustStore

pytestmark = [
    pytest.mark.vectors,
    pytest.mark.skipif(
        vectors_root() is None or roots_dir() is None,
        reason="shared vectors not found: set ATTESTMESH_VECTORS or provide ../shared/vectors",
    ),
]

VECTORS = list(iter_vectors("az-snp-vtpm")) if vectors_root() is not None else []
BY_ID = {v.id: v for v in VECTORS}
RAW = "azsnp-trustee-hcl-report-raw"
V1 = "azsnp-trustee-evidence-v1"
SNP_SIGNED = 0x2A0


def _document(vector: Vector) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(vector.evidence)
    return document


def _encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def test_every_kind_is_present() -> None:
    assert {v.kind for v in VECTORS} == {"positive", "negative"}


@pytest.mark.parametrize("vector", VECTORS, ids=[v.id for v in VECTORS])
def test_vector_verifies_as_expected(vector: Vector, store: TrustStore) -> None:
    appraisal = AzSnpVtpmVerifier().appraise(vector.evidence, verify_options(vector, store))
    expect = vector.expect
    assert appraisal.status == Status(expect["status"]), appraisal.reasons
    assert appraisal.verified is expect["verifies"]
    for name, value in expect["claims"].items():
        assert appraisal.claims[name] == value, name
    if expect["verifies"]:
        assert appraisal.claims["trust_anchor"] == "amd:milan"
        assert appraisal.claims["debug"] is expect["debug"]
        assert appraisal.claims["vmpl"] == 0
        assert len(appraisal.claims["hcl_ak_sha256"]) == 64
        assert appraisal.claims["vm_configuration"]["secure-boot"] is True
    else:
        assert appraisal.reasons


@pytest.mark.parametrize(
    ("vector_id", "code"),
    [
        ("azsnp-trustee-hcl-report-raw-neg-akpub-byte-zeroed", "az.runtime_data_invalid"),
        ("azsnp-trustee-hcl-report-raw-neg-snp-svn-zeroed", "snp.report_signature_invalid"),
        ("azsnp-trustee-hcl-report-raw-neg-tpm-sig-byte0", "tpm.signature_invalid"),
        ("azsnp-trustee-hcl-report-raw-neg-vardata-byte", "az.runtime_data_mismatch"),
    ],
)
def test_negative_vectors_name_their_reason(vector_id: str, code: str, store: TrustStore) -> None:
    negatives = {v.id: v for v in VECTORS if v.kind == "negative"}
    if vector_id not in negatives:
        pytest.fail(f"vector {vector_id} is missing from the shared vectors this suite pins")
    vector = negatives[vector_id]
    appraisal = AzSnpVtpmVerifier().appraise(vector.evidence, verify_options(vector, store))
    assert code in [r.code for r in appraisal.reasons]


def test_nonce_binding_in_the_vtpm_quote(store: TrustStore) -> None:
    vector = pick(BY_ID, V1)
    verifier = AzSnpVtpmVerifier()
    bound = verifier.appraise(
        vector.evidence, verify_options(vector, store, expected_report_data=b"challenge")
    )
    assert bound.status is Status.AFFIRMING and bound.claims["nonce"] == b"challenge".hex()
    padded = verifier.appraise(
        vector.evidence,
        verify_options(vector, store, expected_report_data=b"challenge".ljust(64, b"\0")),
    )
    assert padded.status is Status.AFFIRMING
    wrong = verifier.appraise(
        vector.evidence, verify_options(vector, store, expected_report_data=b"other")
    )
    assert [r.code for r in wrong.reasons] == ["tpm.nonce_mismatch"]
    assert wrong.status is Status.CONTRAINDICATED and wrong.verified
    assert wrong.trust_vector["instance-identity"] == 96


def test_every_byte_flip_of_the_signed_snp_region(store: TrustStore) -> None:
    vector = pick(BY_ID, RAW)
    document = _document(vector)
    hcl = base64.urlsafe_b64decode(document["hcl_report"])
    options = verify_options(vector, store)
    verifier = AzSnpVtpmVerifier()
    accepted = []
    for offset in range(HEADER_SIZE, HEADER_SIZE + SNP_SIGNED):
        flipped = bytearray(hcl)
        flipped[offset] ^= 0x01
        document["hcl_report"] = base64.urlsafe_b64encode(bytes(flipped)).decode()
        appraisal = verifier.appraise(_encode(document), options)
        if appraisal.status is not Status.CONTRAINDICATED or appraisal.verified:
            accepted.append(offset)
    assert accepted == []


def test_every_byte_flip_of_the_runtime_data(store: TrustStore) -> None:
    vector = pick(BY_ID, RAW)
    document = _document(vector)
    hcl = base64.urlsafe_b64decode(document["hcl_report"])
    report = parse_hcl_report(hcl)
    start = VARIABLE_DATA_OFFSET
    options = verify_options(vector, store)
    verifier = AzSnpVtpmVerifier()
    accepted = []
    for offset in range(start, start + len(report.variable_data), 2):
        flipped = bytearray(hcl)
        flipped[offset] ^= 0x01
        document["hcl_report"] = base64.urlsafe_b64encode(bytes(flipped)).decode()
        appraisal = verifier.appraise(_encode(document), options)
        if appraisal.status is not Status.CONTRAINDICATED or appraisal.verified:
            accepted.append(offset)
    assert accepted == []


@pytest.mark.parametrize("part", ["message", "signature"])
def test_every_byte_flip_of_the_vtpm_quote(part: str, store: TrustStore) -> None:
    vector = pick(BY_ID, RAW)
    document = _document(vector)
    raw = bytes.fromhex(document["tpm_quote"][part])
    options = verify_options(vector, store)
    verifier = AzSnpVtpmVerifier()
    accepted = []
    for offset in range(len(raw)):
        flipped = bytearray(raw)
        flipped[offset] ^= 0x01
        document["tpm_quote"][part] = bytes(flipped).hex()
        appraisal = verifier.appraise(_encode(document), options)
        if appraisal.status is not Status.CONTRAINDICATED or appraisal.verified:
            accepted.append(offset)
    assert accepted == []


def test_changed_pcr_and_reference_values(store: TrustStore) -> None:
    vector = pick(BY_ID, V1)
    document = _document(vector)
    pcr0 = bytes.fromhex(document["tpm_quote"]["pcrs"][0])
    good = AzSnpVtpmVerifier(tpm_policy=TpmPolicy(reference_pcrs={0: frozenset({pcr0})}))
    assert good.appraise(vector.evidence, verify_options(vector, store)).status is Status.AFFIRMING
    bad = AzSnpVtpmVerifier(tpm_policy=TpmPolicy(reference_pcrs={0: frozenset({bytes(32)})}))
    appraisal = bad.appraise(vector.evidence, verify_options(vector, store))
    assert [r.code for r in appraisal.reasons] == ["tpm.pcr_not_allowed"]
    document["tpm_quote"]["pcrs"][5] = "00" * 32
    changed = AzSnpVtpmVerifier().appraise(_encode(document), verify_options(vector, store))
    assert [r.code for r in changed.reasons] == ["tpm.pcr_digest_mismatch"]


def test_vcek_of_another_chip_and_missing_roots(store: TrustStore) -> None:
    raw, v1 = pick(BY_ID, RAW), pick(BY_ID, V1)
    document = _document(raw)
    document["vcek"] = _document(v1)["vcek"]
    appraisal = AzSnpVtpmVerifier().appraise(_encode(document), verify_options(raw, store))
    codes = [r.code for r in appraisal.reasons]
    assert "snp.report_signature_invalid" in codes and not appraisal.verified
    bare = AzSnpVtpmVerifier().appraise(raw.evidence, verify_options(raw, TrustStore()))
    assert [r.code for r in bare.reasons] == ["snp.no_trust_anchor"]


def test_a_tdx_verifier_refuses_snp_evidence(store: TrustStore) -> None:
    vector = pick(BY_ID, V1)
    appraisal = AzTdxVtpmVerifier().appraise(vector.evidence, verify_options(vector, store))
    assert appraisal.status is Status.CONTRAINDICATED
    assert [r.code for r in appraisal.reasons] == ["az.evidence_invalid"]
