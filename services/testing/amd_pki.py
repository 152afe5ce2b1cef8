"""A test PKI shaped like AMD's: ARK -> ASK/ASVK -> VCEK/VLEK, with one override knob per cert.

The certificates reproduce what makes AMD's chain awkward, so tests exercise the same code paths
as real evidence: RSASSA-PSS/SHA-384 signatures whose AlgorithmIdentifier spells out every
parameter (including the default trailer field, which strict DER omits), VEKs with serial number
0 and ECDSA P-384 keys, and the KDS extensions (SPLs, product name, hwID or CSP ID). RSA keys are
2048-bit (AMD's are 4096) and generated once per process, so building chains stays fast.

A chain is only ever trusted through :meth:`AmdTestPki.write_trust_dir` plus the trust store's
explicit test-anchor loader, so a test PKI can never pass for AMD's.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from services.verifier.families.snp import certs as snp_certs
from services.verifier.families.snp.parse import Product, SigningKey, TcbVersion

RSA_BITS = 2048

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_OID_RSASSA_PSS = bytes.fromhex("06092a864886f70d01010a")
_OID_SHA384 = bytes.fromhex("0609608648016503040202")
_OID_MGF1 = bytes.fromhex("06092a864886f70d010108")
_NULL = b"\x05\x00"


def _tlv(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + content


def der_integer(value: int) -> bytes:
    """DER INTEGER for a non-negative ``value``."""
    return _tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def der_ia5(text: str) -> bytes:
    return _tlv(0x16, text.encode("ascii"))


def der_octets(data: bytes) -> bytes:
    return _tlv(0x04, data)


def _children(der: bytes) -> list[bytes]:
    """The complete TLVs inside one DER SEQUENCE."""
    length, start = der[1], 2
    if length & 0x80:
        start = 2 + (length & 0x7F)
    out, pos = [], start
    while pos < len(der):
        size, head = der[pos + 1], 2
        if size & 0x80:
            count = size & 0x7F
            size, head = int.from_bytes(der[pos + 2 : pos + 2 + count], "big"), 2 + count
        out.append(der[pos : pos + head + size])
        pos += head + size
    return out


_SHA384_ALG = _tlv(0x30, _OID_SHA384 + _NULL)
AMD_PSS_ALGORITHM = _tlv(
    0x30,
    _OID_RSASSA_PSS
    + _tlv(
        0x30,
        _tlv(0xA0, _SHA384_ALG)
        + _tlv(0xA1, _tlv(0x30, _OID_MGF1 + _SHA384_ALG))
        + _tlv(0xA2, der_integer(48))
        + _tlv(0xA3, der_integer(1)),
    ),
)
"""RSASSA-PSS(SHA-384, MGF1-SHA-384, salt 48, trailer 1) spelled out in full, as AMD does."""


_KEYS: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey] = {}
_KEYS_LOCK = threading.Lock()


def rsa_key(label: str) -> rsa.RSAPrivateKey:
    """A process-wide RSA key per ``label`` (generation dominates test time otherwise)."""
    with _KEYS_LOCK:
        key = _KEYS.get(f"rsa:{label}")
        if key is None:
            key = _KEYS[f"rsa:{label}"] = rsa.generate_private_key(65537, RSA_BITS)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def ec_key(label: str) -> ec.EllipticCurvePrivateKey:
    """A process-wide P-384 key per ``label``."""
    with _KEYS_LOCK:
        key = _KEYS.get(f"ec:{label}")
        if key is None:
            key = _KEYS[f"ec:{label}"] = ec.generate_private_key(ec.SECP384R1())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


@dataclass(frozen=True)
class CertOverride:
    """One way to make a certificate wrong; the default makes it right."""

    wrong_issuer: bool = False
    """Signed by an unrelated key under the right issuer name."""
    wrong_key: bool = False
    """Certifies a key other than the one that signs the next link (or the report)."""
    expired: bool = False
    """Validity ended a day before the PKI's ``now``."""
    not_yet_valid: bool = False
    """Validity starts a day after the PKI's ``now``."""
    drop_oids: frozenset[str] = frozenset()
    """AMD extensions (dotted OIDs) to leave out of a VEK."""
    replace_oids: Mapping[str, bytes] = field(default_factory=dict)
    """AMD extension values (dotted OID -> raw extnValue bytes) to put in a VEK instead."""
    tcb: TcbVersion | None = None
    """The TCB a VEK certifies, instead of the platform's."""
    hwid: bytes | None = None
    """The hwID a VCEK certifies, instead of the chip's."""


OK = CertOverride()


