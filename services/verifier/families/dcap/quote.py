"""Intel DCAP quotes: bytes -> typed structs, per the SGX/TDX DCAP quote format specifications.

Accepted shapes (all little-endian, ECDSA-256-with-P-256 attestation keys only):

=========  ========  ===========================================  ===========================
version    TEE type  body                                         signature data
=========  ========  ===========================================  ===========================
3          0 (SGX)   SGX enclave report (384 bytes)               v3 auth data, cert type 5
4          0 (SGX)   SGX enclave report (384 bytes)               v4 auth data, cert type 6
4          0x81      TD report 1.0 (584 bytes)                    v4 auth data, cert type 6
5          0x81/0    body descriptor (type u16, size u32), then   v4 auth data, cert type 6
                     type 1 SGX, 2 TD 1.0 or 3 TD 1.5 (648 bytes)
=========  ========  ===========================================  ===========================

Certification data type 6 (QE report certification data) nests type 5 (the PCK certificate
chain as PEM). Every length field is checked against what is left, each nested structure must be
consumed exactly, and the quote ends where its signature data ends: bytes after that are
returned as :attr:`Quote.trailing` for the caller to judge (quote providers pad with zeros;
anything else is outside the signature and must not be trusted). Reserved fields inside the
signed bodies are not checked: Intel's own verifier ignores them and the hardware signs them.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from services.mesh.errors import ParseError

MAX_EVIDENCE_SIZE = 1 << 20
HEADER_SIZE = 48
SGX_REPORT_SIZE = 384
TD10_REPORT_SIZE = 584
TD15_REPORT_SIZE = 648
BODY_DESCRIPTOR_SIZE = 6
SIGNATURE_SIZE = 64
ATTESTATION_KEY_SIZE = 64

ATT_KEY_ECDSA_P256 = 2
TEE_SGX = 0x00000000
TEE_TDX = 0x00000081
CERT_PCK_CHAIN = 5
CERT_QE_REPORT = 6
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_HEADER = struct.Struct("<HHIHH16s20s")


class BodyType(enum.IntEnum):
    """Quote v5 body types (v3/v4 bodies are implied by the TEE type)."""

    SGX = 1
    TD10 = 2
    TD15 = 3


_BODY_TYPE_VALUES = frozenset(t.value for t in BodyType)
_BODY_SIZES = {
    BodyType.SGX: SGX_REPORT_SIZE,
    BodyType.TD10: TD10_REPORT_SIZE,
    BodyType.TD15: TD15_REPORT_SIZE,
}


@dataclass(frozen=True)
class QuoteHeader:
    """The 48-byte quote header."""

    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class EnclaveReport:
    """An SGX REPORT body: the application enclave's (SGX quotes) or the QE's own."""

    cpu_svn: bytes
    misc_select: int
    isv_ext_prod_id: bytes
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    config_id: bytes
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    isv_family_id: bytes
    report_data: bytes

    @property
    def debug(self) -> bool:
        """ATTRIBUTES.DEBUG (bit 1 of the flags): the enclave's memory can be inspected."""
        return bool(self.attributes[0] & 0x02)


@dataclass(frozen=True)
class TdReport:
    """A TD report body (TDX 1.0; ``tee_tcb_svn2``/``mr_servicetd`` only in TDX 1.5)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_servicetd: bytes | None = None

    @property
    def debug(self) -> bool:
        """TD_ATTRIBUTES.DEBUG (bit 0): the host VMM can read and write the TD's state."""
        return bool(self.td_attributes[0] & 0x01)


@dataclass(frozen=True)
class QeCertification:
    """What the quoting enclave certifies: its report, the PCK's signature over it, the chain."""

    qe_report: EnclaveReport
    qe_report_raw: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes


