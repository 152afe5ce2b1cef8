"""Keylime's quote check as a differential oracle for our TPM quote verification.

Keylime (the CNCF remote-attestation project) verifies a TPM 2.0 quote in
``keylime.tpm.tpm_util.checkquote``: the AK's signature over TPMS_ATTEST, extraData against the
nonce it expects, and the quote's pcrDigest against the PCR values the agent sent. That is the
quote layer of our ``tpm`` family, written by other people on a different parser, so on every
shared vector, on every single-byte change of their signed parts and on simulated quotes from our
test TPM the two must reach the same accept/reject and, when both accept, the same PCR values.
The vTPM quotes inside the Azure SNP evidence (all of that family's vectors, and every byte flip
of one quote) get the same comparison, with the AK taken from the HCL runtime data.

Keylime has no notion of time or of AK certificates in this check (it trusts an AK through its
registrar instead), so what it can judge is the quote: an AK certificate that does not chain is
ours alone to reject, and the last tests pin that scope rather than letting it pass unnoticed.
It takes the PCR values in the tpm2-tools memory layout that its agents send; ``_pcr_blob``
builds that layout from the evidence's PCR list and the selection read with keylime's own
TPMS_PCR_SELECTION reader, so no part of our parser feeds the oracle.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.util
import json
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.testing.tpm_pki import QuoteKnobs, TestTpm, TpmTestPki
from services.testing.vectors import (
    Vector,
    iter_vectors,
    roots_dir,
    vectors_root,
    verify_options,
)
from services.verifier.families.azure import AzSnpVtpmVerifier
from services.verifier.families.base import Appraisal, VerifyOptions
from services.verifier.families.tpm import HashAlg, TpmVerifier
from services.verifier.trust import TrustStore

HAS_KEYLIME = importlib.util.find_spec("keylime") is not None
pytestmark = pytest.mark.skipif(
    not HAS_KEYLIME, reason="keylime (the dev extra's TPM oracle) is not installed"
)
NEEDS_VECTORS = pytest.mark.skipif(
    vectors_root() is None or roots_dir() is None,
    reason="shared vectors not found: set ATTESTMESH_VECTORS or provide ../shared/vectors",
)

VECTORS = list(iter_vectors("tpm")) if vectors_root() is not None else []
DIGEST_SIZES = {20: 0x0004, 32: 0x000B, 48: 0x000C, 64: 0x000D}
QUOTE_CHECKS = ("quote_signature", "pcr_digest", "nonce")
"""Our checks that together are what keylime's ``checkquote`` decides."""


class Verdict:
    """Keylime's answer: accepted with the PCR values it hashed, or the exception it raised."""

    def __init__(self, pcrs: dict[int, str] | None, error: str = "") -> None:
        self.pcrs = pcrs
        self.error = error

    @property
    def accepted(self) -> bool:
        return self.pcrs is not None

    def __repr__(self) -> str:
        return f"keylime({'accepted' if self.accepted else 'rejected: ' + self.error})"


def _selection(attest: bytes) -> dict[int, int]:
    """The quote's PCR selection as {hash alg: bitmask}, via keylime's own selection reader."""
    tpm2_objects = importlib.import_module("keylime.tpm.tpm2_objects")
    offset = 6  # magic and type
    for _ in range(2):  # qualifiedSigner, extraData: TPM2B
        (size,) = struct.unpack_from(">H", attest, offset)
        offset += 2 + size
    offset += 17 + 8  # TPMS_CLOCK_INFO, firmwareVersion
    selections, _ = tpm2_objects.unmarshal_tpml_pcr_selection(attest[offset:])
    return {alg: int.from_bytes(select.ljust(3, b"\0")[:3], "little")
            for alg, select in selections.items()}  # fmt: skip


