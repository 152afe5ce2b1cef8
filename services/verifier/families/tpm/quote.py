"""Verify one TPM 2.0 quote: the AK's signature, the PCR digest and the nonce binding.

Pure and shared: the ``tpm`` family calls it with the AK from its evidence, the Azure families
with the AK the HCL report's runtime data carries. Each step is recorded; failures carry codes:

    tpm.ak_public_invalid      the AK public key is not an RSA or EC SubjectPublicKeyInfo
    tpm.signature_scheme_mismatch  an RSA scheme with an EC key or the other way round
    tpm.signature_invalid      the signature over the TPMS_ATTEST bytes does not verify
    tpm.pcr_values_invalid     the supplied PCR values do not fit the quote's selection
    tpm.pcr_digest_mismatch    H(selected PCR values) is not the quote's pcrDigest
    tpm.nonce_mismatch         extraData does not bind the expected report data

The PCR digest uses the hash of the signing scheme (TPM 2.0 Part 3, TPM2_Quote), which need not
be the bank's hash: a SHA-1 bank quoted by a SHA-256 AK has a SHA-256 digest.

Supplied PCR values (as the attestation agent sends them) are either one value per PCR index
(24 for a PC-Client TPM) or exactly the selected values in selection order. Only one bank may be
selected; only selected PCRs become verified values, whatever else the list holds.

Nonce binding: with ``expected_report_data`` set, extraData must equal it byte for byte (the
mesh's 64-byte SHA-512(nonce || key), which fits TPM2B_DATA on a TPM with SHA-512). A TPM whose
largest hash is SHA-384 limits qualifyingData to 50 bytes; its collector quotes
SHA-256(expected) instead, which is accepted as the *compact* binding (same commitment).
A challenge shorter than 64 bytes that the caller zero-padded to 64 (``attestmesh verify
--nonce``, as for SNP and TDX) matches an extraData of its unpadded bytes (``zero-padded``):
extraData is variable-length, so the padding is the caller's, and the check says so.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from services.mesh.errors import ParseError
from services.verifier.families.base import Check, Reason
from services.verifier.families.tpm.structures import Attest, HashAlg, SigAlg, Signature

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PCR_COUNT = 24


@dataclass
class QuoteResult:
    """What verifying one quote established, and every check and failure on the way."""

    attest: Attest
    bank: HashAlg | None = None
    pcrs: dict[int, bytes] = field(default_factory=dict)
    binding: str | None = None
    checks: list[Check] = field(default_factory=list)
    failures: list[Reason] = field(default_factory=list)
    binding_failures: list[Reason] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        """Signature and PCR digest hold (the binding is reported separately)."""
        return not self.failures

    def passed(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, True, detail))

    def failed(self, name: str, code: str, detail: str) -> None:
        self.checks.append(Check(name, False, detail))
        self.failures.append(Reason(code, detail))


def load_public_key(der: bytes) -> PublicKey:
    """An AK from SubjectPublicKeyInfo DER; raises ``ParseError`` (``tpm.ak_public_invalid``)."""
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ParseError("tpm.ak_public_invalid", "ak_public is not SubjectPublicKeyInfo") from exc
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ParseError("tpm.ak_public_invalid", f"AK is a {type(key).__name__}, not RSA or EC")
    return key


def spki_der(key: PublicKey) -> bytes:
    """The SubjectPublicKeyInfo DER of ``key``: what ``ak_public_sha256`` hashes."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def signature_problem(key: PublicKey, message: bytes, signature: Signature) -> tuple[str, str]:
    """``("", "")`` if ``signature`` over ``message`` verifies with ``key``, else (code, detail)."""
    digest = signature.hash.algorithm()
    try:
        if signature.sig_alg is SigAlg.ECDSA:
            if not isinstance(key, ec.EllipticCurvePublicKey):
                return "tpm.signature_scheme_mismatch", "ECDSA signature but an RSA AK"
            if signature.ecdsa_r <= 0 or signature.ecdsa_s <= 0:
                return "tpm.signature_invalid", "ECDSA r or s is zero"
            der = encode_dss_signature(signature.ecdsa_r, signature.ecdsa_s)
            key.verify(der, message, ec.ECDSA(digest))
        else:
            if not isinstance(key, rsa.RSAPublicKey):
                return "tpm.signature_scheme_mismatch", f"{signature.sig_alg.name} but an EC AK"
            scheme: padding.AsymmetricPadding = padding.PKCS1v15()
            if signature.sig_alg is SigAlg.RSAPSS:
                scheme = padding.PSS(mgf=padding.MGF1(digest), salt_length=padding.PSS.AUTO)
            key.verify(signature.rsa, message, scheme, digest)
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        return "tpm.signature_invalid", (
            f"{signature.sig_alg.name}-{signature.hash.label.upper()} signature over TPMS_ATTEST "
            "does not verify with the AK"
        )
    return "", ""


