"""A test PKI shaped like Intel's DCAP PKI, with the collateral and quotes it signs.

Root CA -> PCK Platform CA -> PCK leaf (with the SGX extension: FMSPC, PCE ID, TCB SVNs), and
Root CA -> TCB Signing, which signs TCB info and QE identity exactly as PCS serves them
(``{"tcbInfo":<signed bytes>,"signature":"<hex r||s>"}``); CRLs of the root and the platform CA;
and a quoting-enclave stand-in that produces TDX (v4, v5) and SGX (v3) quotes. Names, key types
and encodings follow Intel's, so tests exercise the verifier's real code paths. Every item has
one override knob (expired, not yet valid, wrong signer, tampered...) for negative tests.

The root is only ever trusted as a *test* anchor (:meth:`IntelTestPki.trust_store`), so nothing
built here can pass for Intel's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from services.verifier.families.dcap.pck import SGX_EXTENSIONS_OID
from services.verifier.families.dcap.quote import INTEL_QE_VENDOR_ID, TEE_SGX, TEE_TDX
from services.verifier.trust import Anchor, TrustStore, fingerprint

DAY = timedelta(days=1)
QE_MRSIGNER = bytes.fromhex("8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff")
FMSPC = bytes.fromhex("50806f000000")
PCE_ID = b"\x00\x00"


@functools.cache
def p256_key(label: str) -> ec.EllipticCurvePrivateKey:
    """A process-wide P-256 key per ``label``."""
    return ec.generate_private_key(ec.SECP256R1())


def raw_sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """ECDSA-SHA256 as Intel ships it: raw ``r || s``, 32 bytes each."""
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def raw_public(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The 64-byte ``x || y`` form of a P-256 public key."""
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return point[1:]


