"""Real TDX and SGX quotes and Intel collateral, verified at their pinned time against Intel's root.

Also: differential agreement with dcap-qvl (the vectors' recorded ``oracle`` and, when the
package is installed, a live call), and byte flips over every signed region of a real quote and
its collateral: any change to signed bytes must make the verdict contraindicated.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509

from services.testing.intel_pki import quote_collateral_v3
from services.testing.vectors import (
    Vector,
    iter_vectors,
    pick,
    roots_dir,
    vectors_root,
)
from services.verifier.families.base import Appraisal, Status, VerifyOptions
from services.verifier.families.dcap.quote import parse_quote
from services.verifier.families.sgx import SgxVerifier
from services.verifier.families.tdx import TdxVerifier
from services.verifier.trust import TrustStore

pytestmark = [
    pytest.mark.vectors,
    pytest.mark.skipif(
        vectors_root() is None or roots_dir() is None,
        reason="shared vectors not found: set ATTESTMESH_VECTORS or provide ../shared/vectors",
    ),
]

VECTORS = [v for family in ("tdx", "sgx") for v in iter_vectors(family)]
BY_ID = {v.id: v for v in VECTORS}
WITH_ORACLE = [v for v in VECTORS if "oracle" in v.meta]
HAS_DCAP_QVL = importlib.util.find_spec("dcap_qvl") is not None
FLIP_VECTORS = ["tdx-dcapqvl-sample", "sgx-dcapqvl-sample"]
flip_vectors = pytest.mark.parametrize("vector_id", FLIP_VECTORS)


def _appraise(
    vector: Vector,
    store: TrustStore,
    evidence: bytes | None = None,
    collateral: dict[str, bytes] | None = None,
    **changes: Any,
) -> Appraisal:
    options = VerifyOptions(
        now=changes.get("now", vector.at),
        trust=store,
        collateral=collateral if collateral is not None else vector.collateral,
    )
    verifier = TdxVerifier() if vector.family == "tdx" else SgxVerifier()
    return verifier.appraise(evidence if evidence is not None else vector.evidence, options)


def test_positive_and_negative_vectors_are_present() -> None:
    assert {(v.family, v.kind) for v in VECTORS} == {
        ("tdx", "positive"),
        ("tdx", "negative"),
        ("sgx", "positive"),
    }


@pytest.mark.parametrize("vector", VECTORS, ids=[v.id for v in VECTORS])
def test_vector_verifies_as_expected(vector: Vector, store: TrustStore) -> None:
    appraisal = _appraise(vector, store)
    expect = vector.expect
    assert appraisal.status == Status(expect["status"]), appraisal.reasons
    assert appraisal.verified is expect["verifies"], appraisal.reasons
    assert appraisal.claims.get("tcb_status") == expect["tcb_status"]
    assert appraisal.claims.get("advisories", []) == expect["advisories"]
    for name, value in expect.get("claims", {}).items():
        assert appraisal.claims[name] == value, name
    if appraisal.claims:
        assert appraisal.claims["debug"] is expect["debug"]
    if vector.kind == "negative":
        assert appraisal.status == Status.CONTRAINDICATED and not appraisal.verified


def _agree(appraisal: Appraisal, status: str | None, advisories: list[str] | None) -> None:
    """Our TCB verdict equals dcap-qvl's: its status and advisories, or no status on error."""
    if status is None:
        assert appraisal.claims.get("tcb_status") is None
        assert appraisal.status == Status.CONTRAINDICATED
    else:
        assert appraisal.claims["tcb_status"] == status
        assert appraisal.claims["advisories"] == advisories


@pytest.mark.parametrize("vector", WITH_ORACLE, ids=[v.id for v in WITH_ORACLE])
def test_recorded_dcap_qvl_verdict_agrees(vector: Vector, store: TrustStore) -> None:
    oracle = vector.meta["oracle"]
    _agree(_appraise(vector, store), oracle.get("status"), oracle.get("advisory_ids"))


@pytest.mark.skipif(not HAS_DCAP_QVL, reason="dcap-qvl (dev extra) is not installed")
@pytest.mark.parametrize("vector", VECTORS, ids=[v.id for v in VECTORS])
def test_live_dcap_qvl_agrees(vector: Vector, store: TrustStore) -> None:
    dcap_qvl = importlib.import_module("dcap_qvl")
    collateral = dcap_qvl.QuoteCollateralV3(**quote_collateral_v3(vector.collateral))
    try:
        report = dcap_qvl.verify(vector.evidence, collateral, int(vector.at.timestamp()))
    except ValueError as exc:
        if "oracle" in vector.meta:
            assert "error" in vector.meta["oracle"], exc
        _agree(_appraise(vector, store), None, None)
        return
    _agree(_appraise(vector, store), report.status, list(report.advisory_ids))


