"""AWS Nitro Enclaves attestation document: bytes -> typed struct, exactly as AWS specifies it.

The Nitro Secure Module returns a COSE_Sign1 (untagged in practice; tag 18 is accepted too)
whose protected header is ``{1: -35}`` (ES384) and whose payload is this CBOR map, per AWS's
"Nitro Enclaves attestation process" (aws-nitro-enclaves-nsm-api, docs/attestation_process.md)::

    module_id    text, non-empty                 issuing Nitro hypervisor module
    digest       "SHA384"                        digest of the PCRs
    timestamp    uint (ms since the UNIX epoch)  when the document was made
    pcrs         {1..32 of index 0..31 => bytes of 32, 48 or 64}
    certificate  bytes 1..1024, DER              signs this document
    cabundle     [1.. bytes 1..1024, DER]        root first, then intermediates
    public_key   ? bytes 1..1024                 optional key for the relying party
    user_data    ? bytes 0..1024                 optional signed data
    nonce        ? bytes 0..1024                 optional relying-party nonce

Two deliberate departures from AWS's prose, both to accept what the hardware really emits:
optional fields may be CBOR ``null`` (real documents carry ``null`` for an absent ``nonce`` or
``public_key``, although the prose says no field may be null), and ``user_data``/``nonce`` may
hold up to 1024 bytes as in AWS's CDDL (the prose says 512; documents with 1024 exist). A
mandatory field that is null, any unknown field, and every other size or type violation is a
:class:`ParseError` with code ``nitro.schema_invalid``; a broken envelope is
``nitro.cose_malformed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from services.mesh.errors import ParseError
from services.verifier.families import cose

__all__ = [
    "MAX_DOCUMENT_SIZE",
    "NitroDocument",
    "SignedDocument",
    "parse_document",
    "parse_payload",
]

MAX_PAYLOAD_SIZE = 16384
"""AWS bounds the payload byte string to 1..16384 bytes."""
MAX_DOCUMENT_SIZE = MAX_PAYLOAD_SIZE + 512
"""Payload plus the COSE envelope (header, 96-byte signature, CBOR framing)."""
MAX_FIELD = 1024
MAX_CABUNDLE = 8
"""AWS chains have four CA certificates (root, regional, zonal, instance); allow some slack."""
MAX_PCRS = 32
MAX_MODULE_ID = 256
PCR_SIZES = (32, 48, 64)
DIGEST = "SHA384"
SCHEMA = "nitro.schema_invalid"

_MANDATORY = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")
_OPTIONAL = ("public_key", "user_data", "nonce")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_TIMESTAMP_MS = (datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC) - _EPOCH) // timedelta(
    milliseconds=1
)
"""AWS allows any uint64; beyond year 9999 no datetime can represent it, so it is refused."""


@dataclass(frozen=True)
class NitroDocument:
    """The attestation document's fields, named as AWS names them (``None`` when absent)."""

    module_id: str
    digest: str
    timestamp_ms: int
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None = None
    user_data: bytes | None = None
    nonce: bytes | None = None

    @property
    def timestamp(self) -> datetime:
        """``timestamp`` as an aware UTC datetime (millisecond precision kept)."""
        return _EPOCH + timedelta(milliseconds=self.timestamp_ms)

    def pcr(self, index: int) -> bytes | None:
        return self.pcrs.get(index)


@dataclass(frozen=True)
class SignedDocument:
    """What the verifier receives: the COSE envelope and the document it signs."""

    cose: cose.CoseSign1
    document: NitroDocument


def parse_document(data: bytes) -> SignedDocument:
    """Parse a signed attestation document as ``/dev/nsm`` returns it; :class:`ParseError`."""
    envelope = cose.parse_sign1(
        data, family="nitro", max_size=MAX_DOCUMENT_SIZE, what="attestation document"
    )
    if len(envelope.payload) > MAX_PAYLOAD_SIZE:
        raise ParseError(SCHEMA, f"payload is {len(envelope.payload)} bytes (AWS allows 16384)")
    return SignedDocument(envelope, parse_payload(envelope.payload))


def parse_payload(payload: bytes) -> NitroDocument:
    """Parse and schema-check the CBOR payload map (see the module docstring)."""
    value = cose.decode_cbor(
        payload, what="document payload", code="nitro.cose_malformed", max_size=MAX_PAYLOAD_SIZE
    )
    if not isinstance(value, Mapping):
        raise ParseError(SCHEMA, "payload is not a CBOR map")
    unknown = sorted(str(k) for k in value if k not in _MANDATORY + _OPTIONAL)
    if unknown:
        raise ParseError(SCHEMA, f"fields AWS does not define: {', '.join(unknown)}")
    missing = [name for name in _MANDATORY if value.get(name) is None]
    if missing:
        raise ParseError(SCHEMA, f"mandatory fields missing or null: {', '.join(missing)}")
    return NitroDocument(
        module_id=_module_id(value["module_id"]),
        digest=_digest(value["digest"]),
        timestamp_ms=_timestamp(value["timestamp"]),
        pcrs=_pcrs(value["pcrs"]),
        certificate=_bytes(value["certificate"], "certificate", 1, MAX_FIELD),
        cabundle=_cabundle(value["cabundle"]),
        public_key=_optional(value, "public_key", 1),
        user_data=_optional(value, "user_data", 0),
        nonce=_optional(value, "nonce", 0),
    )


def _module_id(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ParseError(SCHEMA, "module_id must be a non-empty text string")
    if len(value) > MAX_MODULE_ID:
        raise ParseError(SCHEMA, f"module_id is longer than {MAX_MODULE_ID} characters")
    return value


def _digest(value: Any) -> str:
    if value != DIGEST or not isinstance(value, str):
        raise ParseError(SCHEMA, f"digest must be {DIGEST!r}, not {value!r:.40}")
    return value


def _timestamp(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_TIMESTAMP_MS:
        raise ParseError(SCHEMA, "timestamp must be a positive integer (ms) before year 10000")
    return value


def _pcrs(value: Any) -> dict[int, bytes]:
    if not isinstance(value, Mapping) or not 1 <= len(value) <= MAX_PCRS:
        raise ParseError(SCHEMA, f"pcrs must be a map of 1 to {MAX_PCRS} entries")
    out: dict[int, bytes] = {}
    for index, pcr in value.items():
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < MAX_PCRS:
            raise ParseError(SCHEMA, f"PCR index {index!r:.20} is not an integer in 0..31")
        if not isinstance(pcr, bytes) or len(pcr) not in PCR_SIZES:
            raise ParseError(SCHEMA, f"PCR{index} must be a byte string of 32, 48 or 64 bytes")
        out[index] = pcr
    return dict(sorted(out.items()))


def _cabundle(value: Any) -> tuple[bytes, ...]:
    if not cose.is_array(value) or not 1 <= len(value) <= MAX_CABUNDLE:
        raise ParseError(SCHEMA, f"cabundle must be an array of 1 to {MAX_CABUNDLE} certificates")
    return tuple(_bytes(cert, f"cabundle[{i}]", 1, MAX_FIELD) for i, cert in enumerate(value))


def _bytes(value: Any, name: str, low: int, high: int) -> bytes:
    if not isinstance(value, bytes) or not low <= len(value) <= high:
        raise ParseError(SCHEMA, f"{name} must be a byte string of {low} to {high} bytes")
    return value


def _optional(value: Mapping[str, Any], name: str, low: int) -> bytes | None:
    item = value.get(name)
    return None if item is None else _bytes(item, name, low, MAX_FIELD)
