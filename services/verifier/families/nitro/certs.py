"""The Nitro certificate chain: pinned root -> cabundle intermediates -> document certificate.

AWS's chain is fixed in shape (root, regional, zonal, instance, then the ~3-hour document
certificate; all ECDSA P-384 with SHA-384), so each link is checked directly rather than by a
generic path builder -- ``cryptography``'s web-PKI verifier wants extensions (SAN, AKI, EKU) the
Nitro PKI does not issue. A link holds when the child names its parent as issuer and carries
the parent key's ECDSA-SHA384 signature; CA certificates must be critical-basic-constraints CAs
with ``keyCertSign`` and a path length that admits the CAs below them; the leaf must not be a CA.

Trust comes only from the pinned anchor: the bundle's first certificate must be that anchor
(the same DER, or the same subject and key -- a re-signed copy of the root certifies nothing
new), and the chain is built from the anchor itself, never from the bundle's copy.

Link checks and certificate decoding do not depend on the clock, so both are memoised on the
exact DER bytes: a busy verifier sees the same regional, zonal and instance certificates in every
document, and an enclave's document certificate for three hours. Validity windows are checked on
every call against the injected time.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.verifier.trust import Anchor

_DECODE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)
"""What ``cryptography`` raises for undecodable certificates (there is no common base)."""
_NAME_LENGTH_WARNING = "Attribute's length must be"
_CACHE = 1024
TS = "%Y-%m-%dT%H:%M:%SZ"
E = TypeVar("E", bound=x509.ExtensionType)


class CertificateError(Exception):
    """A certificate cannot be used at all: ``code`` is the reason code to report."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class CertFacts:
    """What the chain checks need from one certificate, extracted once per DER."""

    der: bytes
    cert: x509.Certificate
    name: str
    subject_der: bytes
    spki_der: bytes
    not_before: datetime
    not_after: datetime
    is_ca: bool
    basic_critical: bool
    path_length: int | None
    key_cert_sign: bool
    digital_signature: bool | None
    ecdsa_sha384: bool
    key: ec.EllipticCurvePublicKey | None

    @property
    def p384_key(self) -> ec.EllipticCurvePublicKey | None:
        key = self.key
        return key if key is not None and isinstance(key.curve, ec.SECP384R1) else None


@functools.lru_cache(maxsize=_CACHE)
def load(der: bytes) -> CertFacts:
    """Decode ``der`` and every field the checks read; :class:`CertificateError` if unusable."""
    _quiet_name_length_warning()
    try:
        cert = x509.load_der_x509_certificate(der)
        basic = _extension(cert, x509.BasicConstraints)
        usage = _extension(cert, x509.KeyUsage)
        public = cert.public_key()
        facts = CertFacts(
            der=der,
            cert=cert,
            name=_name(cert.subject),
            subject_der=cert.subject.public_bytes(),
            spki_der=public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            is_ca=bool(basic and basic.value.ca),
            basic_critical=bool(basic and basic.critical),
            path_length=basic.value.path_length if basic else None,
            key_cert_sign=bool(usage and usage.value.key_cert_sign),
            digital_signature=usage.value.digital_signature if usage else None,
            ecdsa_sha384=cert.signature_algorithm_oid
            == x509.SignatureAlgorithmOID.ECDSA_WITH_SHA384,
            key=public if isinstance(public, ec.EllipticCurvePublicKey) else None,
        )
    except _DECODE_ERRORS as exc:
        raise CertificateError("nitro.cert_malformed", f"undecodable certificate: {exc}") from exc
    return facts


def _quiet_name_length_warning() -> None:
    """Silence ``cryptography``'s warning about over-long name attributes (a 7-letter country),
    which any attacker-supplied certificate can trigger.

    Installed idempotently at use, as test runners reset filters; ``catch_warnings`` is avoided
    because it is not thread-safe. Such a certificate still fails on its signature.
    """
    for action, message, category, _module, _line in warnings.filters:
        pattern = message.pattern if message is not None else None
        if action == "ignore" and category is UserWarning and pattern == _NAME_LENGTH_WARNING:
            return
    warnings.filterwarnings("ignore", message=_NAME_LENGTH_WARNING, category=UserWarning)