@dataclass(frozen=True)
class IssuedVek:
    """A test VCEK/VLEK and the private key that signs reports as that endorsement key."""

    kind: SigningKey
    der: bytes
    signing_key: ec.EllipticCurvePrivateKey
    tcb: TcbVersion

    @property
    def cert(self) -> x509.Certificate:
        snp_certs.quiet_serial_zero_warning()
        return x509.load_der_x509_certificate(self.der)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def collateral_name(self) -> str:
        return f"{self.kind.name.lower()}.der"


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


class AmdTestPki:
    """One product's test chain (ARK, ASK, ASVK), issuing VCEKs and VLEKs on demand."""

    def __init__(
        self,
        product: Product | str = Product.MILAN,
        *,
        now: datetime | None = None,
        ark: CertOverride = OK,
        ask: CertOverride = OK,
        asvk: CertOverride = OK,
    ) -> None:
        self.product = Product(product)
        self.now = (now or datetime.now(UTC)).replace(microsecond=0)
        title = self.product.value.capitalize()
        self._ark_key = rsa_key(f"{self.product}:ark")
        self._ask_key = rsa_key(f"{self.product}:ask")
        self._asvk_key = rsa_key(f"{self.product}:asvk")
        ark_name = _name(f"ARK-{title}")
        self.ark = self._ca(
            ark_name,
            ark_name,
            self._ark_key,
            self._ark_key,
            override=ark,
            serial=0x10000,
            path_length=None,
        )
        self.ask = self._ca(
            _name(f"SEV-{title}"),
            ark_name,
            self._ask_key,
            self._ark_key,
            override=ask,
            serial=0x10001,
            path_length=0,
        )
        self.asvk = self._ca(
            _name(f"SEV-VLEK-{title}"),
            ark_name,
            self._asvk_key,
            self._ark_key,
            override=asvk,
            serial=0x10101,
            path_length=0,
        )

    def chain_pem(self) -> bytes:
        """ARK, ASK, ASVK as PEM, in the trust directory's order."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.certificates())

    def certificates(self) -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
        return self.ark, self.ask, self.asvk

    def write_trust_dir(self, root: Path) -> Path:
        """Write ``root/amd/<product>.pem`` (ARK, ASK, ASVK) for the test-anchor loader."""
        path = root / "amd" / f"{self.product.value}.pem"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.chain_pem())
        return root

    def issue_vcek(
        self, *, tcb: TcbVersion, chip_id: bytes, override: CertOverride = OK
    ) -> IssuedVek:
        """A VCEK for ``chip_id`` at ``tcb`` (the hwID is 8 bytes on Turin, 64 otherwise)."""
        hwid = chip_id[:8] if self.product is Product.TURIN else chip_id
        key = ec_key(f"{self.product}:vcek:{chip_id.hex()}:{tcb.encode().hex()}")
        certified_hwid = override.hwid if override.hwid is not None else hwid
        extra = {snp_certs.OID_HWID: der_octets(certified_hwid)}
        product_name = f"{self.product.value.capitalize()}-B0"
        return self._vek(
            SigningKey.VCEK, key, tcb, extra, product_name=product_name, override=override
        )

    def issue_vlek(
        self, *, tcb: TcbVersion, csp_id: str = "CN=test-csp", override: CertOverride = OK
    ) -> IssuedVek:
        """A VLEK for a cloud provider ``csp_id`` at ``tcb``."""
        key = ec_key(f"{self.product}:vlek:{csp_id}:{tcb.encode().hex()}")
        extra = {snp_certs.OID_CSP_ID: der_ia5(csp_id)}
        return self._vek(
            SigningKey.VLEK,
            key,
            tcb,
            extra,
            product_name=self.product.value.capitalize(),
            override=override,
        )

    def crl(
        self,
        *,
        revoke: tuple[str, ...] = (),
        next_update: datetime | None = None,
        wrong_issuer: bool = False,
    ) -> bytes:
        """A DER CRL signed by the ARK (RSA-PSS), revoking ``"ask"``/``"asvk"`` as asked."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ark.subject)
            .last_update(self.now - timedelta(days=1))
            .next_update(next_update or self.now + timedelta(days=7))
        )
        for role in revoke:
            cert = {"ask": self.ask, "asvk": self.asvk}[role]
            revoked = x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
            builder = builder.add_revoked_certificate(revoked.revocation_date(self.now).build())
        signer = rsa_key("rogue:issuer") if wrong_issuer else self._ark_key
        crl = builder.sign(signer, hashes.SHA384(), rsa_padding=_PSS)
        return crl.public_bytes(serialization.Encoding.DER)

    def _validity(self, override: CertOverride, lifetime: timedelta) -> tuple[datetime, datetime]:
        if override.expired:
            return self.now - timedelta(days=60), self.now - timedelta(days=1)
        if override.not_yet_valid:
            return self.now + timedelta(days=1), self.now + lifetime
        return self.now - timedelta(days=30), self.now + lifetime

    def _ca(
        self,
        subject: x509.Name,
        issuer: x509.Name,
        key: rsa.RSAPrivateKey,
        issuer_key: rsa.RSAPrivateKey,
        *,
        override: CertOverride,
        serial: int,
        path_length: int | None,
    ) -> x509.Certificate:
        if override.drop_oids or override.replace_oids or override.tcb or override.hwid:
            raise ValueError("VEK-only overrides do not apply to ARK/ASK/ASVK")
        public = rsa_key("rogue:subject").public_key() if override.wrong_key else key.public_key()
        signer = rsa_key("rogue:issuer") if override.wrong_issuer else issuer_key
        start, end = self._validity(override, timedelta(days=365 * 25))
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public)
            .serial_number(1)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        )
        return x509.load_der_x509_certificate(_amd_sign(builder, signer, serial))

    def _vek(
        self,
        kind: SigningKey,
        key: ec.EllipticCurvePrivateKey,
        tcb: TcbVersion,
        extra: dict[str, bytes],
        *,
        product_name: str,
        override: CertOverride,
    ) -> IssuedVek:
        certified = override.tcb or tcb
        values: dict[str, bytes] = {
            snp_certs.OID_STRUCT_VERSION: der_integer(0),
            snp_certs.OID_PRODUCT_NAME: der_ia5(product_name),
            snp_certs.OID_BL_SPL: der_integer(certified.bootloader),
            snp_certs.OID_TEE_SPL: der_integer(certified.tee),
            snp_certs.OID_SNP_SPL: der_integer(certified.snp),
            **{f"{snp_certs.AMD_OID}.3.{n}": der_integer(0) for n in (4, 5, 6, 7)},
            snp_certs.OID_UCODE_SPL: der_integer(certified.microcode),
            **extra,
        }
        if certified.fmc is not None:
            values[snp_certs.OID_FMC_SPL] = der_integer(certified.fmc)
        values.update(override.replace_oids)
        public = ec_key("rogue:vek").public_key() if override.wrong_key else key.public_key()
        intermediate_key = self._ask_key if kind is SigningKey.VCEK else self._asvk_key
        issuer = self.ask if kind is SigningKey.VCEK else self.asvk
        signer = rsa_key("rogue:issuer") if override.wrong_issuer else intermediate_key
        start, end = self._validity(override, timedelta(days=365 * 7))
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(f"SEV-{kind.name}"))
            .issuer_name(issuer.subject)
            .public_key(public)
            .serial_number(1)
            .not_valid_before(start)
            .not_valid_after(end)
        )
        for oid, value in values.items():
            if oid not in override.drop_oids:
                ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)
                builder = builder.add_extension(ext, critical=False)
        der = _amd_sign(builder, signer, 0)
        return IssuedVek(kind=kind, der=der, signing_key=key, tcb=tcb)


