"""TDX CCEL: the firmware's event log replayed against the quote's RTMRs.

A TD's firmware (TDVF) measures what it loads into the runtime measurement registers and logs
each measurement in the log area the ACPI CCEL table points to: a TCG PC Client crypto-agile
log with SHA-384 digests, parsed here by the TPM family's parser
(:mod:`services.verifier.families.tpm.eventlog`). The log is unsigned; the RTMRs are in the
signed quote. Replaying the log (each RTMR starts at 48 zero bytes and extends as
SHA-384(RTMR || digest)) and finding the quoted values is what turns its events into claims.

An event's index is the UEFI CC measurement-register index (UEFI 2.10 §38.4.1): 0 is MRTD,
which the TDX module builds at TD creation and no log replays, so such events are left out;
1..4 are RTMR[0]..RTMR[3]. An RTMR no event names must still be all zeros. EV_NO_ACTION events
are not extended, so they verify nothing and are not claims either. The replay binds each
event's digest, not its data: the ``text``/``data`` summary is only what the firmware says it
measured, for people to read; reference values should name digests.

The area is read as the firmware reserved it (its length is the table's LAML): the events,
then the unused rest in its erased state, all 0xFF (the Linux TDX guest driver stops at an
index of 0xFFFFFFFF for the same reason). :func:`used_log` cuts that fill off; a last event
whose own data ends in 0xFF bytes would lose them too and the log would be reported malformed,
which fails closed. Codes: ``tdx.ccel_malformed`` (ParseError), and from the appraisal
``tdx.ccel_rtmr_mismatch``.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from services.mesh.errors import ParseError
from services.verifier.families.base import Check, Reason
from services.verifier.families.tpm import eventlog

CCEL_FILE = "ccel.bin"
"""The collateral name under which the event log reaches the TDX verifier."""
MAX_AREA_SIZE = 1024 * 1024
"""The log area as read, fill included (its size is the table's LAML: 256 KiB on GCE)."""
MAX_EVENTS = 512
"""Measured events a log may hold; with the caps below their claims stay within ~160 KiB of
JSON, which keeps the EAR that carries them under the wire's 256 KiB token limit."""
TEXT_LIMIT = 64
"""Printable event data (grub commands, EFI actions) is shown as text up to this many chars."""
DATA_LIMIT = 32
"""Other event data is shown as hex of at most this many leading bytes; ``size`` is exact."""
SHA384 = 0x000C
RTMR_SIZE = 48
MAX_MR_INDEX = 4
FILL = b"\xff"

Rtmrs = tuple[bytes, bytes, bytes, bytes]


@dataclass(frozen=True)
class CcelResult:
    """Per RTMR: whether its replay matches the quote, and the replayed value; the events."""

    matched: tuple[bool, bool, bool, bool]
    replayed: Rtmrs
    events: tuple[dict[str, Any], ...]

    @property
    def ok(self) -> bool:
        return all(self.matched)

    @property
    def mismatched(self) -> list[int]:
        """The RTMR numbers (0..3) whose replay differs from the quoted value."""
        return [i for i, ok in enumerate(self.matched) if not ok]


def used_log(area: bytes) -> bytes:
    """The events of a CCEL log area, without the erased (0xFF) rest; bounded.

    The used part must fit the event-log parser's bound, which is also what the wire carries.
    """
    if len(area) > MAX_AREA_SIZE:
        raise ParseError("tdx.ccel_malformed", f"CCEL log area of {len(area)} bytes")
    used = bytes(area).rstrip(FILL)
    if len(used) > eventlog.MAX_LOG_SIZE:
        raise ParseError("tdx.ccel_malformed", f"CCEL event log of {len(used)} bytes")
    return used


def _summary(data: bytes) -> dict[str, Any]:
    """``text`` for printable ASCII data (trailing NULs dropped), else leading bytes as hex."""
    text = data.rstrip(b"\x00")
    if text and text.isascii() and text.decode("ascii").isprintable():
        return {"text": text[:TEXT_LIMIT].decode("ascii")}
    return {"data": data[:DATA_LIMIT].hex()}


def replay_ccel(log: bytes, rtmrs: Rtmrs) -> CcelResult:
    """Parse the CCEL ``log`` (area or used part), replay it and compare with ``rtmrs``.

    Raises ``ParseError`` (``tdx.ccel_malformed``) when the log is not a bounded, well-formed
    SHA-384 crypto-agile log whose measured events name RTMRs; a log that parses but does not
    replay to the quoted values is a result with ``ok`` false, not an error.
    """
    used = used_log(log)
    try:
        parsed = eventlog.parse_event_log(used)
        values = eventlog.replay(parsed, SHA384, {}).values
    except ParseError as exc:
        raise ParseError("tdx.ccel_malformed", f"CCEL: {exc.detail}") from exc
    if parsed.digest_sizes[SHA384] != RTMR_SIZE:
        raise ParseError("tdx.ccel_malformed", "CCEL: the Spec ID gives SHA-384 a wrong size")
    measured = [e for e in parsed.events if e.type != eventlog.EV_NO_ACTION]
    if len(measured) > MAX_EVENTS:
        raise ParseError("tdx.ccel_malformed", f"CCEL: more than {MAX_EVENTS} measured events")
    claims: list[dict[str, Any]] = []
    for event in measured:
        if event.pcr > MAX_MR_INDEX:
            raise ParseError("tdx.ccel_malformed", f"CCEL: MR index {event.pcr} is no RTMR")
        if event.pcr == 0:
            continue
        claims.append(
            {
                "index": event.pcr,
                "rtmr": event.pcr - 1,
                "type": event.type_name,
                "digest": event.digests[SHA384].hex(),
                "size": len(event.data),
                **_summary(event.data),
            }
        )
    zero = bytes(RTMR_SIZE)
    replayed: Rtmrs = (
        values.get(1, zero),
        values.get(2, zero),
        values.get(3, zero),
        values.get(4, zero),
    )
    matched = (
        hmac.compare_digest(replayed[0], rtmrs[0]),
        hmac.compare_digest(replayed[1], rtmrs[1]),
        hmac.compare_digest(replayed[2], rtmrs[2]),
        hmac.compare_digest(replayed[3], rtmrs[3]),
    )
    return CcelResult(matched, replayed, tuple(claims))


def appraise_ccel(
    family: str, log: bytes, rtmrs: Rtmrs, *, quote_verified: bool
) -> tuple[dict[str, Any], Check, list[Reason]]:
    """Claims, the report's check and the reasons of one CCEL replay, for the TDX appraisal.

    The RTMRs are only worth replaying against once the quote carrying them verified (as the
    TPM family does with its quoted PCRs); before that the check is listed as not run, and the
    quote's own findings already decide the verdict.
    """
    if not quote_verified:
        return {}, Check("ccel_replay", False, "not replayed: the quote did not verify"), []
    try:
        result = replay_ccel(log, rtmrs)
    except ParseError as exc:
        reason = Reason(f"{family}.ccel_malformed", exc.detail)
        return {}, Check("ccel_replay", False, exc.detail), [reason]
    if not result.ok:
        names = ", ".join(f"RTMR[{i}]" for i in result.mismatched)
        message = f"replaying the CCEL event log does not give the quoted {names}"
        reason = Reason(f"{family}.ccel_rtmr_mismatch", message)
        return {}, Check("ccel_replay", False, message), [reason]
    detail = f"{len(result.events)} events replay to RTMR[0..3]"
    claims = {"ccel_events": list(result.events), "ccel_verified": True}
    return claims, Check("ccel_replay", True, detail), []