@dataclass(frozen=True)
class Quote:
    """A parsed quote. ``signed`` is exactly the byte range the attestation key signs."""

    header: QuoteHeader
    body_type: BodyType
    body: EnclaveReport | TdReport
    signed: bytes
    signature: bytes
    attestation_key: bytes
    certification: QeCertification
    length: int
    trailing: bytes

    @property
    def is_tdx(self) -> bool:
        return self.header.tee_type == TEE_TDX

    @property
    def trailing_is_padding(self) -> bool:
        """True when nothing but zero bytes follow the quote."""
        return not self.trailing.strip(b"\0")


class _Reader:
    """A bounds-checked cursor: every read names the field it is reading for error messages."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, size: int, field: str) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise ParseError(
                "dcap.truncated",
                f"{self.what}: {field} needs {size} bytes at offset {self.pos}, "
                f"{len(self.data) - self.pos} left",
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u16(self, field: str) -> int:
        value: int = _U16.unpack(self.take(2, field))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = _U32.unpack(self.take(4, field))[0]
        return value

    def sized(self, field: str, *, wide: bool) -> bytes:
        size = self.u32(f"{field} size") if wide else self.u16(f"{field} size")
        return self.take(size, field)

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise ParseError(
                "dcap.trailing_bytes",
                f"{self.what}: {len(self.data) - self.pos} unexpected bytes after the last field",
            )


def parse_header(data: bytes) -> QuoteHeader:
    """Decode the 48-byte header; versions, key type and TEE type are checked by the caller."""
    if len(data) < HEADER_SIZE:
        raise ParseError("dcap.truncated", f"quote header needs {HEADER_SIZE} bytes")
    version, key_type, tee_type, qe_svn, pce_svn, vendor, user = _HEADER.unpack_from(data)
    return QuoteHeader(version, key_type, tee_type, qe_svn, pce_svn, vendor, user)


def parse_enclave_report(raw: bytes) -> EnclaveReport:
    """Decode a 384-byte SGX REPORT body."""
    if len(raw) != SGX_REPORT_SIZE:
        raise ParseError("dcap.bad_size", f"enclave report is {len(raw)} bytes, not 384")
    (misc_select,) = _U32.unpack_from(raw, 16)
    isv_prod_id, isv_svn, config_svn = struct.unpack_from("<HHH", raw, 256)
    return EnclaveReport(
        cpu_svn=raw[0:16],
        misc_select=misc_select,
        isv_ext_prod_id=raw[32:48],
        attributes=raw[48:64],
        mr_enclave=raw[64:96],
        mr_signer=raw[128:160],
        config_id=raw[192:256],
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        config_svn=config_svn,
        isv_family_id=raw[304:320],
        report_data=raw[320:384],
    )


def parse_td_report(raw: bytes) -> TdReport:
    """Decode a TD report body of 584 (TDX 1.0) or 648 (TDX 1.5) bytes."""
    if len(raw) not in (TD10_REPORT_SIZE, TD15_REPORT_SIZE):
        raise ParseError("dcap.bad_size", f"TD report is {len(raw)} bytes, not 584 or 648")
    extended = len(raw) == TD15_REPORT_SIZE
    return TdReport(
        tee_tcb_svn=raw[0:16],
        mr_seam=raw[16:64],
        mr_signer_seam=raw[64:112],
        seam_attributes=raw[112:120],
        td_attributes=raw[120:128],
        xfam=raw[128:136],
        mr_td=raw[136:184],
        mr_config_id=raw[184:232],
        mr_owner=raw[232:280],
        mr_owner_config=raw[280:328],
        rtmrs=(raw[328:376], raw[376:424], raw[424:472], raw[472:520]),
        report_data=raw[520:584],
        tee_tcb_svn2=raw[584:600] if extended else None,
        mr_servicetd=raw[600:648] if extended else None,
    )


def _body_layout(header: QuoteHeader, data: bytes) -> tuple[BodyType, int]:
    """Which body follows the header and where it starts."""
    version, tee = header.version, header.tee_type
    if version not in (3, 4, 5):
        raise ParseError("dcap.unsupported_version", f"quote version {version}")
    if header.att_key_type != ATT_KEY_ECDSA_P256:
        raise ParseError("dcap.unsupported_key_type", f"attestation key type {header.att_key_type}")
    if tee not in (TEE_SGX, TEE_TDX) or (version == 3 and tee != TEE_SGX):
        raise ParseError("dcap.unsupported_tee", f"TEE type {tee:#x} in a version {version} quote")
    if version in (3, 4):
        return (BodyType.TD10 if tee == TEE_TDX else BodyType.SGX), HEADER_SIZE
    reader = _Reader(data, "quote")
    reader.pos = HEADER_SIZE
    raw_type = reader.u16("body type")
    size = reader.u32("body size")
    if raw_type not in _BODY_TYPE_VALUES:
        raise ParseError("dcap.unsupported_body", f"quote v5 body type {raw_type}")
    body_type = BodyType(raw_type)
    if (body_type == BodyType.SGX) != (tee == TEE_SGX):
        raise ParseError("dcap.unsupported_body", f"body type {raw_type} with TEE type {tee:#x}")
    if size != _BODY_SIZES[body_type]:
        raise ParseError("dcap.bad_size", f"body type {raw_type} declares {size} bytes")
    return body_type, HEADER_SIZE + BODY_DESCRIPTOR_SIZE


def _parse_qe_part(reader: _Reader) -> tuple[bytes, bytes, bytes, bytes]:
    """QE report, its signature, the QE authentication data and the nested PCK chain."""
    qe_report = reader.take(SGX_REPORT_SIZE, "QE report")
    qe_signature = reader.take(SIGNATURE_SIZE, "QE report signature")
    auth_data = reader.sized("QE authentication data", wide=False)
    cert_type = reader.u16("certification data type")
    if cert_type != CERT_PCK_CHAIN:
        raise ParseError(
            "dcap.unsupported_cert_data",
            f"certification data type {cert_type}; only the PCK chain (5) carries a chain",
        )
    chain = reader.sized("PCK certificate chain", wide=True)
    return qe_report, qe_signature, auth_data, chain


def parse_quote(data: bytes) -> Quote:
    """Parse one quote from ``data``; see the module docstring for what is accepted."""
    if len(data) > MAX_EVIDENCE_SIZE:
        raise ParseError("dcap.too_large", f"{len(data)} bytes exceeds {MAX_EVIDENCE_SIZE}")
    data = bytes(data)
    header = parse_header(data)
    body_type, body_start = _body_layout(header, data)
    body_end = body_start + _BODY_SIZES[body_type]
    reader = _Reader(data, "quote")
    reader.pos = body_start
    raw_body = reader.take(body_end - body_start, "report body")
    body: EnclaveReport | TdReport = (
        parse_enclave_report(raw_body) if body_type == BodyType.SGX else parse_td_report(raw_body)
    )
    sig_data = reader.sized("signature data", wide=True)
    quote_end = reader.pos

    auth = _Reader(sig_data, "signature data")
    signature = auth.take(SIGNATURE_SIZE, "quote signature")
    attestation_key = auth.take(ATTESTATION_KEY_SIZE, "attestation key")
    if header.version == 3:
        qe_report, qe_sig, qe_auth, chain = _parse_qe_part(auth)
    else:
        outer_type = auth.u16("certification data type")
        if outer_type != CERT_QE_REPORT:
            raise ParseError(
                "dcap.unsupported_cert_data",
                f"certification data type {outer_type}; quote v4/v5 need type 6",
            )
        inner = _Reader(auth.sized("QE report certification data", wide=True), "type 6 data")
        qe_report, qe_sig, qe_auth, chain = _parse_qe_part(inner)
        inner.finish()
    auth.finish()

    return Quote(
        header=header,
        body_type=body_type,
        body=body,
        signed=data[:body_end],
        signature=signature,
        attestation_key=attestation_key,
        certification=QeCertification(
            qe_report=parse_enclave_report(qe_report),
            qe_report_raw=qe_report,
            qe_report_signature=qe_sig,
            qe_auth_data=qe_auth,
            pck_chain_pem=chain,
        ),
        length=quote_end,
        trailing=data[quote_end:],
    )