def _amd_sign(builder: x509.CertificateBuilder, signer: rsa.RSAPrivateKey, serial: int) -> bytes:
    """Sign like AMD's KDS: explicit PSS parameters and any serial (0 included).

    cryptography refuses serial 0 and encodes PSS parameters minimally, so the TBS it builds is
    re-assembled with AMD's serial and AlgorithmIdentifier, then signed again.
    """
    draft = builder.sign(signer, hashes.SHA384(), rsa_padding=_PSS)
    parts = _children(draft.tbs_certificate_bytes)
    parts[1], parts[2] = der_integer(serial), AMD_PSS_ALGORITHM
    tbs = _tlv(0x30, b"".join(parts))
    signature = signer.sign(tbs, _PSS, hashes.SHA384())
    return _tlv(0x30, tbs + AMD_PSS_ALGORITHM + _tlv(0x03, b"\x00" + signature))


def save_keys(directory: Path) -> None:
    """Persist every key made so far (PEM, mode 0600) so other processes can sign alike."""
    from services.mesh.keys import write_private

    with _KEYS_LOCK:
        items = list(_KEYS.items())
    for label, key in items:
        path = directory / (hashlib.sha256(label.encode()).hexdigest()[:32] + ".pem")
        if not path.exists():
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            write_private(path, label.encode().hex().encode() + b"\n" + pem)


def load_keys(directory: Path) -> None:
    """Load keys persisted by :func:`save_keys` into this process's key cache."""
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.pem")):
        label_hex, _, pem = path.read_bytes().partition(b"\n")
        key = serialization.load_pem_private_key(pem, password=None)
        if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            with _KEYS_LOCK:
                _KEYS.setdefault(bytes.fromhex(label_hex.decode()).decode(), key)
