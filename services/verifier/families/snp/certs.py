"""VCEK/VLEK certificates: AMD's KDS extensions and the fixed chain VEK -> ASK/ASVK -> ARK.

AMD's chain cannot go through a generic path validator (the ARK/ASK use RSASSA-PSS with
explicitly encoded parameters, and every VEK has serial number 0), so each link is checked
directly with ``verify_directly_issued_by`` plus explicit validity and extension checks. The
ASK/ASVK -> ARK link was already checked when the trust store was loaded.

VEK certificates certify the TCB they were derived for in extensions under
``1.3.6.1.4.1.3704.1``: ``.3.1`` boot loader, ``.3.2`` TEE, ``.3.3`` SNP, ``.3.8`` microcode and
``.3.9`` FMC (Turin) SPLs as INTEGERs, ``.2`` the product name and ``.5`` the CSP ID (VLEK) as
IA5Strings, ``.4`` the hardware ID (VCEK; 64 raw bytes in older certificates, an OCTET STRING in
newer ones, 8 bytes on Turin).

Parsed VEKs and successful issuer checks are cached by the SHA-256 of their exact bytes: a
worker sees the same VCEKs over and over, and the cache makes a verification cost little more
than its ECDSA check. Only certificates of a genuine VEK's size are kept, so evidence carrying
oversized ones cannot fill the verifier's memory through the cache.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.utils import CryptographyDeprecationWarning

from services.mesh.errors import CollateralError, TrustError, VerificationError
from services.verifier.families.snp.parse import Product, SigningKey, TcbVersion
from services.verifier.trust import AmdAnchors, TrustStore

AMD_OID = "1.3.6.1.4.1.3704.1"
OID_STRUCT_VERSION = f"{AMD_OID}.1"
OID_PRODUCT_NAME = f"{AMD_OID}.2"
OID_BL_SPL = f"{AMD_OID}.3.1"
OID_TEE_SPL = f"{AMD_OID}.3.2"
OID_SNP_SPL = f"{AMD_OID}.3.3"
OID_UCODE_SPL = f"{AMD_OID}.3.8"
OID_FMC_SPL = f"{AMD_OID}.3.9"
OID_HWID = f"{AMD_OID}.4"
OID_CSP_ID = f"{AMD_OID}.5"

_SPL_OIDS = {"bootloader": OID_BL_SPL, "tee": OID_TEE_SPL, "snp": OID_SNP_SPL}
_SPL_OIDS["microcode"] = OID_UCODE_SPL
_TAG_INTEGER, _TAG_OCTET_STRING, _TAG_IA5 = 0x02, 0x04, 0x16
_HWID_SIZES = (64, 8)
TS = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class Vek:
    """A parsed VCEK or VLEK with the fields verification needs, extracted once."""

    kind: SigningKey
    der: bytes
    cert: x509.Certificate
    public_key: ec.EllipticCurvePublicKey
    tcb: TcbVersion
    product_name: str
    hwid: bytes | None
    csp_id: str | None
    issuer: x509.Name
    issuer_der: bytes
    not_before: datetime
    not_after: datetime

    @property
    def name(self) -> str:
        return self.kind.name


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Lru(Generic[K, V]):
    """A small thread-safe LRU map; workers verify from several threads at once."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


VEK_CACHE_SIZE = 2048
"""Parsed VEKs kept (about 8 KiB each): one per chip and TCB, so a verifier serving more
chips than this parses a VEK again for each report (at 512, a 2,000-node fleet spent 13 %
of the verifier's CPU re-parsing and re-checking VCEKs)."""
ISSUED_CACHE_SIZE = 4096
MAX_CACHED_VEK_BYTES = 4096
"""A genuine VCEK or VLEK is about 1.1 to 1.4 KB of DER; a larger one is parsed every time."""
_VEK_CACHE: Lru[tuple[bytes, SigningKey], Vek] = Lru(VEK_CACHE_SIZE)
_ISSUED_CACHE: Lru[bytes, bool] = Lru(ISSUED_CACHE_SIZE)


def clear_caches() -> None:
    """Forget cached VEKs and issuer checks (for tests: caches are keyed by digests of the
    exact bytes, so a rotated trust store or a new VEK never needs them cleared)."""
    _VEK_CACHE.clear()
    _ISSUED_CACHE.clear()


_SERIAL_ZERO_WARNING = "Parsed a serial number which wasn't positive"


def quiet_serial_zero_warning() -> None:
    """Silence cryptography's warning about serial number 0, which every genuine VEK has.

    Installed idempotently at use rather than at import, because test runners and embedding
    applications reset warning filters; ``catch_warnings`` is avoided as it is not thread-safe.
    """
    for action, message, category, _module, _line in warnings.filters:
        ours = action == "ignore" and category is CryptographyDeprecationWarning
        if ours and message is not None and message.pattern == _SERIAL_ZERO_WARNING:
            return
    warnings.filterwarnings(
        "ignore", message=_SERIAL_ZERO_WARNING, category=CryptographyDeprecationWarning
    )