def _tlv(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + content


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([arcs[0] * 40 + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        body.extend(reversed(chunk))
    return _tlv(0x06, bytes(body))


def _pair(dotted: str, value: bytes) -> bytes:
    return _tlv(0x30, _oid(dotted) + value)


def sgx_extension(
    components: Sequence[int], pce_svn: int, fmspc: bytes, pce_id: bytes = PCE_ID
) -> bytes:
    """The DER value of the SGX extension certifying this platform TCB."""
    base = SGX_EXTENSIONS_OID
    tcb = b"".join(
        _pair(f"{base}.2.{i + 1}", _tlv(0x02, bytes([svn]))) for i, svn in enumerate(components)
    )
    tcb += _pair(f"{base}.2.17", _tlv(0x02, pce_svn.to_bytes(2, "big")))
    tcb += _pair(f"{base}.2.18", _tlv(0x04, bytes(components)))
    return _tlv(
        0x30,
        _pair(f"{base}.1", _tlv(0x04, bytes(range(16))))
        + _pair(f"{base}.2", _tlv(0x30, tcb))
        + _pair(f"{base}.3", _tlv(0x04, pce_id))
        + _pair(f"{base}.4", _tlv(0x04, fmspc))
        + _pair(f"{base}.5", _tlv(0x0A, b"\x00")),
    )


@dataclass(frozen=True)
class CertOverride:
    """One way to make a certificate wrong; the default makes it right."""

    wrong_issuer: bool = False
    """Signed by an unrelated key under the right issuer name."""
    expired: bool = False
    """Validity ended a day before the PKI's ``now``."""
    not_yet_valid: bool = False
    """Validity starts a day after the PKI's ``now``."""
    extension: bytes | None = None
    """For a PCK: this raw SGX extension value instead of the platform's."""


@dataclass(frozen=True)
class DocOverride:
    """One way to make a signed collateral document (or CRL) wrong."""

    expired: bool = False
    """nextUpdate a day before ``now``."""
    not_yet_valid: bool = False
    """issueDate a day after ``now``."""
    wrong_signer: bool = False
    """Signed by an unrelated key (the issuer chain still names the real signer)."""
    tamper: bool = False
    """A byte of the signed content changed after signing."""


OK = CertOverride()
GOOD = DocOverride()


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Intel Corporation"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca, content_commitment=not ca, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _hex(value: bytes) -> str:
    return value.hex().upper()


def tcb_level(
    sgx: Sequence[int],
    pce_svn: int,
    status: str,
    *,
    tdx: Sequence[int] | None = None,
    advisories: Iterable[str] = (),
    date: str = "2024-01-01T00:00:00Z",
) -> dict[str, Any]:
    """One TCB info v3 level (``tdx`` components only for TDX TCB info)."""
    tcb: dict[str, Any] = {"sgxtcbcomponents": [{"svn": s} for s in sgx], "pcesvn": pce_svn}
    if tdx is not None:
        tcb["tdxtcbcomponents"] = [{"svn": s} for s in tdx]
    level: dict[str, Any] = {"tcb": tcb, "tcbDate": date, "tcbStatus": status}
    advisories = list(advisories)
    if advisories:
        level["advisoryIDs"] = advisories
    return level


@dataclass(frozen=True)
class Platform:
    """One simulated machine: its PCK and the quoting enclave's attestation key."""

    pck_der: bytes
    pck_key: ec.EllipticCurvePrivateKey
    chain_pem: bytes
    attestation_key: ec.EllipticCurvePrivateKey
    components: tuple[int, ...]
    pce_svn: int
    qe_svn: int = 4
    qe_mrsigner: bytes = QE_MRSIGNER
    qe_prod_id: int = 2
    qe_attributes: bytes = bytes([0x11]) + bytes(15)

    @property
    def pck(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.pck_der)


@dataclass(frozen=True)
class TdFields:
    """TD report fields for a simulated quote (everything else is zero)."""

    tee_tcb_svn: bytes = bytes([4, 1, 2]) + bytes(13)
    mr_td: bytes = b"\x11" * 48
    rtmrs: tuple[bytes, ...] = (b"\x21" * 48, b"\x22" * 48, b"\x23" * 48, b"\x24" * 48)
    report_data: bytes = b"\x5a" * 64
    td_attributes: bytes = bytes.fromhex("0000001000000000")
    mr_signer_seam: bytes = bytes(48)
    seam_attributes: bytes = bytes(8)
    tee_tcb_svn2: bytes | None = None
    mr_servicetd: bytes = bytes(48)

    def encode(self) -> bytes:
        body = (
            self.tee_tcb_svn + b"\x33" * 48 + self.mr_signer_seam + self.seam_attributes
            + self.td_attributes + bytes.fromhex("e702060000000000") + self.mr_td
            + bytes(48 * 3) + b"".join(self.rtmrs) + self.report_data
        )  # fmt: skip
        if self.tee_tcb_svn2 is not None:
            body += self.tee_tcb_svn2 + self.mr_servicetd
        return body


def enclave_report(
    *,
    report_data: bytes = bytes(64),
    attributes: bytes = bytes([0x05]) + bytes(7) + bytes([0xE7]) + bytes(7),
    mr_enclave: bytes = b"\x44" * 32,
    mr_signer: bytes = b"\x55" * 32,
    isv_prod_id: int = 1,
    isv_svn: int = 3,
    cpu_svn: bytes = bytes(16),
) -> bytes:
    """A 384-byte SGX REPORT body."""
    return (
        cpu_svn + bytes(16) + bytes(16) + attributes + mr_enclave + bytes(32) + mr_signer
        + bytes(32) + bytes(64) + struct.pack("<HHH", isv_prod_id, isv_svn, 0) + bytes(42)
        + bytes(16) + report_data
    )  # fmt: skip


@dataclass
class IntelTestPki:
    """Intel's DCAP PKI in miniature; ``now`` is the time every item is valid at."""

    now: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))
    root: CertOverride = OK
    platform_ca: CertOverride = OK
    tcb_signing: CertOverride = OK

    def __post_init__(self) -> None:
        self.root_key = p256_key("intel:root")
        self.ca_key = p256_key("intel:platform-ca")
        self.tcb_key = p256_key("intel:tcb-signing")
        root_name = _name("Intel SGX Root CA")
        self.root_cert = self._cert(root_name, root_name, self.root_key, self.root_key, self.root,
                                    ca=True)  # fmt: skip
        self.ca_cert = self._cert(_name("Intel SGX PCK Platform CA"), root_name, self.ca_key,
                                  self.root_key, self.platform_ca, ca=True)  # fmt: skip
        self.tcb_cert = self._cert(_name("Intel SGX TCB Signing"), root_name, self.tcb_key,
                                   self.root_key, self.tcb_signing, ca=False)  # fmt: skip
        self._serial = 0x1000

    def _cert(
        self,
        subject: x509.Name,
        issuer: x509.Name,
        key: ec.EllipticCurvePrivateKey,
        signer: ec.EllipticCurvePrivateKey,
        override: CertOverride,
        *,
        ca: bool,
        extension: bytes | None = None,
    ) -> x509.Certificate:
        start, end = self.now - 365 * DAY, self.now + 365 * DAY
        if override.expired:
            start, end = self.now - 400 * DAY, self.now - DAY
        if override.not_yet_valid:
            start, end = self.now + DAY, self.now + 400 * DAY
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(_usage(ca=ca), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
            )
        )
        if extension is not None:
            oid = x509.ObjectIdentifier(SGX_EXTENSIONS_OID)
            builder = builder.add_extension(x509.UnrecognizedExtension(oid, extension), False)
        if override.wrong_issuer:
            signer = p256_key("intel:impostor")
        return builder.sign(signer, hashes.SHA256())

    def anchor(self) -> Anchor:
        """The test root as a trust anchor (origin ``test``)."""
        return Anchor("intel:sgx_root_ca", self.root_cert, "test", fingerprint(self.root_cert))

    def trust_store(self) -> TrustStore:
        return TrustStore([self.anchor()])

    def write_trust_dir(self, root: Path) -> Path:
        """Write ``root/intel/sgx_root_ca.pem`` for the trust store's test-anchor loader."""
        path = root / "intel" / "sgx_root_ca.pem"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_pem(self.root_cert))
        return path

    def platform(
        self,
        components: Sequence[int] = (5, 5, 2, 2, 3, 1, 0, 3) + (0,) * 8,
        pce_svn: int = 11,
        *,
        fmspc: bytes = FMSPC,
        pck: CertOverride = OK,
        label: str = "default",
        **qe: Any,
    ) -> Platform:
        """A machine with a fresh PCK certifying ``components``/``pce_svn``."""
        key = p256_key(f"intel:pck:{label}")
        extension = pck.extension or sgx_extension(components, pce_svn, fmspc)
        cert = self._cert(_name("Intel SGX PCK Certificate"), self.ca_cert.subject, key,
                          self.ca_key, pck, ca=False, extension=extension)  # fmt: skip
        return Platform(
            pck_der=cert.public_bytes(serialization.Encoding.DER),
            pck_key=key,
            chain_pem=_pem(cert, self.ca_cert, self.root_cert) + b"\0",
            attestation_key=p256_key(f"intel:attestation:{label}"),
            components=tuple(components),
            pce_svn=pce_svn,
            **qe,
        )

    def crl(
        self,
        issuer: str = "ca",
        revoked: Iterable[x509.Certificate] = (),
        override: DocOverride = GOOD,
    ) -> bytes:
        """A DER CRL of the platform CA (``issuer="ca"``) or of the root (``"root"``)."""
        cert, key = (self.ca_cert, self.ca_key) if issuer == "ca" else (self.root_cert,
                                                                         self.root_key)  # fmt: skip
        last, following = self.now - DAY, self.now + 30 * DAY
        if override.expired:
            last, following = self.now - 40 * DAY, self.now - DAY
        if override.not_yet_valid:
            last, following = self.now + DAY, self.now + 30 * DAY
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(cert.subject)
            .last_update(last)
            .next_update(following)
            .add_extension(x509.CRLNumber(1), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False
            )
        )
        for item in revoked:
            entry = x509.RevokedCertificateBuilder().serial_number(item.serial_number)
            builder = builder.add_revoked_certificate(entry.revocation_date(last).build())
        signer = p256_key("intel:impostor") if override.wrong_signer else key
        return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    def _signed(self, outer: str, document: dict[str, Any], override: DocOverride) -> bytes:
        issue, following = self.now - DAY, self.now + 29 * DAY
        if override.expired:
            issue, following = self.now - 31 * DAY, self.now - DAY
        if override.not_yet_valid:
            issue, following = self.now + DAY, self.now + 31 * DAY
        document = {
            **document,
            "issueDate": issue.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "nextUpdate": following.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        inner = json.dumps(document, separators=(",", ":")).encode()
        key = p256_key("intel:impostor") if override.wrong_signer else self.tcb_key
        signature = raw_sign(key, inner)
        if override.tamper:
            inner = inner.replace(b'"version":', b'"version": ', 1)
        return b'{"%s":%s,"signature":"%s"}' % (outer.encode(), inner, signature.hex().encode())

    def tcb_info(
        self,
        levels: Sequence[dict[str, Any]],
        *,
        tdx: bool = True,
        fmspc: bytes = FMSPC,
        override: DocOverride = GOOD,
        module_identities: Sequence[dict[str, Any]] | None = None,
        evaluation_data_number: int = 17,
    ) -> bytes:
        """A PCS TCB info response (v3) with these ``levels``."""
        document: dict[str, Any] = {
            "id": "TDX" if tdx else "SGX", "version": 3, "fmspc": _hex(fmspc),
            "pceId": _hex(PCE_ID), "tcbType": 0,
            "tcbEvaluationDataNumber": evaluation_data_number,
        }  # fmt: skip
        if tdx:
            zero_module = {"mrsigner": _hex(bytes(48)), "attributes": _hex(bytes(8)),
                           "attributesMask": "FFFFFFFFFFFFFFFF"}  # fmt: skip
            document["tdxModule"] = zero_module
            if module_identities is None:
                module_identities = [{
                    "id": "TDX_01", **zero_module,
                    "tcbLevels": [
                        {"tcb": {"isvsvn": 4}, "tcbDate": "2024-01-01T00:00:00Z",
                         "tcbStatus": "UpToDate"},
                        {"tcb": {"isvsvn": 2}, "tcbDate": "2023-01-01T00:00:00Z",
                         "tcbStatus": "OutOfDate", "advisoryIDs": ["INTEL-SA-01036"]},
                    ],
                }]  # fmt: skip
            document["tdxModuleIdentities"] = list(module_identities)
        document["tcbLevels"] = list(levels)
        return self._signed("tcbInfo", document, override)

    def qe_identity(
        self,
        *,
        tdx: bool = True,
        override: DocOverride = GOOD,
        levels: Sequence[tuple[int, str]] = ((4, "UpToDate"), (2, "OutOfDate")),
        mrsigner: bytes = QE_MRSIGNER,
    ) -> bytes:
        """A PCS QE identity response (``TD_QE`` or ``QE``, version 2)."""
        document = {
            "id": "TD_QE" if tdx else "QE", "version": 2, "tcbEvaluationDataNumber": 17,
            "miscselect": "00000000", "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": _hex(mrsigner), "isvprodid": 2,
            "tcbLevels": [
                {"tcb": {"isvsvn": svn}, "tcbDate": "2024-01-01T00:00:00Z", "tcbStatus": status,
                 **({"advisoryIDs": ["INTEL-SA-00615"]} if status != "UpToDate" else {})}
                for svn, status in levels
            ],
        }  # fmt: skip
        return self._signed("enclaveIdentity", document, override)

    def collateral(
        self,
        levels: Sequence[dict[str, Any]],
        *,
        tdx: bool = True,
        revoked: Iterable[x509.Certificate] = (),
        revoked_by_root: Iterable[x509.Certificate] = (),
        overrides: Mapping[str, DocOverride] | None = None,
    ) -> dict[str, bytes]:
        """All seven collateral files, in Intel's PCS layout.

        ``overrides`` maps ``tcb_info``, ``qe_identity``, ``pck_crl`` or ``root_crl`` to a
        :class:`DocOverride` for that item.
        """
        overrides = overrides or {}
        chain = _pem(self.tcb_cert, self.root_cert)
        return {
            "tcb_info.json": self.tcb_info(levels, tdx=tdx,
                                           override=overrides.get("tcb_info", GOOD)),
            "tcb_info_issuer_chain.pem": chain,
            "qe_identity.json": self.qe_identity(tdx=tdx,
                                                 override=overrides.get("qe_identity", GOOD)),
            "qe_identity_issuer_chain.pem": chain,
            "pck_crl.der": self.crl("ca", revoked, overrides.get("pck_crl", GOOD)),
            "pck_crl_issuer_chain.pem": _pem(self.ca_cert, self.root_cert),
            "root_ca_crl.der": self.crl("root", revoked_by_root, overrides.get("root_crl", GOOD)),
        }  # fmt: skip


def _sign_quote(
    platform: Platform, header: bytes, body: bytes, *, v3: bool, qe_auth: bytes = bytes(range(32))
) -> bytes:
    key = platform.attestation_key
    attestation_key = raw_public(key)
    digest = hashlib.sha256(attestation_key + qe_auth).digest()
    qe_report = enclave_report(
        report_data=digest + bytes(32), attributes=platform.qe_attributes,
        mr_signer=platform.qe_mrsigner, isv_prod_id=platform.qe_prod_id, isv_svn=platform.qe_svn,
    )  # fmt: skip
    qe_part = (
        qe_report + raw_sign(platform.pck_key, qe_report)
        + struct.pack("<H", len(qe_auth)) + qe_auth
        + struct.pack("<HI", 5, len(platform.chain_pem)) + platform.chain_pem
    )  # fmt: skip
    certification = qe_part if v3 else struct.pack("<HI", 6, len(qe_part)) + qe_part
    signed = header + body
    sig_data = raw_sign(key, signed) + attestation_key + certification
    return signed + struct.pack("<I", len(sig_data)) + sig_data


def _header(version: int, tee: int, platform: Platform) -> bytes:
    return struct.pack("<HHIHH", version, 2, tee, platform.qe_svn, platform.pce_svn) + (
        INTEL_QE_VENDOR_ID + bytes(20)
    )


def td_quote(platform: Platform, fields: TdFields | None = None, *, version: int = 4) -> bytes:
    """A TDX quote (v4, or v5 with a TD 1.0 or, when ``tee_tcb_svn2`` is set, TD 1.5 body)."""
    fields = fields or TdFields()
    body = fields.encode()
    if version == 5:
        body_type = 3 if fields.tee_tcb_svn2 is not None else 2
        body = struct.pack("<HI", body_type, len(body)) + body
    return _sign_quote(platform, _header(version, TEE_TDX, platform), body, v3=False)


def sgx_quote(platform: Platform, report: bytes | None = None, *, version: int = 3) -> bytes:
    """An SGX quote (v3, or v4 with QE report certification data)."""
    body = report if report is not None else enclave_report()
    return _sign_quote(platform, _header(version, TEE_SGX, platform), body, v3=version == 3)


class _Envelope(msgspec.Struct):
    signature: str
    tcb_info: msgspec.Raw = msgspec.field(name="tcbInfo", default=msgspec.Raw())
    enclave_identity: msgspec.Raw = msgspec.field(name="enclaveIdentity", default=msgspec.Raw())


def quote_collateral_v3(files: dict[str, bytes]) -> dict[str, str | bytes]:
    """PCS-layout collateral as the keyword arguments of dcap-qvl's ``QuoteCollateralV3``.

    The inner objects are passed as the exact bytes PCS signed, so an independent verifier
    checks the same statements this project does.
    """
    tcb = msgspec.json.decode(files["tcb_info.json"], type=_Envelope)
    qe = msgspec.json.decode(files["qe_identity.json"], type=_Envelope)
    return {
        "pck_crl_issuer_chain": files["pck_crl_issuer_chain.pem"].decode(),
        "root_ca_crl": files["root_ca_crl.der"],
        "pck_crl": files["pck_crl.der"],
        "tcb_info_issuer_chain": files["tcb_info_issuer_chain.pem"].decode(),
        "tcb_info": bytes(tcb.tcb_info).decode(),
        "tcb_info_signature": bytes.fromhex(tcb.signature),
        "qe_identity_issuer_chain": files["qe_identity_issuer_chain.pem"].decode(),
        "qe_identity": bytes(qe.enclave_identity).decode(),
        "qe_identity_signature": bytes.fromhex(qe.signature),
    }
