"""AMD's certificate revocation list: optional ``crl.der`` collateral, signed by the ARK.

AMD's KDS publishes one CRL per product, signed by the ARK with RSA-PSS, listing revoked
intermediates (ASK/ASVK); VEKs are never listed (they all have serial number 0). Revocation is
checked only when the CRL is supplied (verification does no I/O), but a CRL that is supplied must
be usable: a malformed, foreign or stale one is a failure, never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa

from services.verifier.families.snp.certs import TS, Issuer, Lru


@dataclass(frozen=True)
class _Crl:
    crl: x509.CertificateRevocationList | None
    issuer_der: bytes
    signed_by_ark: bool
    next_update: datetime | None


_CRL_CACHE: Lru[tuple[bytes, bytes], _Crl] = Lru(64)


def crl_problems(blob: bytes, issuer: Issuer, now: datetime) -> list[tuple[str, str]]:
    """``(reason, detail)`` if AMD's CRL (signed by the ARK) is unusable or revokes the ASK/ASVK.

    A CRL that is supplied must be valid: a bad one is a failure, never silently ignored.
    """
    key = (bytes(blob), issuer.anchors.ark.fingerprint.encode())
    parsed = _CRL_CACHE.get(key)
    if parsed is None:
        parsed = _parse_crl(key[0], issuer)
        _CRL_CACHE.put(key, parsed)
    if parsed.crl is None:
        return [("snp.crl_malformed", "crl.der is not a certificate revocation list")]
    if parsed.issuer_der != issuer.ark_subject_der or not parsed.signed_by_ark:
        return [("snp.crl_invalid", f"CRL is not signed by {issuer.ark_cn}")]
    problems: list[tuple[str, str]] = []
    if parsed.next_update is not None and now > parsed.next_update:
        problems.append(("snp.crl_stale", f"CRL expired {parsed.next_update:{TS}}"))
    if parsed.crl.get_revoked_certificate_by_serial_number(issuer.cert.serial_number) is not None:
        problems.append(("snp.cert_revoked", f"{issuer.cn} is revoked by {issuer.ark_cn}"))
    return problems


def _parse_crl(blob: bytes, issuer: Issuer) -> _Crl:
    """Decode everything up front: cryptography decodes CRL fields lazily, and may raise late."""
    try:
        if blob.lstrip().startswith(b"-----BEGIN"):
            crl = x509.load_pem_x509_crl(blob)
        else:
            crl = x509.load_der_x509_crl(blob)
        issuer_der = crl.issuer.public_bytes()
        next_update = crl.next_update_utc
        ark_key = issuer.anchors.ark.cert.public_key()
        signed = isinstance(ark_key, rsa.RSAPublicKey) and crl.is_signature_valid(ark_key)
        list(crl)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return _Crl(None, b"", False, None)
    return _Crl(crl, issuer_der, signed, next_update)


def clear_cache() -> None:
    _CRL_CACHE.clear()
