"""Just enough DER to read Intel's SGX extension of a PCK certificate.

``cryptography`` hands unknown extensions over as raw bytes, and the SGX extension is a nest of
``SEQUENCE { OID, value }`` pairs. This reader is strict (definite lengths only, minimal length
encoding not required but every length bounded by its parent) and bounded: it never reads past
the slice it was given, so malformed input can only produce :class:`ParseError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.mesh.errors import ParseError

TAG_BOOLEAN = 0x01
TAG_INTEGER = 0x02
TAG_OCTET_STRING = 0x04
TAG_OID = 0x06
TAG_ENUMERATED = 0x0A
TAG_SEQUENCE = 0x30

_MAX_LENGTH_OCTETS = 4


@dataclass(frozen=True)
class Tlv:
    """One DER element: its tag and the bytes of its contents."""

    tag: int
    value: bytes


def _fail(detail: str) -> ParseError:
    return ParseError("dcap.pck_extensions_malformed", detail)


def read_all(data: bytes) -> list[Tlv]:
    """Split ``data`` into consecutive TLVs that must cover it exactly."""
    out: list[Tlv] = []
    pos = 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise _fail("truncated DER header")
        tag, first = data[pos], data[pos + 1]
        if tag & 0x1F == 0x1F:
            raise _fail("multi-byte DER tags are not used by the SGX extension")
        pos += 2
        if first < 0x80:
            length = first
        else:
            count = first & 0x7F
            if count == 0 or count > _MAX_LENGTH_OCTETS or pos + count > len(data):
                raise _fail("bad DER length")
            length = int.from_bytes(data[pos : pos + count], "big")
            pos += count
        if pos + length > len(data):
            raise _fail("DER element runs past its parent")
        out.append(Tlv(tag, data[pos : pos + length]))
        pos += length
    return out


def read_one(data: bytes, tag: int) -> Tlv:
    """``data`` must be exactly one TLV with ``tag``."""
    items = read_all(data)
    if len(items) != 1 or items[0].tag != tag:
        raise _fail(f"expected exactly one element with tag {tag:#x}")
    return items[0]


def oid(value: bytes) -> str:
    """Dotted-decimal form of an OBJECT IDENTIFIER's contents."""
    if not value or value[-1] & 0x80:
        raise _fail("bad OID encoding")
    arcs: list[int] = []
    acc = 0
    for byte in value:
        acc = (acc << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(acc)
            acc = 0
    head = arcs[0]
    first, second = (head // 40, head % 40) if head < 80 else (2, head - 80)
    return ".".join(str(a) for a in (first, second, *arcs[1:]))


def unsigned(item: Tlv) -> int:
    """A non-negative INTEGER or ENUMERATED value."""
    if item.tag not in (TAG_INTEGER, TAG_ENUMERATED) or not item.value:
        raise _fail("expected INTEGER or ENUMERATED")
    if item.value[0] & 0x80:
        raise _fail("negative INTEGER where an SVN was expected")
    return int.from_bytes(item.value, "big")


def octets(item: Tlv, size: int | None = None) -> bytes:
    """An OCTET STRING's contents, optionally of an exact ``size``."""
    if item.tag != TAG_OCTET_STRING or (size is not None and len(item.value) != size):
        raise _fail(f"expected OCTET STRING of {size} bytes")
    return item.value


def boolean(item: Tlv) -> bool:
    if item.tag != TAG_BOOLEAN or len(item.value) != 1:
        raise _fail("expected BOOLEAN")
    return item.value != b"\x00"


def oid_pairs(sequence_contents: bytes) -> dict[str, Tlv]:
    """``SEQUENCE OF SEQUENCE { OID, value }`` as a map; duplicate OIDs are rejected."""
    pairs: dict[str, Tlv] = {}
    for entry in read_all(sequence_contents):
        if entry.tag != TAG_SEQUENCE:
            raise _fail("expected SEQUENCE { OID, value }")
        parts = read_all(entry.value)
        if len(parts) != 2 or parts[0].tag != TAG_OID:
            raise _fail("expected SEQUENCE { OID, value }")
        key = oid(parts[0].value)
        if key in pairs:
            raise _fail(f"duplicate OID {key}")
        pairs[key] = parts[1]
    return pairs
