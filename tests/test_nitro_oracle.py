"""epsilon-attestation-verifier as a differential oracle for our Nitro document verification.

``epsilon_verifier.verify_attestation`` (Epsilon Data's standalone Nitro verifier) parses the
COSE_Sign1 document with cbor2, checks the NSM fields, walks the chain from the document
certificate through ``cabundle`` to a root certificate we name by path, checking validity,
basicConstraints, keyUsage and every signature, and verifies the ES384 COSE signature. That is
what our ``verified`` flag covers, on a separate parser and path builder, so on every shared
vector and on simulated documents from our test PKI the two must reach the same accept/reject
and, when both accept, read the same module, timestamp and PCRs.

It has no time argument: it reads ``datetime.now`` in its module. ``epsilon_at`` sets that one
name, for one test, to a clock stopped at the verification time; the patch first checks that
the module still reads the clock through that name, and a patch that stopped working would turn
every years-old vector into an expired one, so it cannot fail quietly. It is given our trust
root by path (the shared AWS root for vectors, the test PKI's root for simulated documents) and
so never downloads one. It checks neither a nonce nor a ``user_data`` binding, and has a size
rule of its own (user_data and nonce at most 512 bytes) that a genuine AWS document breaks: the
tests pin both, rather than let them pass unnoticed.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization

from services.testing.nitro_pki import OK, CertOverride, NitroTestPki, TestEnclave
from services.testing.vectors import Vector, iter_vectors, roots_dir, vectors_root, verify_options
from services.verifier.families.base import Appraisal, VerifyOptions
from services.verifier.families.nitro import NitroVerifier
from services.verifier.trust import TrustStore

HAS_EPSILON = importlib.util.find_spec("epsilon_verifier") is not None
pytestmark = pytest.mark.skipif(
    not HAS_EPSILON, reason="epsilon-attestation-verifier (the dev extra's Nitro oracle) is absent"
)
NEEDS_VECTORS = pytest.mark.skipif(
    vectors_root() is None or roots_dir() is None,
    reason="shared vectors not found: set ATTESTMESH_VECTORS or provide ../shared/vectors",
)

VECTORS = list(iter_vectors("nitro")) if vectors_root() is not None else []
KNOWN_DIVERGENCES = {
    "nitro-blocky-prod": "user_data cannot exceed 512 bytes",
}
"""Genuine documents the oracle rejects on a rule of its own, with the error it must give."""

Oracle = Callable[[bytes, Path, datetime], Any]


@pytest.fixture
def epsilon_at(monkeypatch: pytest.MonkeyPatch) -> Oracle:
    """``verify(document, root_pem, at)``: the oracle's result with its clock stopped at ``at``."""
    verifier = importlib.import_module("epsilon_verifier.verifier")
    assert verifier.datetime is datetime, "the oracle no longer reads its clock via datetime.now"

    def verify(document: bytes, root_pem: Path, at: datetime) -> Any:
        class Stopped(datetime):
            @classmethod
            def now(cls, tz: tzinfo | None = None) -> Stopped:
                moment = at.astimezone(tz or UTC)
                stopped = cls.fromtimestamp(moment.timestamp(), tz or UTC)
                return stopped if tz is not None else stopped.replace(tzinfo=None)

        monkeypatch.setattr(verifier, "datetime", Stopped)
        return verifier.verify_attestation(
            base64.b64encode(document).decode(), aws_root_cert_path=str(root_pem)
        )

    return verify


def assert_agree(appraisal: Appraisal, result: Any) -> None:
    assert result.valid is appraisal.verified, (result.error, [r.code for r in appraisal.reasons])
    if result.valid:
        claims = appraisal.claims
        document = result.attestation
        assert document.module_id == claims["module_id"]
        assert document.timestamp == claims["timestamp_ms"]
        assert {str(index): value for index, value in document.pcrs.items()} == claims["pcrs"]
        assert (result.pcr0, result.pcr1, result.pcr2) == (
            claims["pcr0"],
            claims["pcr1"],
            claims["pcr2"],
        )


# --- the shared real documents -------------------------------------------------------------------


def _aws_root() -> Path:
    roots = roots_dir()
    assert roots is not None
    return roots / "aws" / "nitro_root_g1.pem"