def _pcr_blob(attest: bytes, values: list[bytes]) -> bytes:
    """The tpm2-tools ``tpm2_pcrs`` memory image keylime reads: the selection, then digests.

    The evidence carries one value per PCR index (24), or exactly the selected values in order.
    """
    selection = _selection(attest)
    if len(selection) != 1:
        raise ValueError(f"{len(selection)} banks selected; the evidence carries one")
    ((alg, mask),) = selection.items()
    indices = [i for i in range(24) if mask >> i & 1]
    chosen = [values[i] for i in indices] if len(values) == 24 else list(values)
    blob = struct.pack("<I", 1) + struct.pack("<HB", alg, 3) + mask.to_bytes(3, "little") + b"\0\0"
    blob += b"\0" * 8 * 15
    groups = [chosen[i : i + 8] for i in range(0, len(chosen), 8)]
    blob += struct.pack("<I", len(groups))
    for group in groups:
        blob += struct.pack("<I", len(group))
        for slot in range(8):
            value = group[slot] if slot < len(group) else b""
            blob += struct.pack("<H", len(value)) + value.ljust(64, b"\0")
    return blob


def keylime_check(
    ak: bytes, message: bytes, signature: bytes, pcrs: list[bytes], nonce: bytes, hash_alg: str
) -> Verdict:
    """Keylime's ``checkquote`` on a quote; ``ak`` is a SubjectPublicKeyInfo (DER)."""
    tpm_util = importlib.import_module("keylime.tpm.tpm_util")
    try:
        key = serialization.load_der_public_key(ak)
        ak_pem = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        blob = _pcr_blob(message, pcrs)
        values: dict[int, str] = tpm_util.checkquote(
            ak_pem, nonce, signature, message, blob, hash_alg
        )
    # Keylime reports every failure (bad signature, nonce, digest, malformed bytes) by raising,
    # plain Exception included; here any of them is the oracle's "rejected".
    except Exception as exc:  # noqa: BLE001
        return Verdict(None, f"{type(exc).__name__}: {exc}")
    return Verdict(values)


def keylime_verdict(evidence: bytes, nonce: bytes, hash_alg: str = "sha256") -> Verdict:
    """Keylime's verdict on the ``tpm`` family's evidence JSON."""
    document = json.loads(evidence)
    quote = document["tpm_quote"]
    return keylime_check(
        base64.b64decode(document["ak_public"]),
        base64.b64decode(quote["message"]),
        base64.b64decode(quote["signature"]),
        [bytes.fromhex(v) for v in quote["pcrs"]],
        nonce,
        hash_alg,
    )


def quote_accepted(appraisal: Appraisal) -> bool:
    """Our verdict on the quote layer: signature, PCR digest and nonce checks all passed."""
    outcome = {check.name: check.ok for check in appraisal.checks}
    return all(outcome.get(name) is True for name in QUOTE_CHECKS)


def assert_agree(appraisal: Appraisal, verdict: Verdict) -> None:
    ours = quote_accepted(appraisal)
    assert ours is verdict.accepted, (verdict, [r.code for r in appraisal.reasons])
    if verdict.accepted:
        assert verdict.pcrs is not None
        assert verdict.pcrs == {
            int(name[3:]): value
            for name, value in appraisal.claims.items()
            if name.startswith("pcr") and name[3:].isdigit()
        }