def load_vek(blob: bytes, kind: SigningKey) -> Vek:
    """Parse a VCEK/VLEK (DER or PEM) and its AMD extensions; raises :class:`CollateralError`."""
    data = bytes(blob)
    if len(data) > MAX_CACHED_VEK_BYTES:
        return _parse_vek(data, kind)
    key = (hashlib.sha256(data).digest(), kind)
    cached = _VEK_CACHE.get(key)
    if cached is None:
        cached = _parse_vek(data, kind)
        _VEK_CACHE.put(key, cached)
    return cached


def _parse_vek(blob: bytes, kind: SigningKey) -> Vek:
    name = kind.name.lower()
    quiet_serial_zero_warning()
    try:
        if blob.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(blob)
        else:
            cert = x509.load_der_x509_certificate(blob)
        public_key = cert.public_key()
        extensions = {e.oid.dotted_string: e for e in cert.extensions}
        issuer = cert.issuer
        issuer_der = issuer.public_bytes()
        not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    except (ValueError, UnsupportedAlgorithm, x509.DuplicateExtension) as exc:
        raise CollateralError(f"snp.{name}_malformed", f"{kind.name} is not a certificate") from exc
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP384R1
    ):
        raise CollateralError(f"snp.{name}_key_invalid", f"{kind.name} key is not ECDSA P-384")

    def value(oid: str) -> bytes | None:
        ext = extensions.get(oid)
        if ext is None:
            return None
        if not isinstance(ext.value, x509.UnrecognizedExtension):
            raise _oid_error(kind, oid, "has an unexpected type")
        return ext.value.value

    spl: dict[str, int] = {}
    for part, oid in _SPL_OIDS.items():
        spl[part] = _der_u8(value(oid), kind, oid)
    fmc_raw = value(OID_FMC_SPL)
    fmc = None if fmc_raw is None else _der_u8(fmc_raw, kind, OID_FMC_SPL)
    _der_u8(value(OID_STRUCT_VERSION), kind, OID_STRUCT_VERSION)
    product_name = _der_ia5(value(OID_PRODUCT_NAME), kind, OID_PRODUCT_NAME)
    hwid_raw, csp_raw = value(OID_HWID), value(OID_CSP_ID)
    if kind is SigningKey.VCEK:
        if hwid_raw is None or csp_raw is not None:
            raise CollateralError(
                "snp.signing_key_mismatch", "report names the VCEK but the certificate is no VCEK"
            )
        hwid, csp_id = _hwid(hwid_raw, kind), None
    else:
        if csp_raw is None or hwid_raw is not None:
            raise CollateralError(
                "snp.signing_key_mismatch", "report names the VLEK but the certificate is no VLEK"
            )
        hwid, csp_id = None, _der_ia5(csp_raw, kind, OID_CSP_ID)
    return Vek(
        kind=kind,
        der=blob,
        cert=cert,
        public_key=public_key,
        tcb=TcbVersion(fmc=fmc, **spl),
        product_name=product_name,
        hwid=hwid,
        csp_id=csp_id,
        issuer=issuer,
        issuer_der=issuer_der,
        not_before=not_before,
        not_after=not_after,
    )


@dataclass(frozen=True)
class Issuer:
    """An ASK or ASVK of a trusted chain, with what verification reads from it precomputed."""

    anchors: AmdAnchors
    cert: x509.Certificate
    kind: SigningKey
    subject_der: bytes
    tbs: bytes
    cn: str
    not_before: datetime
    not_after: datetime
    ark_cn: str
    ark_subject_der: bytes
    ark_not_before: datetime
    ark_not_after: datetime


def _index(store: TrustStore) -> dict[tuple[SigningKey, bytes], tuple[Issuer, ...]]:
    index: dict[tuple[SigningKey, bytes], list[Issuer]] = {}
    for anchors in store.amd():
        ark = anchors.ark.cert
        for kind, cert in ((SigningKey.VCEK, anchors.ask), (SigningKey.VLEK, anchors.asvk)):
            if cert is None:
                continue
            issuer = Issuer(
                anchors=anchors,
                cert=cert,
                kind=kind,
                subject_der=cert.subject.public_bytes(),
                tbs=cert.tbs_certificate_bytes,
                cn=_cn(cert.subject),
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                ark_cn=_cn(ark.subject),
                ark_subject_der=ark.subject.public_bytes(),
                ark_not_before=ark.not_valid_before_utc,
                ark_not_after=ark.not_valid_after_utc,
            )
            index.setdefault((kind, issuer.subject_der), []).append(issuer)
    return {key: tuple(value) for key, value in index.items()}


def find_anchor(vek: Vek, store: TrustStore) -> Issuer:
    """The trusted ASK (VCEK) or ASVK (VLEK) that directly issued ``vek``, with its chain.

    Raises :class:`TrustError` (``snp.no_trust_anchor``) when no loaded intermediate has the
    VEK's issuer name, and :class:`VerificationError` (``snp.vcek_chain_invalid`` /
    ``snp.vlek_chain_invalid``) when none with that name signed it.
    """
    candidates = store.derived("snp.issuers", _index).get((vek.kind, vek.issuer_der), ())
    if not candidates:
        role = "ASK" if vek.kind is SigningKey.VCEK else "ASVK"
        loaded = ", ".join(store.labels()) or "none"
        raise TrustError(
            "snp.no_trust_anchor",
            f"no trusted {role} named {_cn(vek.issuer)} (anchors loaded: {loaded})",
        )
    for issuer in candidates:
        if _issued_by(vek, issuer):
            return issuer
    raise VerificationError(
        f"snp.{vek.kind.name.lower()}_chain_invalid",
        f"{vek.name} signature by {candidates[0].cn} does not verify",
    )


