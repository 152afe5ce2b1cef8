"""The AK certificate: its chain to a pinned TPM CA, and that it certifies the quoting key.

Cloud vTPM AK certificates are awkward for generic X.509 path validation (GCE's has an empty
subject and a *critical* TCG subjectAltName that path validators refuse), so the chain is checked
link by link, as for AMD's: each issuer is looked up by name among the trust store's ``tpm``
anchors (vendor roots and their pinned intermediates, or explicitly loaded test anchors), its
signature checked with ``verify_directly_issued_by``, then validity at the injected time, CA-ness
of issuers and digitalSignature on the leaf. The chain ends at a self-signed anchor, or at a
pinned intermediate whose issuer is not in the store (its own pin is the trust). Codes:

    tpm.ak_cert_malformed      not a DER certificate
    tpm.ak_cert_key_mismatch   the certificate's key is not ak_public
    tpm.ak_cert_not_for_signing  a CA certificate, or keyUsage without digitalSignature
    tpm.ak_cert_untrusted      no TPM anchor carries the issuer's name
    tpm.ak_cert_chain_invalid  an issuer's signature does not verify
    tpm.ak_cert_expired / tpm.ak_cert_not_yet_valid  outside a validity window
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from services.verifier.trust import Anchor, TrustStore

MAX_DEPTH = 4
_LONG_NAME_WARNING = r"Attribute's length must be >= 1 and <= 64"


def quiet_long_name_warning() -> None:
    """Silence cryptography's warning for CNs beyond X.520's 64 characters (GCE's are 79-84).

    The names are compared, never trusted for their length; a warning per parse would only
    flood the logs. Installed once (again if a test harness reset the filters).
    """
    for action, message, *_ in warnings.filters:
        if action == "ignore" and message is not None and message.pattern == _LONG_NAME_WARNING:
            return
    warnings.filterwarnings("ignore", message=_LONG_NAME_WARNING, category=UserWarning)


@dataclass
class AkCertResult:
    """The anchor reached (``None`` when the chain failed) and every problem found."""

    anchor: Anchor | None = None
    path: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.anchor is not None and not self.problems


@functools.lru_cache(maxsize=256)
def load_certificate(der: bytes) -> x509.Certificate | None:
    """A certificate from DER, or ``None`` (cached: a node sends the same AK certificate)."""
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "<empty subject>"


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        return None


def _validity(cert: x509.Certificate, now: datetime, what: str) -> list[tuple[str, str]]:
    if now < cert.not_valid_before_utc:
        return [("tpm.ak_cert_not_yet_valid", f"{what} is valid from {cert.not_valid_before_utc}")]
    if now > cert.not_valid_after_utc:
        return [("tpm.ak_cert_expired", f"{what} expired {cert.not_valid_after_utc}")]
    return []


@functools.lru_cache(maxsize=256)
def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer`` signed ``cert``; cached, as the answer never changes for a pair."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    basic = _extension(cert, x509.BasicConstraints)
    return isinstance(basic, x509.BasicConstraints) and basic.ca


def _leaf_problems(cert: x509.Certificate, ak_spki: bytes, spki: bytes) -> list[tuple[str, str]]:
    problems = []
    if spki != ak_spki:
        problems.append(("tpm.ak_cert_key_mismatch", "the AK certificate's key is not ak_public"))
    usage = _extension(cert, x509.KeyUsage)
    if _is_ca(cert) or (isinstance(usage, x509.KeyUsage) and not usage.digital_signature):
        problems.append(("tpm.ak_cert_not_for_signing", "the AK certificate is not for signing"))
    return problems


def verify_ak_cert(der: bytes, ak_spki: bytes, trust: TrustStore, now: datetime) -> AkCertResult:
    """Check the AK certificate ``der`` against ``ak_spki`` and the store's TPM anchors."""
    quiet_long_name_warning()
    result = AkCertResult()
    now = now if now.tzinfo else now.replace(tzinfo=UTC)
    leaf = load_certificate(der)
    if leaf is None:
        result.problems.append(("tpm.ak_cert_malformed", "the AK certificate is not DER X.509"))
        return result
    try:
        leaf_spki = leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, UnsupportedAlgorithm):
        result.problems.append(("tpm.ak_cert_malformed", "the AK certificate's key is unreadable"))
        return result
    result.problems += _leaf_problems(leaf, ak_spki, leaf_spki)
    result.problems += _validity(leaf, now, "AK certificate")
    result.path.append(_name(leaf))
    anchors = trust.anchors("tpm")
    cert = leaf
    for _ in range(MAX_DEPTH):
        named = [a for a in anchors if a.cert.subject == cert.issuer]
        if not named:
            if result.anchor is None:
                result.problems.append(
                    ("tpm.ak_cert_untrusted", "no TPM trust anchor issued the AK certificate")
                )
            break
        issuer = next((a for a in named if _issued_by(cert, a.cert)), None)
        if issuer is None:
            result.problems.append(
                ("tpm.ak_cert_chain_invalid", f"{_name(cert)} is not signed by {named[0].label}")
            )
            result.anchor = None
            break
        result.anchor = issuer
        result.path.append(issuer.label)
        result.problems += _validity(issuer.cert, now, issuer.label)
        if not _is_ca(issuer.cert):
            result.problems.append(("tpm.ak_cert_chain_invalid", f"{issuer.label} is not a CA"))
        if issuer.cert.subject == issuer.cert.issuer:
            break
        cert = issuer.cert
    return result
