"""Confidential Containers' SNP evidence: the JSON document their attestation agent sends.

    {"attestation_report": {...the report, field by field...},
     "cert_chain": [{"cert_type": "VCEK", "data": [48, 130, ...]}, ...]}     (or null/absent)

``attestation_report`` is the serde form of the ``sev`` crate's ``AttestationReport`` (the
shape current Trustee reads): integers as JSON numbers, byte fields as arrays of exactly their
length of integers 0..255, ``policy``/``plat_info``/``key_info`` as the raw integers of the
ABI's bit fields, each TCB_VERSION as ``{"fmc", "bootloader", "tee", "snp", "microcode"}``
(``fmc`` null before Turin), firmware versions as ``{"major", "minor", "build"}``, the
version-dependent fields (CPUID from version 3, the mitigation vectors from version 5) null
where the report has none, and the signature as ``{"r": [72], "s": [72]}`` little-endian.

The signature covers the binary report, not the JSON, so the document is turned back into the
1184 ABI bytes with the report encoder of :mod:`.parse` (the one layout), those bytes are
parsed again, and the result is rendered back to JSON: unless that equals the document
exactly, the document holds something the binary report cannot (a Turin FMC SPL in a Milan
report, CPUID in a version 2 report, a missing mitigation vector in a version 5 report...)
and is refused as ``snp.evidence_malformed``. What gets verified is therefore exactly the
bytes the firmware signed, and any change to a JSON value changes those bytes.

``cert_chain`` entries become the same certificate table an extended report carries: only the
VCEK or VLEK is taken from it; an ASK or ARK in it is never a trust anchor (those come from
the pinned roots).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import msgspec

from services.mesh.errors import ParseError
from services.verifier.families import jsondoc
from services.verifier.families.snp.certtable import (
    ARK_GUID,
    ASK_GUID,
    CRL_GUID,
    VCEK_GUID,
    VLEK_GUID,
    CertTable,
)
from services.verifier.families.snp.fields import TcbVersion
from services.verifier.families.snp.parse import (
    ECDSA_COMPONENT_SIZE,
    SIGNATURE_SIZE,
    AttestationReport,
    SigningKey,
    SnpEvidence,
    encode_report,
    parse_report,
)

__all__ = ["MALFORMED", "MAX_DOCUMENT", "parse_coco_evidence", "to_coco_document"]

MALFORMED = "snp.evidence_malformed"
MAX_DOCUMENT = 512 * 1024
MAX_DEPTH = 4
MAX_CERTS = 8
MAX_CERT_BYTES = 16 * 1024
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1

_U8 = Annotated[int, msgspec.Meta(ge=0, le=0xFF)]
_U32 = Annotated[int, msgspec.Meta(ge=0, le=U32_MAX)]
_U64 = Annotated[int, msgspec.Meta(ge=0)]


_B16 = Annotated[list[_U8], msgspec.Meta(min_length=16, max_length=16)]
_B32 = Annotated[list[_U8], msgspec.Meta(min_length=32, max_length=32)]
_B48 = Annotated[list[_U8], msgspec.Meta(min_length=48, max_length=48)]
_B64 = Annotated[list[_U8], msgspec.Meta(min_length=64, max_length=64)]
_B72 = Annotated[
    list[_U8],
    msgspec.Meta(min_length=ECDSA_COMPONENT_SIZE, max_length=ECDSA_COMPONENT_SIZE),
]


class _Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class _Tcb(_Strict, frozen=True, kw_only=True):
    fmc: _U8 | None = None
    bootloader: _U8
    tee: _U8
    snp: _U8
    microcode: _U8


class _Version(_Strict, frozen=True, kw_only=True):
    major: _U8
    minor: _U8
    build: _U8


class _Signature(_Strict, frozen=True, kw_only=True):
    r: _B72
    s: _B72


class _Report(_Strict, frozen=True, kw_only=True):
    version: _U32
    guest_svn: _U32
    policy: _U64
    family_id: _B16
    image_id: _B16
    vmpl: _U32
    sig_algo: _U32
    current_tcb: _Tcb
    plat_info: _U64
    key_info: _U32
    report_data: _B64
    measurement: _B48
    host_data: _B32
    id_key_digest: _B48
    author_key_digest: _B48
    report_id: _B32
    report_id_ma: _B32
    reported_tcb: _Tcb
    cpuid_fam_id: _U8 | None
    cpuid_mod_id: _U8 | None
    cpuid_step: _U8 | None
    chip_id: _B64
    committed_tcb: _Tcb
    current: _Version
    committed: _Version
    launch_tcb: _Tcb
    launch_mit_vector: _U64 | None = None
    current_mit_vector: _U64 | None = None
    signature: _Signature


_CERT_TYPES = {"VCEK": VCEK_GUID, "VLEK": VLEK_GUID, "ASK": ASK_GUID, "ARK": ARK_GUID}
_CERT_TYPES["CRL"] = CRL_GUID
_CERT_NAMES = {guid: name for name, guid in _CERT_TYPES.items()}
_CertType = Literal["VCEK", "VLEK", "ASK", "ARK", "CRL", "vcek", "vlek", "ask", "ark", "crl"]


class _Cert(_Strict, frozen=True, kw_only=True):
    cert_type: _CertType
    data: Annotated[list[_U8], msgspec.Meta(min_length=1, max_length=MAX_CERT_BYTES)]


class _Document(_Strict, frozen=True, kw_only=True):
    attestation_report: _Report
    cert_chain: Annotated[list[_Cert], msgspec.Meta(max_length=MAX_CERTS)] | None = None


def parse_coco_evidence(data: bytes) -> SnpEvidence:
    """Parse a CoCo SNP JSON document into the report (as the exact ABI bytes) and its table.

    Raises :class:`ParseError` ``snp.evidence_malformed`` for anything that is not exactly
    that shape or cannot be re-encoded byte for byte.
    """
    document = jsondoc.load_document(
        data, reason=MALFORMED, max_bytes=MAX_DOCUMENT, max_depth=MAX_DEPTH
    )
    try:
        decoded = msgspec.convert(document, _Document, strict=True)
    except msgspec.ValidationError as exc:
        raise ParseError(MALFORMED, f"CoCo SNP evidence: {exc}") from None
    report = _reencode(decoded.attestation_report)
    return SnpEvidence(report, _cert_table(decoded.cert_chain))


def to_coco_document(evidence: SnpEvidence) -> dict[str, Any]:
    """The CoCo JSON form of parsed evidence (what an agent on that guest would have sent);
    certificate-table entries of GUIDs other than the VCEK/VLEK/ASK/ARK/CRL ones are left out."""
    chain = None
    if evidence.cert_table is not None:
        chain = [
            {"cert_type": _CERT_NAMES[guid], "data": list(blob)}
            for guid, blob in evidence.cert_table.entries
            if guid in _CERT_NAMES
        ]
    return {"attestation_report": _render(evidence.report), "cert_chain": chain}


def _reencode(fields: _Report) -> AttestationReport:
    """The report the JSON stands for, re-encoded and re-parsed, if it round-trips exactly."""
    if fields.key_info >> 5:
        raise ParseError(MALFORMED, f"key_info {fields.key_info:#x} sets reserved bits 31:5")
    try:
        signing_key = SigningKey(fields.key_info >> 2 & 0x7)
    except ValueError:
        raise ParseError(MALFORMED, "key_info names a reserved SIGNING_KEY") from None
    for name in ("policy", "plat_info", "launch_mit_vector", "current_mit_vector"):
        value = getattr(fields, name)
        if value is not None and value > U64_MAX:
            raise ParseError(MALFORMED, f"{name} does not fit 64 bits")
    signature = bytes(fields.signature.r) + bytes(fields.signature.s)
    candidate = AttestationReport(
        version=fields.version,
        guest_svn=fields.guest_svn,
        policy=fields.policy,
        family_id=bytes(fields.family_id),
        image_id=bytes(fields.image_id),
        vmpl=fields.vmpl,
        signature_algo=fields.sig_algo,
        current_tcb=_tcb(fields.current_tcb),
        platform_info=fields.plat_info,
        author_key_en=bool(fields.key_info & 1),
        mask_chip_key=bool(fields.key_info & 2),
        signing_key=signing_key,
        report_data=bytes(fields.report_data),
        measurement=bytes(fields.measurement),
        host_data=bytes(fields.host_data),
        id_key_digest=bytes(fields.id_key_digest),
        author_key_digest=bytes(fields.author_key_digest),
        report_id=bytes(fields.report_id),
        report_id_ma=bytes(fields.report_id_ma),
        reported_tcb=_tcb(fields.reported_tcb),
        cpuid_fam_id=fields.cpuid_fam_id,
        cpuid_mod_id=fields.cpuid_mod_id,
        cpuid_step=fields.cpuid_step,
        chip_id=bytes(fields.chip_id),
        committed_tcb=_tcb(fields.committed_tcb),
        current_build=fields.current.build,
        current_minor=fields.current.minor,
        current_major=fields.current.major,
        committed_build=fields.committed.build,
        committed_minor=fields.committed.minor,
        committed_major=fields.committed.major,
        launch_tcb=_tcb(fields.launch_tcb),
        launch_mit_vector=fields.launch_mit_vector,
        current_mit_vector=fields.current_mit_vector,
        signature=signature.ljust(SIGNATURE_SIZE, b"\0"),
    )
    try:
        report = parse_report(encode_report(candidate))
    except ParseError as exc:
        detail = f"not an encodable report ({exc.reason}): {exc.detail}"
        raise ParseError(MALFORMED, detail) from None
    rendered, given = _render(report), msgspec.to_builtins(fields)
    if rendered != given:
        names = ", ".join(_differences(rendered, given))
        detail = f"fields a VERSION {report.version} report cannot carry as given: {names}"
        raise ParseError(MALFORMED, detail)
    return report


def _differences(rendered: dict[str, Any], given: dict[str, Any]) -> list[str]:
    return sorted(name for name in given if rendered.get(name) != given[name])


def _tcb(value: _Tcb) -> TcbVersion:
    return TcbVersion(value.bootloader, value.tee, value.snp, value.microcode, fmc=value.fmc)


def _render_tcb(value: TcbVersion) -> dict[str, Any]:
    return {
        "fmc": value.fmc,
        "bootloader": value.bootloader,
        "tee": value.tee,
        "snp": value.snp,
        "microcode": value.microcode,
    }


def _render(report: AttestationReport) -> dict[str, Any]:
    """The ``sev`` crate's serde form of ``report``, field for field and in its order."""
    key_info = (
        int(report.author_key_en) | int(report.mask_chip_key) << 1 | int(report.signing_key) << 2
    )
    size = ECDSA_COMPONENT_SIZE
    return {
        "version": report.version,
        "guest_svn": report.guest_svn,
        "policy": report.policy,
        "family_id": list(report.family_id),
        "image_id": list(report.image_id),
        "vmpl": report.vmpl,
        "sig_algo": report.signature_algo,
        "current_tcb": _render_tcb(report.current_tcb),
        "plat_info": report.platform_info,
        "key_info": key_info,
        "report_data": list(report.report_data),
        "measurement": list(report.measurement),
        "host_data": list(report.host_data),
        "id_key_digest": list(report.id_key_digest),
        "author_key_digest": list(report.author_key_digest),
        "report_id": list(report.report_id),
        "report_id_ma": list(report.report_id_ma),
        "reported_tcb": _render_tcb(report.reported_tcb),
        "cpuid_fam_id": report.cpuid_fam_id,
        "cpuid_mod_id": report.cpuid_mod_id,
        "cpuid_step": report.cpuid_step,
        "chip_id": list(report.chip_id),
        "committed_tcb": _render_tcb(report.committed_tcb),
        "current": {
            "major": report.current_major,
            "minor": report.current_minor,
            "build": report.current_build,
        },
        "committed": {
            "major": report.committed_major,
            "minor": report.committed_minor,
            "build": report.committed_build,
        },
        "launch_tcb": _render_tcb(report.launch_tcb),
        "launch_mit_vector": report.launch_mit_vector,
        "current_mit_vector": report.current_mit_vector,
        "signature": {
            "r": list(report.signature[:size]),
            "s": list(report.signature[size : 2 * size]),
        },
    }


def _cert_table(chain: list[_Cert] | None) -> CertTable | None:
    """The certificate table the chain stands for; one entry per kind, as in a host's table."""
    if not chain:
        return None
    entries: list[tuple[uuid.UUID, bytes]] = []
    seen: set[uuid.UUID] = set()
    for cert in chain:
        guid = _CERT_TYPES[cert.cert_type.upper()]
        if guid in seen:
            raise ParseError(MALFORMED, f"cert_chain has two {cert.cert_type.upper()} entries")
        seen.add(guid)
        entries.append((guid, bytes(cert.data)))
    return CertTable(tuple(entries))
