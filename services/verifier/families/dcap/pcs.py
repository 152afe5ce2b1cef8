"""Intel PCS collateral documents: TCB info (v2, v3; SGX and TDX) and QE identity (v2).

PCS returns ``{"tcbInfo": {...}, "signature": "<hex r||s>"}`` (``enclaveIdentity`` or the older
``qeIdentity`` for QE identities), and the signature covers the exact bytes of the inner object
as served. So the inner object is captured raw (``msgspec.Raw``), that very slice is what the
signature is checked over, and the typed document is decoded from the same slice: nothing is
ever re-serialised, and what is appraised is exactly what was signed.

Unknown JSON fields are ignored (Intel adds fields between API versions); missing or mistyped
required ones, bad hex, bad dates and unknown TCB statuses are :class:`ParseError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

import msgspec

from services.mesh.boundedjson import check_depth
from services.mesh.errors import ParseError

T = TypeVar("T")


class TcbStatus(enum.StrEnum):
    """Intel's TCB status values, as spelled in TCB info and QE identity."""

    UP_TO_DATE = "UpToDate"
    SW_HARDENING_NEEDED = "SWHardeningNeeded"
    CONFIGURATION_NEEDED = "ConfigurationNeeded"
    CONFIGURATION_AND_SW_HARDENING_NEEDED = "ConfigurationAndSWHardeningNeeded"
    OUT_OF_DATE = "OutOfDate"
    OUT_OF_DATE_CONFIGURATION_NEEDED = "OutOfDateConfigurationNeeded"
    REVOKED = "Revoked"


class _Component(msgspec.Struct):
    svn: int


class _IsvSvn(msgspec.Struct):
    isvsvn: int


class _Level(msgspec.Struct, rename="camel"):
    tcb: dict[str, int | list[_Component]]
    tcb_date: str
    tcb_status: str
    advisory_ids: list[str] = msgspec.field(name="advisoryIDs", default_factory=list)


class _IsvLevel(msgspec.Struct, rename="camel"):
    tcb: _IsvSvn
    tcb_date: str
    tcb_status: str
    advisory_ids: list[str] = msgspec.field(name="advisoryIDs", default_factory=list)


class _Module(msgspec.Struct, rename="camel"):
    mrsigner: str
    attributes: str
    attributes_mask: str
    id: str = ""
    tcb_levels: list[_IsvLevel] = msgspec.field(default_factory=list)


class _TcbInfo(msgspec.Struct, rename="camel"):
    version: int
    issue_date: str
    next_update: str
    fmspc: str
    pce_id: str
    tcb_levels: list[_Level]
    id: str = "SGX"
    tcb_type: int = 0
    tcb_evaluation_data_number: int = 0
    tdx_module: _Module | None = None
    tdx_module_identities: list[_Module] = msgspec.field(default_factory=list)


class _QeIdentity(msgspec.Struct, rename="camel"):
    id: str
    version: int
    issue_date: str
    next_update: str
    miscselect: str
    miscselect_mask: str
    attributes: str
    attributes_mask: str
    mrsigner: str
    isvprodid: int
    tcb_levels: list[_IsvLevel]
    tcb_evaluation_data_number: int = 0


class _TcbEnvelope(msgspec.Struct):
    tcb_info: msgspec.Raw = msgspec.field(name="tcbInfo")
    signature: str


class _QeEnvelope(msgspec.Struct):
    signature: str
    enclave_identity: msgspec.Raw = msgspec.field(name="enclaveIdentity", default=msgspec.Raw())
    qe_identity: msgspec.Raw = msgspec.field(name="qeIdentity", default=msgspec.Raw())


@dataclass(frozen=True)
class TcbLevel:
    """One TCB level: minimum SVNs and the status (and advisories) of platforms meeting them."""

    sgx_svns: tuple[int, ...]
    pce_svn: int
    tdx_svns: tuple[int, ...]
    date: str
    status: TcbStatus
    advisories: tuple[str, ...]


@dataclass(frozen=True)
class IsvLevel:
    """A QE identity or TDX module TCB level, keyed by a single ISVSVN."""

    isv_svn: int
    date: str
    status: TcbStatus
    advisories: tuple[str, ...]


@dataclass(frozen=True)
class TdxModule:
    """``tdxModule`` (``id`` empty, no levels) or one of ``tdxModuleIdentities``."""

    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    levels: tuple[IsvLevel, ...]


