"""A small OVMF image with what SEV-SNP launch measurement reads from real firmware.

edk2's reset vector (``OvmfPkg/ResetVector``) publishes, at the very end of the image, a
table of GUID-tagged entries that hypervisors and measurement tools read:

* the last 32 bytes are the reset vector itself; just before them sits the table's footer,
  ``u16 size, GUID 96b582de-…`` whose size covers the whole table;
* the entries are packed backwards from there, each ``data, u16 size, GUID`` (the size
  counting the 18-byte header): the SEV-ES reset block (``u32`` AP reset address), the SEV
  metadata pointer (``u32`` offset of the metadata from the end of the image) and, for
  direct kernel boot, the SEV hash table (``u32`` guest address, ``u32`` size);
* the SEV metadata: ``"ASEV", u32 size, u32 version 1, u32 count``, then per section
  ``u32 guest address, u32 size, u32 type`` (1 zeroed memory, 2 secrets page, 3 CPUID page,
  0x10 kernel hashes).

That is all a launch digest depends on besides the firmware's own pages, so this image
measures like firmware even though it boots nothing.
"""

from __future__ import annotations

import struct
import uuid

PAGE = 4096
FOOTER_GUID = "96b582de-1fb2-45f7-baea-a366c55a082d"
RESET_BLOCK_GUID = "00f771de-1a7e-4fcb-890e-68c77e2fb44e"
METADATA_GUID = "dc886566-984a-4798-a75e-5585a7bf67cc"
HASH_TABLE_GUID = "7255371f-3a3b-4b04-927b-1da6efa8d454"
SEC_MEM, SECRETS, CPUID, KERNEL_HASHES = 1, 2, 3, 0x10
METADATA_FROM_END = 0x800
HASH_TABLE_GPA = 0x80BC00


def _entry(guid: str, data: bytes) -> bytes:
    return data + struct.pack("<H", len(data) + 18) + uuid.UUID(guid).bytes_le


def build_ovmf(
    *, pages: int = 4, kernel_hashes: bool = True, reset_eip: int = 0xFFFFF000, fill: int = 0x90
) -> bytes:
    """An image of ``pages`` pages (filled with ``fill``) carrying the footer table and SEV
    metadata; ``kernel_hashes`` adds the section and table a direct kernel boot needs."""
    sections = [(0x800000, 0x9000, SEC_MEM), (0x809000, PAGE, SECRETS), (0x80A000, PAGE, CPUID)]
    entries = [
        _entry(RESET_BLOCK_GUID, struct.pack("<I", reset_eip)),
        _entry(METADATA_GUID, struct.pack("<I", METADATA_FROM_END)),
    ]
    if kernel_hashes:
        sections.append((HASH_TABLE_GPA & ~(PAGE - 1), PAGE, KERNEL_HASHES))
        entries.append(_entry(HASH_TABLE_GUID, struct.pack("<II", HASH_TABLE_GPA, 0x400)))
    image = bytearray([fill]) * (pages * PAGE)
    body = b"".join(struct.pack("<III", *section) for section in sections)
    metadata = b"ASEV" + struct.pack("<III", 16 + len(body), 1, len(sections)) + body
    start = len(image) - METADATA_FROM_END
    image[start : start + len(metadata)] = metadata
    table = b"".join(entries)
    footer = struct.pack("<H", len(table) + 18) + uuid.UUID(FOOTER_GUID).bytes_le
    end = len(image) - 32
    image[end - len(table) - len(footer) : end] = table + footer
    return bytes(image)