def _mutated(evidence: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    document = json.loads(evidence)
    change(document)
    return json.dumps(document).encode()


def _flip(part: str, offset: int) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        raw = bytearray(base64.b64decode(document["tpm_quote"][part]))
        raw[offset] ^= 0x01
        document["tpm_quote"][part] = base64.b64encode(bytes(raw)).decode()

    return change


def _part_length(evidence: bytes, part: str) -> int:
    return len(base64.b64decode(json.loads(evidence)["tpm_quote"][part]))


# --- the shared real quotes ----------------------------------------------------------------------


def _vector_nonce(vector: Vector) -> bytes:
    return bytes.fromhex(vector.expect.get("claims", {}).get("nonce", ""))


@NEEDS_VECTORS
@pytest.mark.vectors
@pytest.mark.parametrize("vector", VECTORS, ids=[v.id for v in VECTORS])
def test_real_quote_verdicts_agree(vector: Vector, store: TrustStore) -> None:
    nonce = _vector_nonce(vector)
    appraisal = TpmVerifier().appraise(
        vector.evidence, verify_options(vector, store, expected_report_data=nonce)
    )
    verdict = keylime_verdict(vector.evidence, nonce)
    assert_agree(appraisal, verdict)
    assert verdict.accepted is vector.expect["verifies"]
    assert appraisal.verified is vector.expect["verifies"]


@NEEDS_VECTORS
@pytest.mark.vectors
@pytest.mark.parametrize("vector", VECTORS, ids=[v.id for v in VECTORS])
@pytest.mark.parametrize("part", ["message", "signature"])
def test_every_byte_flip_of_a_real_quote_is_rejected_by_both(
    vector: Vector, part: str, store: TrustStore
) -> None:
    nonce = _vector_nonce(vector)
    options = verify_options(vector, store, expected_report_data=nonce)
    verifier = TpmVerifier()
    disagreements, accepted = [], []
    for offset in range(_part_length(vector.evidence, part)):
        evidence = _mutated(vector.evidence, _flip(part, offset))
        ours = quote_accepted(verifier.appraise(evidence, options))
        theirs = keylime_verdict(evidence, nonce).accepted
        if ours is not theirs:
            disagreements.append((offset, ours, theirs))
        if ours or theirs:
            accepted.append(offset)
    assert disagreements == []
    assert accepted == []


@NEEDS_VECTORS
@pytest.mark.vectors
@pytest.mark.parametrize("vector", VECTORS, ids=[v.id for v in VECTORS])
def test_changed_pcr_values_and_wrong_nonce_are_rejected_by_both(
    vector: Vector, store: TrustStore
) -> None:
    nonce = _vector_nonce(vector)
    verifier = TpmVerifier()
    for index in range(24):

        def change(document: dict[str, Any], index: int = index) -> None:
            value = bytearray(bytes.fromhex(document["tpm_quote"]["pcrs"][index]))
            value[-1] ^= 0x01
            document["tpm_quote"]["pcrs"][index] = value.hex()

        evidence = _mutated(vector.evidence, change)
        options = verify_options(vector, store, expected_report_data=nonce)
        appraisal = verifier.appraise(evidence, options)
        verdict = keylime_verdict(evidence, nonce)
        assert_agree(appraisal, verdict)
        assert not verdict.accepted, index
    wrong = hashlib.sha512(b"another challenge").digest()
    appraisal = verifier.appraise(
        vector.evidence, verify_options(vector, store, expected_report_data=wrong)
    )
    verdict = keylime_verdict(vector.evidence, wrong)
    assert_agree(appraisal, verdict)
    assert "nonce" in verdict.error and not verdict.accepted


# --- the vTPM quotes inside the Azure SNP evidence ----------------------------------------------

AZURE = list(iter_vectors("az-snp-vtpm")) if vectors_root() is not None else []
AZURE_BY_ID = {v.id: v for v in AZURE}
AK_SCHEME = struct.pack(">HH", 0x0014, 0x000B)  # TPM_ALG_RSASSA, TPM_ALG_SHA256


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def azure_keylime_verdict(evidence: bytes, nonce: bytes) -> Verdict:
    """Keylime on the vTPM quote of trustee's Azure evidence, with the AK of its HCL runtime data.

    The adapter reads the evidence as the attestation agent writes it (v0: byte arrays, v1: hex
    and base64url), finds the runtime-data JSON in the HCL report and its ``HCLAkPub`` JWK, and
    marshals Azure's raw RSASSA-SHA256 AK signature as the TPMT_SIGNATURE keylime expects.
    """
    document = json.loads(evidence)
    try:
        if "version" in document:
            quote, hcl = document["tpm_quote"], _b64url(document["hcl_report"])
            message, raw = bytes.fromhex(quote["message"]), bytes.fromhex(quote["signature"])
            pcrs = [bytes.fromhex(v) for v in quote["pcrs"]]
        else:
            quote, hcl = document["quote"], bytes(document["report"])
            message, raw = bytes(quote["message"]), bytes(quote["signature"])
            pcrs = [bytes(v) for v in quote["pcrs"]]
        text = hcl[hcl.index(b'{"keys"') :].decode("latin-1")
        runtime, _ = json.JSONDecoder().raw_decode(text)
        (jwk,) = [k for k in runtime["keys"] if k.get("kid") == "HCLAkPub"]
        key = rsa.RSAPublicNumbers(
            int.from_bytes(_b64url(jwk["e"])), int.from_bytes(_b64url(jwk["n"]))
        ).public_key()
    # The evidence or its runtime data is malformed: the oracle has no quote to judge.
    except (ValueError, KeyError, TypeError) as exc:
        return Verdict(None, f"{type(exc).__name__}: {exc}")
    if len(raw) == (key.key_size + 7) // 8:
        raw = AK_SCHEME + struct.pack(">H", len(raw)) + raw
    ak = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return keylime_check(ak, message, raw, pcrs, nonce, "sha256")


@NEEDS_VECTORS
@pytest.mark.vectors
@pytest.mark.parametrize("vector", AZURE, ids=[v.id for v in AZURE])
def test_azure_vtpm_quote_verdicts_agree(vector: Vector, store: TrustStore) -> None:
    """Keylime judges the vTPM quote only: a broken SNP report is ours alone to reject."""
    source = vector if vector.kind == "positive" else AZURE_BY_ID[vector.meta["negative_of"]]
    nonce = _vector_nonce(source)
    appraisal = AzSnpVtpmVerifier().appraise(
        vector.evidence, verify_options(vector, store, expected_report_data=nonce)
    )
    verdict = azure_keylime_verdict(vector.evidence, nonce)
    assert_agree(appraisal, verdict)
    assert appraisal.verified is vector.expect["verifies"]
    if vector.expect["verifies"]:
        assert verdict.accepted
    if "TPM quote signature" in vector.meta.get("mutation", ""):
        assert not verdict.accepted
    if verdict.accepted and not appraisal.verified:
        assert not [r.code for r in appraisal.reasons if r.code.startswith("tpm.")]


@NEEDS_VECTORS
@pytest.mark.vectors
@pytest.mark.parametrize("part", ["message", "signature"])
def test_every_byte_flip_of_an_azure_vtpm_quote_is_rejected_by_both(
    part: str, store: TrustStore
) -> None:
    vector = AZURE_BY_ID["azsnp-trustee-hcl-report-raw"]
    nonce = _vector_nonce(vector)
    options = verify_options(vector, store, expected_report_data=nonce)
    verifier = AzSnpVtpmVerifier()
    document = json.loads(vector.evidence)
    raw = bytes.fromhex(document["tpm_quote"][part])
    disagreements, accepted = [], []
    for offset in range(len(raw)):
        flipped = bytearray(raw)
        flipped[offset] ^= 0x01
        document["tpm_quote"][part] = flipped.hex()
        evidence = json.dumps(document).encode()
        ours = quote_accepted(verifier.appraise(evidence, options))
        theirs = azure_keylime_verdict(evidence, nonce).accepted
        if ours is not theirs:
            disagreements.append((offset, ours, theirs))
        if ours or theirs:
            accepted.append(offset)
    assert len(raw) > 100
    assert disagreements == []
    assert accepted == []


# --- simulated quotes from the test TPM ----------------------------------------------------------

NOW = datetime(2025, 6, 1, 12, tzinfo=UTC)
PKI = TpmTestPki(now=NOW)
RSA_TPM = TestTpm(label="oracle")
ECC_TPM = TestTpm(ecc=True, label="oracle-ecc")
OTHER = TestTpm(label="oracle-other")
NONCE = hashlib.sha512(b"oracle nonce" + b"key").digest()
SHA384_QUOTE = QuoteKnobs(bank=HashAlg.SHA384, sig_hash=HashAlg.SHA384)


def _options(nonce: bytes = NONCE, trust: TrustStore | None = None) -> VerifyOptions:
    return VerifyOptions(
        now=NOW, trust=trust if trust is not None else PKI.trust_store(), expected_report_data=nonce
    )


def _changed_pcr(document: dict[str, Any]) -> None:
    document["tpm_quote"]["pcrs"][7] = "ee" * 32


def _other_ak(document: dict[str, Any]) -> None:
    document["ak_public"] = base64.b64encode(OTHER.ak_public).decode()


SIMULATED: dict[str, tuple[TestTpm, QuoteKnobs, Callable[[dict[str, Any]], None] | None, bool]] = {
    "rsa-valid": (RSA_TPM, QuoteKnobs(), None, True),
    "ecc-valid": (ECC_TPM, QuoteKnobs(), None, True),
    "rsa-pcr-subset": (RSA_TPM, QuoteKnobs(indices=(0, 1, 2, 3, 4, 5, 6, 7, 14)), None, True),
    "rsa-sha384-bank": (RSA_TPM, SHA384_QUOTE, None, True),
    "rsa-signature-byte": (RSA_TPM, QuoteKnobs(), _flip("signature", 100), False),
    "ecc-signature-byte": (ECC_TPM, QuoteKnobs(), _flip("signature", 20), False),
    "rsa-message-byte": (RSA_TPM, QuoteKnobs(), _flip("message", 50), False),
    "ecc-message-byte": (ECC_TPM, QuoteKnobs(), _flip("message", 10), False),
    "rsa-pcr-value": (RSA_TPM, QuoteKnobs(), _changed_pcr, False),
    "rsa-wrong-digest": (RSA_TPM, QuoteKnobs(digest=b"\x5a" * 32), None, False),
    "rsa-wrong-signer": (RSA_TPM, QuoteKnobs(signer=OTHER.ak), None, False),
    "rsa-other-ak-sent": (RSA_TPM, QuoteKnobs(), _other_ak, False),
}


@pytest.mark.parametrize("case", sorted(SIMULATED))
def test_simulated_quote_verdicts_agree(case: str) -> None:
    tpm, knobs, change, accepted = SIMULATED[case]
    evidence = tpm.evidence(NONCE, knobs, ak_cert=PKI.issue_ak_cert(tpm.ak.public_key()))
    if change is not None:
        evidence = _mutated(evidence, change)
    appraisal = TpmVerifier().appraise(evidence, _options())
    verdict = keylime_verdict(evidence, NONCE, knobs.sig_hash.label)
    assert_agree(appraisal, verdict)
    assert verdict.accepted is accepted, verdict
    assert appraisal.verified is accepted


@pytest.mark.parametrize("tpm", [RSA_TPM, ECC_TPM], ids=["rsa", "ecc"])
def test_simulated_wrong_nonce_is_rejected_by_both(tpm: TestTpm) -> None:
    evidence = tpm.evidence(NONCE)
    wrong = hashlib.sha512(b"replayed").digest()
    appraisal = TpmVerifier().appraise(evidence, _options(wrong))
    verdict = keylime_verdict(evidence, wrong)
    assert_agree(appraisal, verdict)
    assert not verdict.accepted and "nonce" in verdict.error


def test_wrong_ak_chain_is_ours_to_reject() -> None:
    """Keylime's quote check trusts the AK it is handed; the AK certificate is our layer."""
    foreign_cert = PKI.issue_ak_cert(OTHER.ak.public_key())
    cases = {
        "cert-for-another-key": (RSA_TPM.evidence(NONCE, ak_cert=foreign_cert), PKI.trust_store()),
        "root-not-trusted": (
            RSA_TPM.evidence(NONCE, ak_cert=PKI.issue_ak_cert(RSA_TPM.ak.public_key())),
            TrustStore(),
        ),
    }
    for name, (evidence, trust) in cases.items():
        appraisal = TpmVerifier().appraise(evidence, _options(trust=trust))
        verdict = keylime_verdict(evidence, NONCE)
        assert_agree(appraisal, verdict)
        assert verdict.accepted, name
        assert not appraisal.verified, name
        assert any(r.code.startswith("tpm.ak_cert") for r in appraisal.reasons), name