def _issued_by(vek: Vek, issuer: Issuer) -> bool:
    key = hashlib.sha256(vek.der).digest() + hashlib.sha256(issuer.tbs).digest()
    if _ISSUED_CACHE.get(key):
        return True
    try:
        vek.cert.verify_directly_issued_by(issuer.cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    _ISSUED_CACHE.put(key, True)
    return True


def validity_problems(vek: Vek, issuer: Issuer, now: datetime) -> list[tuple[str, str]]:
    """``(reason, detail)`` for every certificate of the chain not valid at ``now``."""
    problems: list[tuple[str, str]] = []
    chain = (
        (vek.name, vek.not_before, vek.not_after),
        (issuer.cn, issuer.not_before, issuer.not_after),
        (issuer.ark_cn, issuer.ark_not_before, issuer.ark_not_after),
    )
    for what, start, end in chain:
        if now < start:
            problems.append(("snp.cert_not_yet_valid", f"{what} is valid only from {start:{TS}}"))
        elif now > end:
            problems.append(("snp.cert_expired", f"{what} expired {end:{TS}}"))
    return problems


def tcb_mismatches(vek: Vek, reported: TcbVersion, product: Product) -> list[str]:
    """Components where REPORTED_TCB differs from the TCB the VEK certifies."""
    certified = vek.tcb.as_dict()
    if product is not Product.TURIN:
        certified.pop("fmc", None)
    elif "fmc" not in certified:
        return ["fmc (the Turin VEK certifies no FMC SPL)"]
    found = reported.as_dict()
    return [
        f"{part} {found.get(part)} != certified {spl}"
        for part, spl in certified.items()
        if found.get(part) != spl
    ]


def hwid_matches(vek: Vek, chip_id: bytes) -> bool:
    """Whether the VCEK's hardware ID is the report's CHIP_ID (8-byte Turin IDs zero-extended)."""
    hwid = vek.hwid or b""
    return hwid + bytes(len(chip_id) - len(hwid)) == chip_id


def product_of(vek: Vek) -> str:
    """The product prefix of the VEK's product name (``Milan-B0`` -> ``milan``)."""
    return vek.product_name.split("-", 1)[0].lower()


def _cn(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else "?"
    return value if isinstance(value, str) else value.decode(errors="replace")


def _oid_error(kind: SigningKey, oid: str, problem: str) -> CollateralError:
    return CollateralError(f"snp.{kind.name.lower()}_oid_invalid", f"{kind.name} {oid} {problem}")


def _der_value(data: bytes, tag: int, kind: SigningKey, oid: str) -> bytes:
    """The content of one DER TLV with ``tag`` spanning all of ``data`` (short/long lengths)."""
    if len(data) < 2 or data[0] != tag:
        raise _oid_error(kind, oid, f"is not DER tag 0x{tag:02x}")
    length, start = data[1], 2
    if length & 0x80:
        count = length & 0x7F
        if count not in (1, 2) or len(data) < 2 + count:
            raise _oid_error(kind, oid, "has a bad DER length")
        length = int.from_bytes(data[2 : 2 + count], "big")
        start = 2 + count
        if length < 0x80 or (count == 2 and length < 0x100):
            raise _oid_error(kind, oid, "has a non-minimal DER length")
    if start + length != len(data):
        raise _oid_error(kind, oid, "has a DER length that does not match its size")
    return data[start:]


def _der_u8(data: bytes | None, kind: SigningKey, oid: str) -> int:
    if data is None:
        raise _oid_error(kind, oid, "is missing")
    content = _der_value(data, _TAG_INTEGER, kind, oid)
    if not content or len(content) > 2 or (len(content) == 2 and (content[0] or content[1] < 0x80)):
        raise _oid_error(kind, oid, "is not a minimally encoded INTEGER in 0..255")
    if content[0] & 0x80 and len(content) == 1:
        raise _oid_error(kind, oid, "is a negative INTEGER")
    return content[-1]


def _der_ia5(data: bytes | None, kind: SigningKey, oid: str) -> str:
    if data is None:
        raise _oid_error(kind, oid, "is missing")
    content = _der_value(data, _TAG_IA5, kind, oid)
    if not content.isascii():
        raise _oid_error(kind, oid, "is not an IA5String")
    return content.decode("ascii")


def _hwid(data: bytes, kind: SigningKey) -> bytes:
    if len(data) in _HWID_SIZES:
        return data
    content = _der_value(data, _TAG_OCTET_STRING, kind, OID_HWID)
    if len(content) not in _HWID_SIZES:
        raise _oid_error(kind, OID_HWID, f"is {len(content)} bytes, not 64 (or 8 on Turin)")
    return content