@NEEDS_VECTORS
@pytest.mark.vectors
@pytest.mark.parametrize("vector", VECTORS, ids=[v.id for v in VECTORS])
def test_real_document_verdicts_agree(
    vector: Vector, store: TrustStore, epsilon_at: Oracle
) -> None:
    appraisal = NitroVerifier().appraise(vector.evidence, verify_options(vector, store))
    result = epsilon_at(vector.evidence, _aws_root(), vector.at)
    if vector.id in KNOWN_DIVERGENCES:
        assert not result.valid and KNOWN_DIVERGENCES[vector.id] in result.error
    else:
        assert_agree(appraisal, result)
        assert result.valid is vector.expect["verifies"]
    assert appraisal.verified is vector.expect["verifies"]


@NEEDS_VECTORS
@pytest.mark.vectors
@pytest.mark.parametrize("vector", VECTORS, ids=[v.id for v in VECTORS])
def test_real_documents_expire_for_both(
    vector: Vector, store: TrustStore, epsilon_at: Oracle
) -> None:
    """A day after ``at`` the three-hour document certificate has expired: the clock is real."""
    later = vector.at + timedelta(days=1)
    appraisal = NitroVerifier().appraise(vector.evidence, verify_options(vector, store, now=later))
    result = epsilon_at(vector.evidence, _aws_root(), later)
    assert_agree(appraisal, result)
    assert not result.valid


@NEEDS_VECTORS
@pytest.mark.vectors
def test_byte_flips_of_a_real_document_are_rejected_by_both(
    store: TrustStore, epsilon_at: Oracle
) -> None:
    """Every byte of the COSE signature and every 29th byte before it (envelope, protected
    header, payload fields, certificates), one bit each: neither may accept any of them."""
    (vector,) = [v for v in VECTORS if v.id == "nitro-base-2024-11-30"]
    raw = vector.evidence
    options = verify_options(vector, store)
    offsets = [*range(0, len(raw) - 96, 29), *range(len(raw) - 96, len(raw))]
    disagreements, accepted = [], []
    for offset in offsets:
        flipped = bytearray(raw)
        flipped[offset] ^= 0x01
        ours = NitroVerifier().appraise(bytes(flipped), options).verified
        theirs = epsilon_at(bytes(flipped), _aws_root(), vector.at).valid
        if ours is not theirs:
            disagreements.append((offset, ours, theirs))
        if ours or theirs:
            accepted.append(offset)
    assert len(offsets) > 200
    assert disagreements == []
    assert accepted == []


@NEEDS_VECTORS
@pytest.mark.vectors
def test_every_vector_of_the_family_is_compared() -> None:
    kinds = {v.kind for v in VECTORS}
    assert kinds == {"positive", "negative"}
    assert set(KNOWN_DIVERGENCES) <= {v.id for v in VECTORS}


# --- simulated documents from the test PKI -------------------------------------------------------

NOW = datetime(2025, 3, 1, 12, tzinfo=UTC)
PKI = NitroTestPki(now=NOW)
BINDING = bytes(range(64))


@pytest.fixture(scope="module")
def test_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test PKI's root as the PEM file the oracle is told to trust (and nothing else)."""
    path = tmp_path_factory.mktemp("nitro-oracle") / "test_root.pem"
    path.write_bytes(PKI.root.public_bytes(serialization.Encoding.PEM))
    return path


def _ours(document: bytes, *, now: datetime = NOW, expected: bytes | None = None) -> Appraisal:
    options = VerifyOptions(now=now, trust=PKI.trust_store(), expected_report_data=expected)
    return NitroVerifier().appraise(document, options)


def _flip_signature(document: bytes) -> bytes:
    envelope = cbor2.loads(document)
    signature = bytearray(envelope[3])
    signature[10] ^= 0x01
    envelope[3] = bytes(signature)
    return cbor2.dumps(envelope)


def _flip_payload(document: bytes) -> bytes:
    """One bit of PCR0 inside the signed payload: still well-formed, no longer signed."""
    envelope = cbor2.loads(document)
    pcr0 = cbor2.loads(envelope[2])["pcrs"][0]
    changed = bytes([pcr0[0] ^ 0x01]) + pcr0[1:]
    assert envelope[2].count(pcr0) == 1
    envelope[2] = envelope[2].replace(pcr0, changed)
    return cbor2.dumps(envelope)


def _enclave(
    *,
    root: CertOverride = OK,
    regional: CertOverride = OK,
    zonal: CertOverride = OK,
    instance: CertOverride = OK,
    leaf: CertOverride = OK,
) -> TestEnclave:
    """An enclave under a chain with at most one broken link (same keys as ``PKI``)."""
    pki = NitroTestPki(now=NOW, root=root, regional=regional, zonal=zonal, instance=instance)
    return pki.enclave(leaf=leaf)