@flip_vectors
def test_vectors_expire_when_their_collateral_does(vector_id: str, store: TrustStore) -> None:
    vector = pick(BY_ID, vector_id)
    later = _appraise(vector, store, now=vector.at + timedelta(days=400))
    assert later.status == Status.CONTRAINDICATED and not later.verified
    codes = {r.code for r in later.reasons}
    family = vector.family
    assert {f"{family}.tcb_info_expired", f"{family}.pck_crl_expired"} <= codes


def _flips(data: bytes, start: int, end: int, stride: int = 1) -> Iterator[bytes]:
    for offset in range(start, end, stride):
        mutated = bytearray(data)
        mutated[offset] ^= 0x01
        yield bytes(mutated)


def _assert_rejected(appraisal: Appraisal, where: str) -> None:
    assert appraisal.status == Status.CONTRAINDICATED, where
    assert not appraisal.verified, where


@flip_vectors
def test_every_byte_of_header_and_body_is_signed(vector_id: str, store: TrustStore) -> None:
    vector = pick(BY_ID, vector_id)
    signed = len(parse_quote(vector.evidence).signed)
    for index, mutated in enumerate(_flips(vector.evidence, 0, signed)):
        _assert_rejected(_appraise(vector, store, mutated), f"quote byte {index:#x}")


@flip_vectors
def test_signature_key_qe_report_and_auth_data_are_bound(vector_id: str, store: TrustStore) -> None:
    vector = pick(BY_ID, vector_id)
    evidence = vector.evidence
    quote = parse_quote(evidence)
    cert = quote.certification
    regions = {
        "signature": quote.signature,
        "attestation key": quote.attestation_key,
        "QE report": cert.qe_report_raw,
        "QE report signature": cert.qe_report_signature,
        "QE auth data": cert.qe_auth_data,
    }
    for name, region in regions.items():
        start = evidence.index(region)
        stride = 3 if len(region) > 64 else 1
        for mutated in _flips(evidence, start, start + len(region), stride):
            _assert_rejected(_appraise(vector, store, mutated), name)


def _same_chain(original: bytes, mutated: bytes) -> bool:
    """A flip that leaves the certificates' DER unchanged (e.g. unused base64 bits)."""
    try:
        certs = x509.load_pem_x509_certificates(mutated.rstrip(b"\0"))
    except ValueError:
        return False
    return certs == x509.load_pem_x509_certificates(original.rstrip(b"\0"))


@flip_vectors
def test_pck_chain_bytes_are_checked(vector_id: str, store: TrustStore) -> None:
    vector = pick(BY_ID, vector_id)
    evidence = vector.evidence
    pem = parse_quote(evidence).certification.pck_chain_pem
    start = evidence.index(pem)
    for offset in range(start, start + len(pem), 11):
        mutated = bytearray(evidence)
        mutated[offset] ^= 0x01
        region = bytes(mutated[start : start + len(pem)])
        if _same_chain(pem, region):
            continue
        _assert_rejected(_appraise(vector, store, bytes(mutated)), f"PCK chain byte {offset}")


@pytest.mark.parametrize(
    ("name", "stride"),
    [
        ("tcb_info.json", 5),
        ("qe_identity.json", 3),
        ("pck_crl.der", 11),
        ("root_ca_crl.der", 3),
        ("tcb_info_issuer_chain.pem", 13),
        ("qe_identity_issuer_chain.pem", 13),
        ("pck_crl_issuer_chain.pem", 13),
    ],
)
@flip_vectors
def test_every_collateral_item_is_signed(
    vector_id: str, name: str, stride: int, store: TrustStore
) -> None:
    vector = pick(BY_ID, vector_id)
    original = vector.collateral[name]
    for offset in range(0, len(original), stride):
        mutated = bytearray(original)
        mutated[offset] ^= 0x01
        if name.endswith(".pem") and _same_chain(original, bytes(mutated)):
            continue
        if name.endswith(".json") and chr(original[offset]) in " \n":
            continue
        collateral = {**vector.collateral, name: bytes(mutated)}
        _assert_rejected(_appraise(vector, store, collateral=collateral), f"{name}@{offset}")
