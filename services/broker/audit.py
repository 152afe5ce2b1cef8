"""The release audit log: sealed, hash-chained, append-only records in the broker bucket.

Each release decision (released or refused) becomes one :class:`AuditRecord` under
``audit.<seq>`` (12-digit, zero-padded), sealed with the data key with the key and sequence
number in the associated data. Each record carries the SHA-256 of the previous *sealed*
record, so :meth:`AuditLog.verify_chain` detects a record deleted from the middle,
reordered, or swapped for another. Records hold only metadata (node, resource, decision id,
verdict digest, outcome, trace id), never secret values.

Appends use create-if-absent on the next sequence number, so replicas sharing a bucket
serialise on it: the loser of a race reads the winner's record, advances its head and
retries. Deleting the newest records leaves a valid shorter chain; a running log catches
that (it remembers the longest chain it has seen), a freshly started one cannot without an
external anchor.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec

from services.broker.sealing import AeadKey, open_sealed, seal
from services.mesh.errors import SealingError
from services.mesh.kv import KeyValue, WriteConflictError

AUDIT_PREFIX = "audit."
SEQ_DIGITS = 12
MAX_FIELD = 253
MAX_APPEND_RETRIES = 64
GENESIS = bytes(32)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_REASON = re.compile(r"[a-z0-9_]+(?:\.[a-z0-9_]+)*")
_SEQ_KEY = re.compile(r"audit\.([0-9]{12})")


class Outcome(enum.StrEnum):
    """What the broker did with a secret request."""

    RELEASED = "released"
    REFUSED = "refused"
    PIN_RESET = "pin_reset"
    """An operator released a node's hardware pin (``attestmesh node reset``)."""


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One release decision; ``prev`` is the SHA-256 of the previous sealed record."""

    seq: int
    time: datetime
    node: str
    resource: str
    decision_id: str
    verdict_digest: str
    outcome: Outcome
    reason: str = ""
    trace_id: str = ""
    prev: bytes


def audit_key(seq: int) -> str:
    """The KV key of record ``seq``; zero padding keeps lexical and numeric order equal."""
    return f"{AUDIT_PREFIX}{seq:0{SEQ_DIGITS}d}"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _check_fields(
    *, node: str, resource: str, decision_id: str, verdict_digest: str, reason: str, trace_id: str
) -> None:
    problems = [
        label
        for label, value in (("node", node), ("resource", resource), ("decision_id", decision_id))
        if not 0 < len(value) <= MAX_FIELD or not value.isprintable()
    ]
    if _HEX64.fullmatch(verdict_digest) is None:
        problems.append("verdict_digest (64 lowercase hex)")
    if reason and (len(reason) > MAX_FIELD or _REASON.fullmatch(reason) is None):
        problems.append("reason (dotted code)")
    if trace_id and _TRACE_ID.fullmatch(trace_id) is None:
        problems.append("trace_id (32 lowercase hex)")
    if problems:
        raise SealingError("broker.audit_field_invalid", ", ".join(problems))


class AuditLog:
    """Append and read the chained audit records in ``kv``."""

    def __init__(
        self, kv: KeyValue, data_key: AeadKey, *, clock: Callable[[], datetime] = _utcnow
    ) -> None:
        self._kv = kv
        self._key = data_key
        self._clock = clock
        self._head: tuple[int, bytes] | None = None
        self._longest = 0

    def __repr__(self) -> str:
        return f"AuditLog(head={self._head[0] if self._head else None})"

    def _open(self, seq: int, blob: bytes) -> AuditRecord:
        opened = open_sealed(self._key, blob, purpose="audit", name=audit_key(seq))
        try:
            record = msgspec.msgpack.decode(opened.plaintext, type=AuditRecord)
        except msgspec.DecodeError as exc:
            raise SealingError(
                "broker.seal_malformed", f"{audit_key(seq)} does not decode"
            ) from exc
        if opened.version != seq or record.seq != seq:
            raise SealingError("broker.audit_chain_broken", f"{audit_key(seq)} is out of place")
        return record

    async def _sequence_numbers(self) -> list[int]:
        seqs = []
        for key in await self._kv.keys():
            if not key.startswith(AUDIT_PREFIX):
                continue
            match = _SEQ_KEY.fullmatch(key)
            if match is None:
                raise SealingError("broker.audit_chain_broken", f"stray key {key!r}")
            seqs.append(int(match.group(1)))
        return sorted(seqs)

    async def _find_head(self) -> tuple[int, bytes]:
        seqs = await self._sequence_numbers()
        if not seqs:
            return 0, GENESIS
        last = seqs[-1]
        found = await self._kv.get(audit_key(last))
        if found is None:
            raise SealingError("broker.audit_chain_broken", f"{audit_key(last)} vanished")
        self._open(last, found[0])
        return last + 1, hashlib.sha256(found[0]).digest()

    async def _follow(self, seq: int) -> None:
        """A peer appended ``seq`` first: chain onto its record instead of rescanning."""
        found = await self._kv.get(audit_key(seq))
        if found is None:
            self._head = None
            return
        self._open(seq, found[0])
        self._head = (seq + 1, hashlib.sha256(found[0]).digest())

    async def append(
        self,
        *,
        node: str,
        resource: str,
        decision_id: str,
        verdict_digest: str,
        outcome: Outcome,
        reason: str = "",
        trace_id: str = "",
    ) -> AuditRecord:
        """Record one release decision and return it as stored."""
        _check_fields(
            node=node,
            resource=resource,
            decision_id=decision_id,
            verdict_digest=verdict_digest,
            reason=reason,
            trace_id=trace_id,
        )
        now = self._clock()
        if now.tzinfo is None:
            raise SealingError("broker.audit_field_invalid", "clock must be timezone-aware")
        for _ in range(MAX_APPEND_RETRIES):
            if self._head is None:
                self._head = await self._find_head()
            seq, prev = self._head
            record = AuditRecord(
                seq=seq,
                time=now,
                node=node,
                resource=resource,
                decision_id=decision_id,
                verdict_digest=verdict_digest,
                outcome=outcome,
                reason=reason,
                trace_id=trace_id,
                prev=prev,
            )
            blob = seal(
                self._key,
                msgspec.msgpack.encode(record),
                purpose="audit",
                name=audit_key(seq),
                version=seq,
            )
            try:
                await self._kv.create(audit_key(seq), blob)
            except WriteConflictError:
                await self._follow(seq)
                continue
            self._head = (seq + 1, hashlib.sha256(blob).digest())
            self._longest = max(self._longest, seq + 1)
            return record
        raise SealingError("broker.write_conflict", "audit append kept conflicting")

    async def entries(self) -> list[AuditRecord]:
        """Every record in order, after verifying the whole chain."""
        seqs = await self._sequence_numbers()
        if seqs != list(range(len(seqs))):
            missing = sorted(set(range(seqs[-1] + 1)) - set(seqs))
            raise SealingError("broker.audit_chain_broken", f"missing records {missing[:8]}")
        if len(seqs) < self._longest:
            raise SealingError(
                "broker.audit_truncated",
                f"{len(seqs)} records, but {self._longest} were seen earlier",
            )
        records = []
        prev = GENESIS
        for seq in seqs:
            found = await self._kv.get(audit_key(seq))
            if found is None:
                raise SealingError("broker.audit_chain_broken", f"{audit_key(seq)} vanished")
            record = self._open(seq, found[0])
            if not hmac.compare_digest(record.prev, prev):
                raise SealingError(
                    "broker.audit_chain_broken", f"{audit_key(seq)} does not follow its predecessor"
                )
            prev = hashlib.sha256(found[0]).digest()
            records.append(record)
        self._longest = max(self._longest, len(records))
        return records

    async def verify_chain(self) -> int:
        """Verify the chain end to end; return its length or raise ``SealingError``."""
        return len(await self.entries())