SIMULATED: dict[str, tuple[Callable[[], bytes], bool]] = {
    "valid": (lambda: PKI.enclave().document(user_data=BINDING), True),
    "valid-tagged-with-nonce": (
        lambda: PKI.enclave().document(user_data=BINDING, nonce=b"n" * 32, tagged=True),
        True,
    ),
    "signature-byte": (lambda: _flip_signature(PKI.enclave().document(user_data=BINDING)), False),
    "payload-byte": (lambda: _flip_payload(PKI.enclave().document(user_data=BINDING)), False),
    "leaf-key-not-the-signer": (
        lambda: _enclave(leaf=CertOverride(wrong_key=True)).document(),
        False,
    ),
    "leaf-expired": (lambda: _enclave(leaf=CertOverride(expired=True)).document(), False),
    "leaf-not-yet-valid": (
        lambda: _enclave(leaf=CertOverride(not_yet_valid=True)).document(),
        False,
    ),
    "zonal-signed-by-another-key": (
        lambda: _enclave(zonal=CertOverride(wrong_issuer=True)).document(),
        False,
    ),
    "instance-ca-not-a-ca": (
        lambda: _enclave(instance=CertOverride(not_ca=True)).document(),
        False,
    ),
    "regional-no-cert-sign": (
        lambda: _enclave(regional=CertOverride(no_cert_sign=True)).document(),
        False,
    ),
    "regional-expired": (lambda: _enclave(regional=CertOverride(expired=True)).document(), False),
}


@pytest.mark.parametrize("case", sorted(SIMULATED))
def test_simulated_document_verdicts_agree(case: str, test_root: Path, epsilon_at: Oracle) -> None:
    make, verified = SIMULATED[case]
    document = make()
    appraisal = _ours(document)
    result = epsilon_at(document, test_root, NOW)
    assert_agree(appraisal, result)
    assert result.valid is verified, result.error


def test_a_bundle_root_copy_with_a_bad_self_signature(test_root: Path, epsilon_at: Oracle) -> None:
    """A known difference, pinned: the ``cabundle`` carries a copy of the root whose own
    signature is not by the root key. We anchor on the pinned root (same subject and key) and
    check the regional CA's signature by that key, as RFC 5280 treats a trust anchor; the oracle
    also checks the copy's self-signature against the pinned key and refuses."""
    document = _enclave(root=CertOverride(wrong_issuer=True)).document(user_data=BINDING)
    appraisal = _ours(document)
    result = epsilon_at(document, test_root, NOW)
    assert appraisal.verified and appraisal.reasons == []
    assert not result.valid and result.certificate_chain_valid is False


def test_a_document_under_another_root_is_rejected_by_both(
    tmp_path: Path, epsilon_at: Oracle
) -> None:
    """Both trust only the root they are given: the shared AWS root, or a stranger's."""
    document = PKI.enclave().document(user_data=BINDING)
    stranger = tmp_path / "stranger.pem"
    other = NitroTestPki(now=NOW, root=CertOverride(wrong_key=True)).root
    stranger.write_bytes(other.public_bytes(serialization.Encoding.PEM))
    result = epsilon_at(document, stranger, NOW)
    appraisal = NitroVerifier().appraise(document, VerifyOptions(now=NOW, trust=TrustStore()))
    assert_agree(appraisal, result)
    assert not result.valid


@pytest.mark.parametrize("hours", [-2, 4])
def test_simulated_documents_outside_the_leaf_window_are_rejected_by_both(
    hours: int, test_root: Path, epsilon_at: Oracle
) -> None:
    document = PKI.enclave().document(user_data=BINDING)
    at = NOW + timedelta(hours=hours)
    appraisal = _ours(document, now=at)
    result = epsilon_at(document, test_root, at)
    assert_agree(appraisal, result)
    assert not result.valid


def test_a_wrong_nonce_binding_is_ours_to_reject(test_root: Path, epsilon_at: Oracle) -> None:
    """The oracle takes no expected nonce: a document bound to another challenge still verifies
    for it, and for us too (``verified``), while our binding check refuses it."""
    document = PKI.enclave().document(user_data=BINDING)
    appraisal = _ours(document, expected=bytes(64))
    result = epsilon_at(document, test_root, NOW)
    assert_agree(appraisal, result)
    assert result.valid
    assert [r.code for r in appraisal.reasons] == ["nitro.report_data_mismatch"]
