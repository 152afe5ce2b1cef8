"""Certificate chains, CRLs and raw ECDSA signatures as Intel's PKI uses them.

Every Intel chain is short and fixed: leaf -> (PCK Platform/Processor CA) -> Intel SGX Root CA.
Rather than a generic path builder, each link is checked directly (issuer signature, CA flag),
and the chain's root must be byte-identical to a pinned trust anchor. Link checks do not depend
on the clock, so their outcome is cached by the exact chain bytes; validity windows are checked
per call against the injected time. Intel signs with ECDSA P-256/SHA-256 and ships signatures as
raw ``r || s`` (32 bytes each, big-endian), converted here to DER for ``cryptography``.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from services.mesh.errors import ParseError

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
DECODE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)
"""What ``cryptography`` raises on undecodable certificates and CRLs (no common base class)."""
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
_CACHE_SIZE = 256


def common_name(name: x509.Name) -> str:
    """The first CN of ``name`` ("" when there is none)."""
    attrs = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not attrs:
        return ""
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode(errors="replace")


@dataclass(frozen=True)
class CertInfo:
    """What per-call checks need from a certificate, extracted once (``cryptography`` builds
    names and dates anew on every attribute access)."""

    cn: str
    issuer_der: bytes
    serial: int
    not_before: datetime
    not_after: datetime

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertInfo:
        return cls(
            cn=common_name(cert.subject),
            issuer_der=cert.issuer.public_bytes(),
            serial=cert.serial_number,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )


class Lru(Generic[K, V]):
    """A small thread-safe LRU map; values are computed outside the lock.

    Keys are tuples of bytes and anchor fingerprints rather than certificate objects, because
    hashing a ``cryptography`` certificate re-hashes its DER on every lookup.
    """

    def __init__(self, size: int = _CACHE_SIZE) -> None:
        self._size = size
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K, make: Callable[[], V]) -> V:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = make()
        self.put(key, value)
        return value

    def lookup(self, key: K) -> V | None:
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._data[key] = value
            while len(self._data) > self._size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


@functools.lru_cache(maxsize=_CACHE_SIZE)
def load_pem_chain(pem: bytes, what: str) -> tuple[x509.Certificate, ...]:
    """PEM certificates in order; a trailing NUL (as quoting enclaves emit) is tolerated.

    ``cryptography`` decodes certificate fields lazily, so every field later code reads is
    touched here: a malformed certificate is a ParseError now, not a ValueError later.
    """
    text = pem.rstrip(b"\0")
    if b"\0" in text:
        raise ParseError("dcap.chain_malformed", f"{what}: NUL byte inside the PEM text")
    try:
        certs = tuple(x509.load_pem_x509_certificates(text))
        for cert in certs:
            CertInfo.of(cert)
            _ = cert.subject, cert.extensions, cert.signature_hash_algorithm
            cert.public_key()
    except DECODE_ERRORS as exc:
        raise ParseError("dcap.chain_malformed", f"{what}: malformed certificate") from exc
    return certs


def p256_key(raw: bytes) -> ec.EllipticCurvePublicKey | None:
    """A P-256 public key from the raw 64-byte ``x || y`` encoding, or None if not on the curve."""
    return _p256_key(bytes(raw))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _p256_key(raw: bytes) -> ec.EllipticCurvePublicKey | None:
    if len(raw) != 64:
        return None
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        return None


def verify_raw_ecdsa(key: ec.EllipticCurvePublicKey, signature: bytes, message: bytes) -> bool:
    """Verify a raw ``r || s`` ECDSA-SHA256 signature; False rather than raising."""
    half = len(signature) // 2
    if len(signature) != 64 or not isinstance(key.curve, ec.SECP256R1):
        return False
    r = int.from_bytes(signature[:half], "big")
    s = int.from_bytes(signature[half:], "big")
    try:
        key.verify(encode_dss_signature(r, s), message, _ECDSA_SHA256)
    except InvalidSignature:
        return False
    return True


@functools.lru_cache(maxsize=_CACHE_SIZE)
def verify_raw_ecdsa_cached(key_der: bytes, signature: bytes, message: bytes) -> bool:
    """:func:`verify_raw_ecdsa` memoised on the exact inputs, for statements that recur.

    A platform's QE report (and so the PCK's signature over it) is the same in every quote it
    produces, so its verification is a pure function of bytes that repeat.
    """
    key = serialization.load_der_public_key(key_der)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    return verify_raw_ecdsa(key, signature, message)


def public_key_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """``cert`` names ``issuer`` as issuer and carries a valid signature by its key."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def is_ca(cert: x509.Certificate) -> bool:
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError, x509.DuplicateExtension):
        return False
    return basic.ca


