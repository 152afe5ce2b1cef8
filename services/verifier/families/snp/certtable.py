"""The extended-report certificate table (SNP_GET_EXT_REPORT certs, configfs-tsm ``auxblob``).

The host hands the guest a table of 24-byte entries ``{GUID (16, RFC 4122 byte order),
offset u32, length u32}`` terminated by an all-zero entry, followed by the certificates; offsets
are relative to the table's start. The GUIDs are those of the GHCB specification. The table comes
from the untrusted host, so parsing is strict and bounded: the terminator must be present, every
entry must point past the header and inside the buffer, and a GUID may appear only once (two
different VCEKs would make the choice ambiguous). Trailing zero padding is allowed because hosts
hand out whole pages.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from services.mesh.errors import ParseError

ENTRY_SIZE = 24
MAX_ENTRIES = 64
MAX_TABLE_SIZE = 0x10000

VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
VLEK_GUID = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
ARK_GUID = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
CRL_GUID = uuid.UUID("92f81bc3-5811-4d3d-97ff-d19f88dc67ea")

GUID_NAMES = {VCEK_GUID: "vcek", VLEK_GUID: "vlek", ASK_GUID: "ask", ARK_GUID: "ark"}
GUID_NAMES[CRL_GUID] = "crl"

_ZERO_ENTRY = bytes(ENTRY_SIZE)


@dataclass(frozen=True)
class CertTable:
    """Certificates by GUID, in table order."""

    entries: tuple[tuple[uuid.UUID, bytes], ...] = ()

    def get(self, guid: uuid.UUID) -> bytes | None:
        return next((blob for g, blob in self.entries if g == guid), None)

    @property
    def vcek(self) -> bytes | None:
        return self.get(VCEK_GUID)

    @property
    def vlek(self) -> bytes | None:
        return self.get(VLEK_GUID)

    def names(self) -> list[str]:
        """Entry kinds in table order (``vcek``, ``ask``... or the GUID when unknown)."""
        return [GUID_NAMES.get(g, str(g)) for g, _ in self.entries]


def parse_cert_table(data: bytes) -> CertTable:
    """Parse a certificate table; an empty buffer is an empty table. Raises :class:`ParseError`."""
    if not data:
        return CertTable()
    if len(data) > MAX_TABLE_SIZE:
        raise _malformed(f"{len(data)} bytes exceeds the {MAX_TABLE_SIZE}-byte bound")
    headers: list[tuple[uuid.UUID, int, int]] = []
    position = 0
    while True:
        if position + ENTRY_SIZE > len(data):
            raise _malformed("no all-zero terminating entry")
        entry = data[position : position + ENTRY_SIZE]
        position += ENTRY_SIZE
        if entry == _ZERO_ENTRY:
            break
        if len(headers) == MAX_ENTRIES:
            raise _malformed(f"more than {MAX_ENTRIES} entries")
        guid = uuid.UUID(bytes=bytes(entry[:16]))
        offset, length = struct.unpack_from("<II", entry, 16)
        if guid.int == 0:
            raise _malformed("an entry with the zero GUID is not the terminator")
        headers.append((guid, offset, length))
    seen: set[uuid.UUID] = set()
    entries: list[tuple[uuid.UUID, bytes]] = []
    for index, (guid, offset, length) in enumerate(headers):
        if guid in seen:
            raise _malformed(f"GUID {guid} appears twice")
        seen.add(guid)
        if length == 0 or offset < position or offset + length > len(data):
            raise _malformed(
                f"entry {index} ({offset=}, {length=}) is not inside [{position}, {len(data)})"
            )
        entries.append((guid, bytes(data[offset : offset + length])))
    return CertTable(tuple(entries))


def encode_cert_table(entries: Iterable[tuple[uuid.UUID, bytes]]) -> bytes:
    """Lay out ``entries`` as a host would: header, zero terminator, then the blobs in order."""
    items = list(entries)
    cursor = (len(items) + 1) * ENTRY_SIZE
    header = bytearray()
    for guid, blob in items:
        header += guid.bytes + struct.pack("<II", cursor, len(blob))
        cursor += len(blob)
    return bytes(header) + _ZERO_ENTRY + b"".join(blob for _, blob in items)


def _malformed(detail: str) -> ParseError:
    return ParseError("snp.cert_table_malformed", f"certificate table: {detail}")