@dataclass(frozen=True)
class TcbInfo:
    """A decoded TCB info; ``levels`` sorted highest first, as Intel's matching expects."""

    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    tcb_type: int
    evaluation_data_number: int
    levels: tuple[TcbLevel, ...]
    tdx_module: TdxModule | None
    module_identities: tuple[TdxModule, ...]


@dataclass(frozen=True)
class QeIdentity:
    """A decoded QE (or TD_QE) identity; ``levels`` sorted by ISVSVN, highest first."""

    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    evaluation_data_number: int
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isv_prod_id: int
    levels: tuple[IsvLevel, ...]


@dataclass(frozen=True)
class Signed(Generic[T]):
    """A decoded document with the exact bytes its ``signature`` (raw r || s) covers."""

    document: T
    signed: bytes
    signature: bytes


def _hex(text: str, size: int, field: str, reason: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError as exc:
        raise ParseError(reason, f"{field} is not hex") from exc
    if len(value) != size:
        raise ParseError(reason, f"{field} is {len(value)} bytes, {size} expected")
    return value


def _date(text: str, field: str, reason: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ParseError(reason, f"{field} {text!r} is not an RFC 3339 date") from exc
    if value.tzinfo is None:
        raise ParseError(reason, f"{field} {text!r} has no time zone")
    return value


def _status(text: str, reason: str) -> TcbStatus:
    try:
        return TcbStatus(text)
    except ValueError as exc:
        raise ParseError(reason, f"unknown TCB status {text!r}") from exc


def _svn(value: int, field: str, reason: str, limit: int = 0xFF) -> int:
    if not 0 <= value <= limit:
        raise ParseError(reason, f"{field} {value} out of range")
    return value


def _isv_levels(levels: list[_IsvLevel], reason: str) -> tuple[IsvLevel, ...]:
    out = [
        IsvLevel(
            isv_svn=_svn(level.tcb.isvsvn, "isvsvn", reason, 0xFFFF),
            date=level.tcb_date,
            status=_status(level.tcb_status, reason),
            advisories=tuple(level.advisory_ids),
        )
        for level in levels
    ]
    return tuple(sorted(out, key=lambda level: level.isv_svn, reverse=True))


def _components(value: int | list[_Component] | None, field: str, reason: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) != 16:
        raise ParseError(reason, f"{field} must list 16 components")
    return tuple(_svn(c.svn, field, reason) for c in value)


def _tcb_level(level: _Level, version: int, tdx: bool, reason: str) -> TcbLevel:
    tcb = level.tcb
    pce = tcb.get("pcesvn")
    if not isinstance(pce, int):
        raise ParseError(reason, "TCB level lacks pcesvn")
    if version >= 3:
        sgx = _components(tcb.get("sgxtcbcomponents"), "sgxtcbcomponents", reason)
        tdx_svns = (
            _components(tcb.get("tdxtcbcomponents"), "tdxtcbcomponents", reason) if tdx else ()
        )
    else:
        values = [tcb.get(f"sgxtcbcomp{i:02d}svn") for i in range(1, 17)]
        if not all(isinstance(v, int) for v in values):
            raise ParseError(reason, "TCB level lacks sgxtcbcompNNsvn fields")
        sgx = tuple(_svn(v, "sgxtcbcomp", reason) for v in values if isinstance(v, int))
        tdx_svns = ()
    return TcbLevel(
        sgx_svns=sgx,
        pce_svn=_svn(pce, "pcesvn", reason, 0xFFFF),
        tdx_svns=tdx_svns,
        date=level.tcb_date,
        status=_status(level.tcb_status, reason),
        advisories=tuple(level.advisory_ids),
    )


def _module(module: _Module, reason: str) -> TdxModule:
    return TdxModule(
        id=module.id,
        mrsigner=_hex(module.mrsigner, 48, "tdxModule mrsigner", reason),
        attributes=_hex(module.attributes, 8, "tdxModule attributes", reason),
        attributes_mask=_hex(module.attributes_mask, 8, "tdxModule attributesMask", reason),
        levels=_isv_levels(module.tcb_levels, reason),
    )


def decode_tcb_info(raw: bytes) -> TcbInfo:
    """Decode the inner ``tcbInfo`` object (the signed bytes)."""
    reason = "dcap.tcb_info_malformed"
    check_depth(raw, reason)
    try:
        info = msgspec.json.decode(raw, type=_TcbInfo)
    except msgspec.DecodeError as exc:
        raise ParseError(reason, f"tcbInfo: {exc}") from exc
    if info.version not in (2, 3) or info.id not in ("SGX", "TDX"):
        raise ParseError(reason, f"unsupported TCB info {info.id} version {info.version}")
    tdx = info.id == "TDX"
    if tdx and (info.version < 3 or info.tdx_module is None):
        raise ParseError(reason, "TDX TCB info needs version 3 and a tdxModule")
    levels = [_tcb_level(level, info.version, tdx, reason) for level in info.tcb_levels]
    levels.sort(key=lambda lv: (lv.sgx_svns, lv.pce_svn, lv.tdx_svns), reverse=True)
    return TcbInfo(
        id=info.id,
        version=info.version,
        issue_date=_date(info.issue_date, "issueDate", reason),
        next_update=_date(info.next_update, "nextUpdate", reason),
        fmspc=_hex(info.fmspc, 6, "fmspc", reason),
        pce_id=_hex(info.pce_id, 2, "pceId", reason),
        tcb_type=info.tcb_type,
        evaluation_data_number=info.tcb_evaluation_data_number,
        levels=tuple(levels),
        tdx_module=_module(info.tdx_module, reason) if info.tdx_module else None,
        module_identities=tuple(_module(m, reason) for m in info.tdx_module_identities),
    )


def decode_qe_identity(raw: bytes) -> QeIdentity:
    """Decode the inner ``enclaveIdentity`` object (the signed bytes)."""
    reason = "dcap.qe_identity_malformed"
    check_depth(raw, reason)
    try:
        ident = msgspec.json.decode(raw, type=_QeIdentity)
    except msgspec.DecodeError as exc:
        raise ParseError(reason, f"enclaveIdentity: {exc}") from exc
    if ident.version not in (2, 3) or ident.id not in ("QE", "TD_QE", "QVE"):
        raise ParseError(reason, f"unsupported identity {ident.id} version {ident.version}")
    return QeIdentity(
        id=ident.id,
        version=ident.version,
        issue_date=_date(ident.issue_date, "issueDate", reason),
        next_update=_date(ident.next_update, "nextUpdate", reason),
        evaluation_data_number=ident.tcb_evaluation_data_number,
        miscselect=int.from_bytes(_hex(ident.miscselect, 4, "miscselect", reason), "little"),
        miscselect_mask=int.from_bytes(
            _hex(ident.miscselect_mask, 4, "miscselectMask", reason), "little"
        ),
        attributes=_hex(ident.attributes, 16, "attributes", reason),
        attributes_mask=_hex(ident.attributes_mask, 16, "attributesMask", reason),
        mrsigner=_hex(ident.mrsigner, 32, "mrsigner", reason),
        isv_prod_id=_svn(ident.isvprodid, "isvprodid", reason, 0xFFFF),
        levels=_isv_levels(ident.tcb_levels, reason),
    )


def parse_tcb_info_body(body: bytes) -> Signed[TcbInfo]:
    """Split a PCS TCB info response into the signed slice, its signature and the document."""
    check_depth(body, "dcap.tcb_info_malformed")
    try:
        envelope = msgspec.json.decode(body, type=_TcbEnvelope)
    except msgspec.DecodeError as exc:
        raise ParseError("dcap.tcb_info_malformed", f"TCB info response: {exc}") from exc
    signed = bytes(envelope.tcb_info)
    signature = _hex(envelope.signature, 64, "signature", "dcap.tcb_info_malformed")
    return Signed(decode_tcb_info(signed), signed, signature)


def parse_qe_identity_body(body: bytes) -> Signed[QeIdentity]:
    """Split a PCS QE identity response into the signed slice, its signature and the document."""
    check_depth(body, "dcap.qe_identity_malformed")
    try:
        envelope = msgspec.json.decode(body, type=_QeEnvelope)
    except msgspec.DecodeError as exc:
        raise ParseError("dcap.qe_identity_malformed", f"QE identity response: {exc}") from exc
    present = [bytes(r) for r in (envelope.enclave_identity, envelope.qe_identity) if bytes(r)]
    if len(present) != 1:
        raise ParseError(
            "dcap.qe_identity_malformed", "need exactly one of enclaveIdentity, qeIdentity"
        )
    signature = _hex(envelope.signature, 64, "signature", "dcap.qe_identity_malformed")
    return Signed(decode_qe_identity(present[0]), present[0], signature)
