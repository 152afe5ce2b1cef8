"""Measured-boot event log (TCG PC Client Platform Firmware Profile, crypto-agile format).

The log is what the firmware says it measured; the quote is what the TPM signed. Replaying the
log (extend: PCR = H(PCR || digest), from the reset value) and comparing with the quoted PCRs
turns the unsigned events into verified claims, event by event. Layout (little-endian, unlike
TPM structures):

    TCG_PCR_EVENT   pcrIndex u32, eventType u32, digest[20], eventSize u32, event
                    (the first event: EV_NO_ACTION carrying TCG_EfiSpecIDEvent
                    "Spec ID Event03", which lists each bank's algorithm id and digest size)
    TCG_PCR_EVENT2  pcrIndex u32, eventType u32, TPML_DIGEST_VALUES (count u32, then per bank
                    hashAlg u16 + digest of the size the Spec ID event gave), eventSize u32, event

EV_NO_ACTION events are not extended; a "StartupLocality" EV_NO_ACTION sets PCR0's reset value
to the locality (H-CRTM/locality-3 start, as Azure and GCE firmware report it). PCRs 17-22 reset
to all ones. Codes: ``tpm.eventlog_malformed`` (a ParseError while parsing), and from replay
``tpm.eventlog_mismatch`` (a quoted PCR differs from its replay).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from services.mesh.errors import ParseError

EV_NO_ACTION = 0x3
SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
STARTUP_LOCALITY = b"StartupLocality\x00"
MAX_LOG_SIZE = 512 * 1024
MAX_EVENTS = 10_000
MAX_EVENT_SIZE = 128 * 1024
MAX_ALGORITHMS = 16
MAX_PCR_INDEX = 31
DATA_CLAIM_LIMIT = 128
"""Event data up to this many bytes is shown in the claims (larger data by its size only)."""

_HASH_NAMES = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512"}

EVENT_TYPES: dict[int, str] = {
    0x0: "EV_PREBOOT_CERT", 0x1: "EV_POST_CODE", 0x2: "EV_UNUSED", 0x3: "EV_NO_ACTION",
    0x4: "EV_SEPARATOR", 0x5: "EV_ACTION", 0x6: "EV_EVENT_TAG", 0x7: "EV_S_CRTM_CONTENTS",
    0x8: "EV_S_CRTM_VERSION", 0x9: "EV_CPU_MICROCODE", 0xA: "EV_PLATFORM_CONFIG_FLAGS",
    0xB: "EV_TABLE_OF_DEVICES", 0xC: "EV_COMPACT_HASH", 0xD: "EV_IPL",
    0xE: "EV_IPL_PARTITION_DATA", 0xF: "EV_NONHOST_CODE", 0x10: "EV_NONHOST_CONFIG",
    0x11: "EV_NONHOST_INFO", 0x12: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG", 0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION", 0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER", 0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION", 0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES", 0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2", 0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x80000010: "EV_EFI_HCRTM_EVENT", 0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB", 0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}  # fmt: skip


@dataclass(frozen=True)
class Event:
    """One TCG_PCR_EVENT2: PCR, type, digest per bank algorithm id, and the event data."""

    pcr: int
    type: int
    digests: dict[int, bytes]
    data: bytes

    @property
    def type_name(self) -> str:
        return EVENT_TYPES.get(self.type, f"0x{self.type:08x}")


@dataclass(frozen=True)
class EventLog:
    """A parsed crypto-agile log: the banks it records and its events (Spec ID event excluded)."""

    digest_sizes: dict[int, int]
    events: tuple[Event, ...]
    startup_locality: int = 0


class _LeReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or self.pos + size > len(self.data):
            raise ParseError("tpm.eventlog_malformed", f"{what} truncated at offset {self.pos}")
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out

    def u16(self, what: str) -> int:
        value: int = struct.unpack("<H", self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self.take(4, what))[0]
        return value

    def at_end(self) -> bool:
        return self.pos >= len(self.data)


def _spec_id(data: bytes) -> dict[int, int]:
    reader = _LeReader(data)
    if reader.take(16, "Spec ID signature") != SPEC_ID_SIGNATURE:
        raise ParseError("tpm.eventlog_malformed", "first event is not a Spec ID Event03 log")
    reader.take(8, "Spec ID header")  # platformClass, version minor/major, errata, uintnSize
    count = reader.u32("numberOfAlgorithms")
    if not 0 < count <= MAX_ALGORITHMS:
        raise ParseError("tpm.eventlog_malformed", f"Spec ID lists {count} algorithms")
    sizes: dict[int, int] = {}
    for _ in range(count):
        alg, size = reader.u16("algorithmId"), reader.u16("digestSize")
        if not 0 < size <= 64:
            raise ParseError("tpm.eventlog_malformed", f"digest size {size} for 0x{alg:04x}")
        sizes[alg] = size
    vendor = reader.take(1, "vendorInfoSize")[0]
    reader.take(vendor, "vendorInfo")
    return sizes


def _event_size(reader: _LeReader) -> int:
    size = reader.u32("eventSize")
    if size > MAX_EVENT_SIZE:
        raise ParseError("tpm.eventlog_malformed", f"event of {size} bytes")
    return size


def parse_event_log(data: bytes) -> EventLog:
    """Parse a crypto-agile event log; raises ``ParseError`` (``tpm.eventlog_malformed``)."""
    if len(data) > MAX_LOG_SIZE:
        raise ParseError("tpm.eventlog_malformed", f"event log of {len(data)} bytes")
    reader = _LeReader(bytes(data))
    reader.u32("pcrIndex")
    if reader.u32("eventType") != EV_NO_ACTION:
        raise ParseError("tpm.eventlog_malformed", "first event is not EV_NO_ACTION")
    reader.take(20, "SHA-1 digest")
    sizes = _spec_id(reader.take(_event_size(reader), "Spec ID event"))
    events: list[Event] = []
    locality = 0
    while not reader.at_end():
        if len(events) >= MAX_EVENTS:
            raise ParseError("tpm.eventlog_malformed", f"more than {MAX_EVENTS} events")
        pcr, kind = reader.u32("pcrIndex"), reader.u32("eventType")
        if pcr > MAX_PCR_INDEX:
            raise ParseError("tpm.eventlog_malformed", f"event for PCR {pcr}")
        count = reader.u32("digests.count")
        if count > MAX_ALGORITHMS:
            raise ParseError("tpm.eventlog_malformed", f"{count} digests in one event")
        digests: dict[int, bytes] = {}
        for _ in range(count):
            alg = reader.u16("hashAlg")
            if alg not in sizes:
                raise ParseError("tpm.eventlog_malformed", f"digest 0x{alg:04x} not in Spec ID")
            digests[alg] = reader.take(sizes[alg], "digest")
        body = reader.take(_event_size(reader), "event data")
        if kind == EV_NO_ACTION and body.startswith(STARTUP_LOCALITY) and len(body) >= 17:
            locality = body[16]
        events.append(Event(pcr, kind, digests, body))
    return EventLog(sizes, tuple(events), locality)


def reset_value(pcr: int, size: int, locality: int) -> bytes:
    """A PCR's value after TPM2_Startup as the log's events start from it."""
    if 17 <= pcr <= 22:
        return b"\xff" * size
    if pcr == 0 and locality:
        return bytes(size - 1) + bytes([locality])
    return bytes(size)


@dataclass
class Replay:
    """Replayed PCR values of one bank, and which quoted PCRs they do not match."""

    values: dict[int, bytes] = field(default_factory=dict)
    mismatched: list[int] = field(default_factory=list)
    unquoted: list[int] = field(default_factory=list)


def replay(log: EventLog, bank: int, quoted: dict[int, bytes]) -> Replay:
    """Extend every measured event of ``bank`` and compare with the ``quoted`` PCR values."""
    name = _HASH_NAMES.get(bank)
    if name is None or bank not in log.digest_sizes:
        raise ParseError("tpm.eventlog_malformed", f"the log does not record bank 0x{bank:04x}")
    size = log.digest_sizes[bank]
    result = Replay()
    for event in log.events:
        if event.type == EV_NO_ACTION:
            continue
        digest = event.digests.get(bank)
        if digest is None:
            raise ParseError("tpm.eventlog_malformed", f"an event lacks the {name} digest")
        current = result.values.get(event.pcr)
        if current is None:
            current = reset_value(event.pcr, size, log.startup_locality)
        result.values[event.pcr] = hashlib.new(name, current + digest).digest()
    for pcr in sorted(result.values):
        if pcr not in quoted:
            result.unquoted.append(pcr)
        elif quoted[pcr] != result.values[pcr]:
            result.mismatched.append(pcr)
    return result


MAX_EVENT_CLAIMS = 512
"""Events listed as claims at most: the EAR must fit a bus message (the replay covers all)."""


def event_claims(log: EventLog, bank: int) -> list[dict[str, object]]:
    """The first :data:`MAX_EVENT_CLAIMS` events as claims: PCR, type, the bank's digest, and
    small event data as hex (every event is still replayed against the PCRs)."""
    out: list[dict[str, object]] = []
    for event in log.events[:MAX_EVENT_CLAIMS]:
        item: dict[str, object] = {
            "pcr": event.pcr,
            "type": event.type_name,
            "digest": event.digests.get(bank, b"").hex(),
            "size": len(event.data),
        }
        if len(event.data) <= DATA_CLAIM_LIMIT:
            item["data"] = event.data.hex()
        out.append(item)
    return out