@dataclass(frozen=True)
class ChainCheck:
    """Time-independent outcome of checking a chain up to a pinned root."""

    problem: str | None
    """None when every link holds; else what failed, in the spec's words."""
    untrusted_root: bool = False
    """The chain is well formed but ends in a root that is not the pinned anchor."""


@functools.lru_cache(maxsize=_CACHE_SIZE)
def check_links(certs: tuple[x509.Certificate, ...], anchor: x509.Certificate) -> ChainCheck:
    """Each certificate issued by the next; intermediates are CAs; the last is ``anchor``."""
    if len(certs) < 2:
        return ChainCheck(f"chain has {len(certs)} certificate(s); a leaf and the root needed")
    root = certs[-1]
    if root != anchor:
        return ChainCheck(
            f"chain ends in '{common_name(root.subject)}', not the pinned Intel root",
            untrusted_root=True,
        )
    for cert, issuer in itertools.pairwise(certs):
        if issuer is not root and not is_ca(issuer):
            return ChainCheck(f"'{common_name(issuer.subject)}' is not a CA")
        if not issued_by(cert, issuer):
            return ChainCheck(
                f"'{common_name(cert.subject)}' is not signed by '{common_name(issuer.subject)}'"
            )
    return ChainCheck(None)


def chain_window(certs: Sequence[CertInfo]) -> tuple[datetime | None, datetime | None]:
    """The span in which every certificate of ``certs`` is valid (None bounds when empty)."""
    if not certs:
        return None, None
    return max(c.not_before for c in certs), min(c.not_after for c in certs)


def validity_problem(certs: Sequence[CertInfo], now: datetime) -> str | None:
    """The first certificate whose validity window does not contain ``now``, described."""
    for cert in certs:
        if now < cert.not_before:
            return f"'{cert.cn}' is not valid before {cert.not_before}"
        if now > cert.not_after:
            return f"'{cert.cn}' expired at {cert.not_after}"
    return None


@dataclass(frozen=True)
class Crl:
    """A parsed CRL: issuer, window and revoked serials, and whether ``signer`` signed it."""

    issuer_der: bytes
    issuer_cn: str
    last_update: datetime
    next_update: datetime | None
    revoked: frozenset[int]
    signature_ok: bool

    def window_problem(self, now: datetime) -> str | None:
        if now < self.last_update:
            return f"CRL of '{self.issuer_cn}' is not valid before {self.last_update}"
        if self.next_update is None or now > self.next_update:
            return f"CRL of '{self.issuer_cn}' expired at {self.next_update}"
        return None

    def revokes(self, cert: CertInfo) -> bool:
        return cert.issuer_der == self.issuer_der and cert.serial in self.revoked


@functools.lru_cache(maxsize=_CACHE_SIZE)
def load_crl(der: bytes, signer: x509.Certificate, what: str) -> Crl:
    """Parse a DER CRL and check its signature by ``signer``'s key (ParseError if malformed)."""
    try:
        crl = x509.load_der_x509_crl(der)
        revoked = frozenset(entry.serial_number for entry in crl)
        issuer = crl.issuer
        last, following = crl.last_update_utc, crl.next_update_utc
    except DECODE_ERRORS as exc:
        raise ParseError("dcap.crl_malformed", f"{what}: not a DER CRL") from exc
    key = signer.public_key()
    try:
        ok = issuer == signer.subject and crl.is_signature_valid(
            key  # type: ignore[arg-type]
        )
    except (TypeError, ValueError, UnsupportedAlgorithm):
        ok = False
    return Crl(
        issuer_der=issuer.public_bytes(),
        issuer_cn=common_name(issuer),
        last_update=last,
        next_update=following,
        revoked=revoked,
        signature_ok=ok,
    )