def select_pcrs(attest: Attest, values: Sequence[bytes]) -> tuple[HashAlg, dict[int, bytes]]:
    """The quoted bank and ``{index: value}`` for the selected PCRs; ``ParseError`` otherwise."""
    banks = [s for s in attest.pcr_select if s.indices]
    if len(banks) != 1:
        raise ParseError(
            "tpm.pcr_values_invalid", f"the quote selects {len(banks)} PCR banks; exactly 1 needed"
        )
    bank, indices = banks[0].hash, banks[0].indices
    if len(values) == PCR_COUNT and max(indices) < PCR_COUNT:
        chosen = {i: values[i] for i in indices}
    elif len(values) == len(indices):
        chosen = dict(zip(indices, values, strict=True))
    else:
        raise ParseError(
            "tpm.pcr_values_invalid",
            f"{len(values)} PCR values for {len(indices)} selected PCRs (need 24 or exactly those)",
        )
    wrong = [i for i, value in chosen.items() if len(value) != bank.digest_size]
    if wrong:
        raise ParseError(
            "tpm.pcr_values_invalid",
            f"PCR{wrong[0]} is not a {bank.label} value ({bank.digest_size} bytes)",
        )
    return bank, chosen


def pcr_digest(hash_alg: HashAlg, values: Sequence[bytes]) -> bytes:
    """H(value_1 || ... || value_n): the pcrDigest of a quote over these values, in order."""
    return hashlib.new(hash_alg.label, b"".join(values)).digest()


def binding_of(extra_data: bytes, expected: bytes) -> str | None:
    """How extraData binds ``expected`` (``exact``, ``compact``, ``zero-padded``), or None."""
    if hmac.compare_digest(extra_data, expected):
        return "exact"
    if hmac.compare_digest(extra_data, hashlib.sha256(expected).digest()):
        return "compact"
    size = len(extra_data)
    padded = 0 < size < len(expected) and not any(expected[size:])
    if padded and hmac.compare_digest(extra_data, expected[:size]):
        return "zero-padded"
    return None


def verify_quote(
    attest: Attest,
    signature: Signature,
    pcr_values: Sequence[bytes],
    key: PublicKey,
    expected_report_data: bytes | None,
) -> QuoteResult:
    """Check signature, PCR digest and binding of a parsed quote; never raises for bad input."""
    result = QuoteResult(attest)
    code, detail = signature_problem(key, attest.raw, signature)
    if code:
        result.failed("quote_signature", code, detail)
    else:
        result.passed(
            "quote_signature", f"{signature.sig_alg.name}-{signature.hash.label.upper()} by the AK"
        )
    try:
        bank, chosen = select_pcrs(attest, pcr_values)
    except ParseError as exc:
        result.failed("pcr_digest", exc.reason, exc.detail)
    else:
        ordered = [chosen[i] for i in sorted(chosen)]
        recomputed = pcr_digest(signature.hash, ordered)
        if hmac.compare_digest(recomputed, attest.pcr_digest):
            result.bank, result.pcrs = bank, chosen
            result.passed("pcr_digest", f"{len(chosen)} {bank.label} PCRs match pcrDigest")
        else:
            result.failed(
                "pcr_digest",
                "tpm.pcr_digest_mismatch",
                f"{signature.hash.label} of the {len(chosen)} supplied {bank.label} PCR values "
                "is not the quote's pcrDigest",
            )
    if expected_report_data is not None:
        result.binding = binding_of(attest.extra_data, expected_report_data)
        if result.binding is None:
            detail = "extraData does not equal the expected report data (nor its SHA-256)"
            result.checks.append(Check("nonce", False, detail))
            result.binding_failures.append(Reason("tpm.nonce_mismatch", detail))
        else:
            result.passed("nonce", f"extraData binds the expected report data ({result.binding})")
    return result