def _extension(cert: x509.Certificate, kind: type[E]) -> x509.Extension[E] | None:
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def _name(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else name.rfc4514_string()
    return value if isinstance(value, str) else value.decode(errors="replace")


@functools.lru_cache(maxsize=_CACHE)
def issued_by(child_der: bytes, parent_der: bytes) -> bool:
    """``child`` names ``parent`` as issuer and carries a valid signature by its key."""
    try:
        load(child_der).cert.verify_directly_issued_by(load(parent_der).cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm, CertificateError):
        return False
    return True


@functools.lru_cache(maxsize=64)
def anchor_facts(anchor: Anchor) -> CertFacts:
    """The anchor's facts (anchors are immutable and few, so this is computed once each)."""
    return load(anchor.cert.public_bytes(serialization.Encoding.DER))


@dataclass
class ChainResult:
    """The outcome of :func:`check_chain`: problems as (code, detail), plus what was found."""

    problems: list[tuple[str, str]] = field(default_factory=list)
    anchor: Anchor | None = None
    path: list[CertFacts] = field(default_factory=list)

    def fail(self, code: str, detail: str) -> None:
        self.problems.append((code, detail))


def find_anchor(root: CertFacts, anchors: tuple[Anchor, ...]) -> Anchor | None:
    """The pinned anchor ``root`` is a copy of (same DER, or same subject and key)."""
    for anchor in anchors:
        facts = anchor_facts(anchor)
        if facts.der == root.der or (
            facts.subject_der == root.subject_der and facts.spki_der == root.spki_der
        ):
            return anchor
    return None


def check_chain(
    leaf: CertFacts, cabundle: tuple[bytes, ...], anchors: tuple[Anchor, ...]
) -> ChainResult:
    """Build anchor -> cabundle[1:] -> leaf and check every link and CA constraint."""
    result = ChainResult()
    if not anchors:
        result.fail("nitro.no_trust_anchor", "the trust store has no AWS Nitro Enclaves root")
        return result
    try:
        bundle = [load(der) for der in cabundle]
    except CertificateError as exc:
        result.fail(exc.code, f"cabundle: {exc.detail}")
        return result
    anchor = find_anchor(bundle[0], anchors)
    if anchor is None:
        labels = ", ".join(a.label for a in anchors)
        result.fail(
            "nitro.no_trust_anchor",
            f"cabundle[0] ({bundle[0].name}) is not a trusted AWS Nitro root ({labels})",
        )
        return result
    result.anchor = anchor
    path = [anchor_facts(anchor), *bundle[1:], leaf]
    result.path = path
    for parent, child in itertools.pairwise(path):
        if not issued_by(child.der, parent.der):
            result.fail("nitro.chain_invalid", f"{child.name} is not issued by {parent.name}")
    for depth, facts in enumerate(path[1:-1], start=1):
        _check_ca(result, facts, cas_below=len(path) - depth - 2)
    for facts in path[1:]:
        if not facts.ecdsa_sha384:
            result.fail("nitro.chain_invalid", f"{facts.name} is not signed with ECDSA-SHA384")
    if leaf.is_ca:
        result.fail("nitro.chain_invalid", f"document certificate {leaf.name} is a CA")
    if leaf.digital_signature is False:
        result.fail("nitro.chain_invalid", f"{leaf.name} key usage lacks digitalSignature")
    return result


def _check_ca(result: ChainResult, facts: CertFacts, *, cas_below: int) -> None:
    if not (facts.is_ca and facts.basic_critical and facts.key_cert_sign):
        result.fail(
            "nitro.chain_invalid",
            f"{facts.name} is not a CA (critical basicConstraints CA and keyCertSign required)",
        )
    elif facts.path_length is not None and facts.path_length < cas_below:
        result.fail(
            "nitro.chain_invalid",
            f"{facts.name} allows {facts.path_length} CAs below it; the chain has {cas_below}",
        )


def validity_problems(path: list[CertFacts], now: datetime) -> list[tuple[str, str]]:
    """One problem per certificate of ``path`` outside its validity window at ``now``."""
    problems = []
    for facts in path:
        if now > facts.not_after:
            detail = f"{facts.name} expired at {facts.not_after:{TS}} (now {now:{TS}})"
            problems.append(("nitro.cert_expired", detail))
        elif now < facts.not_before:
            detail = f"{facts.name} is valid only from {facts.not_before:{TS}} (now {now:{TS}})"
            problems.append(("nitro.cert_not_yet_valid", detail))
    return problems
