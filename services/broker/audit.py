"""The release audit log: sealed, hash-chained records in the broker bucket, with retention.

Each release decision (released, or refused to a requester holding the node's current
decision), and each deny decision that revokes a node (``revoked``, with the policy's
signed reasons), becomes one :class:`AuditRecord` (:mod:`services.broker.auditrecord`)
under ``audit.<seq>`` (12-digit, zero-padded), sealed with the data key with the key and
sequence number in the associated data. Refusals to unknown requesters are not sealed one by
one: the broker counts them and appends a periodic ``summary`` record carrying the counts.
Each record carries the SHA-256 of the previous *sealed* record, so a record deleted from
the middle, reordered, or swapped for another breaks the chain. Records hold only metadata
(node, resource, decision id, verdict digest, outcome, trace id), never secret values.

Retention: :meth:`AuditLog.checkpoint` verifies the chain since the last checkpoint and signs
its head with the broker key (:mod:`services.broker.checkpoint`); :meth:`AuditLog.prune` then
deletes the oldest records beyond ``max_records``, but never the checkpoint's head or
anything after it. Verification starts at the checkpoint: its signature, then the hash of
its head record, then every link forward. What is pruned must be a prefix, so a gap, a
rewrite or a deletion at or after the checkpoint fails; deleting the oldest retained record
before it looks like pruning, by design. A process that has checkpointed once verifies only
what was written to the log since (:mod:`services.broker.auditwalk`) and prunes with one
stream purge, so neither costs the whole bucket; it lists the log the first time, and again
only when the log is not as it left it.

Appends use create-if-absent on the next sequence number, so replicas sharing a bucket
serialise on it: the loser of a race reads the winner's record, advances its head and
retries. Deleting the newest records after the checkpoint leaves a valid shorter chain; a
running log catches that (it remembers the highest sequence it has seen), and no log can be
cut back behind the stored checkpoint.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec

from services.broker import checkpoint as checkpoints
from services.broker.auditrecord import (
    AUDIT_PREFIX,
    GENESIS,
    MAX_FIELD,
    MAX_REASONS,
    SEQ_KEY,
    SUMMARY_REASON,
    AuditRecord,
    Outcome,
    audit_key,
    check_fields,
)
from services.broker.auditwalk import Cursor, read_on
from services.broker.checkpoint import Checkpoint
from services.broker.sealing import AeadKey, open_sealed, seal
from services.mesh.errors import ConfigError, SealingError
from services.mesh.keys import SigningKey, TrustedKeys
from services.mesh.kv import KeyValue, WriteConflictError
from services.mesh.pace import Pace

__all__ = [
    "AUDIT_PREFIX",
    "DEFAULT_MAX_RECORDS",
    "GENESIS",
    "MAX_FIELD",
    "MAX_REASONS",
    "AuditLog",
    "AuditRecord",
    "Outcome",
    "audit_key",
]

MAX_APPEND_RETRIES = 64
DEFAULT_MAX_RECORDS = 20_000


def _utcnow() -> datetime:
    return datetime.now(UTC)


class AuditLog:
    """Append, read, checkpoint and prune the chained audit records in ``kv``.

    ``signer`` (the broker's key) is needed only to write checkpoints; ``trusted`` (holding
    the broker's public key) to read them. A stored checkpoint that cannot be verified is an
    error, never ignored.
    """

    def __init__(
        self,
        kv: KeyValue,
        data_key: AeadKey,
        *,
        clock: Callable[[], datetime] = _utcnow,
        signer: SigningKey | None = None,
        trusted: TrustedKeys | None = None,
        walk_pause_s: float = 0.0,
    ) -> None:
        """``walk_pause_s`` paces a walk over the log (:func:`.auditwalk.read_on`, and the
        full check's): a service answering requests from the same event loop sets it; a
        command need not."""
        if signer is not None and signer.name != checkpoints.BROKER_SIGNER:
            raise ConfigError("keys.wrong_name", f"checkpoints are signed as {signer.name!r}")
        self._kv = kv
        self._key = data_key
        self._walk_pause_s = walk_pause_s
        self._clock = clock
        self._signer = signer
        self._trusted = trusted
        self._head: tuple[int, bytes] | None = None
        self._longest = 0
        self._cursor: Cursor | None = None
        self._oldest: int | None = None
        self._relist_prune = False
        self._appending = asyncio.Lock()
        """One append at a time per process: concurrent requests racing for the same
        sequence number would each lose to the other and read back, over and over."""

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
        for key in await self._kv.keys(AUDIT_PREFIX, pause_s=self._walk_pause_s):
            match = SEQ_KEY.fullmatch(key)
            if match is None:
                raise SealingError("broker.audit_chain_broken", f"stray key {key!r}")
            seqs.append(int(match.group(1)))
        return sorted(seqs)

    async def load_checkpoint(self) -> Checkpoint | None:
        """The stored checkpoint, its signature verified (``None`` if there is none)."""
        return await checkpoints.load(self._kv, self._trusted)

    async def _retained(self) -> tuple[list[int], Checkpoint | None]:
        """Retained sequence numbers and the checkpoint, after the structural checks.

        Retained records must be one contiguous run (pruning removes a prefix); with a
        checkpoint the run must include its head, else they must start at 0. The listing
        must reach every record this process had written before it began; records appended
        while it ran (releases do not wait for a checkpoint) may be missing from it.
        """
        written = self._longest
        seqs = await self._sequence_numbers()
        anchor = await self.load_checkpoint()
        if seqs and seqs != list(range(seqs[0], seqs[0] + len(seqs))):
            missing = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))
            raise SealingError("broker.audit_chain_broken", f"missing records {missing[:8]}")
        last = seqs[-1] if seqs else -1
        if anchor is not None:
            if last < anchor.seq:
                raise SealingError(
                    "broker.audit_truncated",
                    f"the checkpoint covers record {anchor.seq}, the log ends at {last}",
                )
            if seqs[0] > anchor.seq:
                raise SealingError(
                    "broker.audit_chain_broken",
                    f"the checkpoint's head record {anchor.seq} is missing",
                )
        elif seqs and seqs[0] != 0:
            raise SealingError(
                "broker.audit_chain_broken", f"records before {seqs[0]} missing, no checkpoint"
            )
        if last + 1 < written:
            raise SealingError(
                "broker.audit_truncated",
                f"the log ends at {last}, but {written - 1} was seen earlier",
            )
        return seqs, anchor

    async def _find_head(self) -> tuple[int, bytes]:
        seqs, _ = await self._retained()
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
        counts: dict[str, int] | None = None,
        actor: str = "",
        reasons: list[str] | None = None,
    ) -> AuditRecord:
        """Record one release decision (or a refusal summary, an operator's change, or a
        revocation) and return it as stored."""
        tally = dict(counts or {})
        why = list(reasons or [])
        check_fields(
            node=node,
            resource=resource,
            decision_id=decision_id,
            verdict_digest=verdict_digest,
            reason=reason,
            trace_id=trace_id,
            counts=tally,
            actor=actor,
            reasons=why,
        )
        def make(seq: int, prev: bytes) -> AuditRecord:
            return AuditRecord(
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
                counts=tally,
                actor=actor,
                reasons=why,
            )

        async with self._appending:  # the time too, so times follow the sequence
            now = self._clock()
            if now.tzinfo is None:
                raise SealingError("broker.audit_field_invalid", "clock must be timezone-aware")
            return await self._append(make)

    async def _append(self, make: Callable[[int, bytes], AuditRecord]) -> AuditRecord:
        for _ in range(MAX_APPEND_RETRIES):
            if self._head is None:
                self._head = await self._find_head()
            seq, prev = self._head
            record = make(seq, prev)
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

    async def append_summary(self, counts: dict[str, int]) -> AuditRecord:
        """One sealed record for many counted refusals (never one per request)."""
        return await self.append(
            node="*",
            resource="*",
            decision_id="none",
            verdict_digest=hashlib.sha256(b"").hexdigest(),
            outcome=Outcome.SUMMARY,
            reason=SUMMARY_REASON,
            counts=counts,
        )

    async def _walk(
        self, seqs: list[int], anchor: Checkpoint | None
    ) -> tuple[list[AuditRecord], bytes, int]:
        """Open ``seqs`` in order, checking every link and the checkpoint's head hash; return
        the records, the hash of the last one's sealed blob and its revision.

        The first record's own link is checked only if it is record 0 (its predecessor may
        have been pruned); every later one must follow its predecessor exactly.
        """
        records: list[AuditRecord] = []
        prev: bytes | None = None
        revision = 0
        pace = Pace(self._walk_pause_s)
        for seq in seqs:
            await pace.step()
            found = await self._kv.get(audit_key(seq))
            if found is None:
                raise SealingError("broker.audit_chain_broken", f"{audit_key(seq)} vanished")
            record = self._open(seq, found[0])
            expected = GENESIS if seq == 0 else prev
            if expected is not None and not hmac.compare_digest(record.prev, expected):
                raise SealingError(
                    "broker.audit_chain_broken", f"{audit_key(seq)} does not follow its predecessor"
                )
            prev, revision = hashlib.sha256(found[0]).digest(), found[1]
            if (
                anchor is not None
                and seq == anchor.seq
                and not hmac.compare_digest(prev, anchor.head)
            ):
                raise SealingError(
                    "broker.audit_chain_broken", f"{audit_key(seq)} is not the checkpointed head"
                )
            records.append(record)
        return records, prev if prev is not None else GENESIS, revision

    async def entries(self, since: datetime | None = None) -> list[AuditRecord]:
        """Every retained record (from ``since`` on), after verifying all of them."""
        seqs, anchor = await self._retained()
        records, _, _ = await self._walk(seqs, anchor)
        if seqs:
            self._longest = max(self._longest, seqs[-1] + 1)
        if since is None:
            return records
        return [record for record in records if record.time >= since]

    async def verify_chain(self) -> int:
        """Verify from the checkpoint's head (or record 0) to the current head.

        Returns how many records were checked; raises ``SealingError`` on any break.
        """
        seqs, anchor = await self._retained()
        start = anchor.seq if anchor is not None else 0
        checked = [seq for seq in seqs if seq >= start]
        await self._walk(checked, anchor)
        if seqs:
            self._longest = max(self._longest, seqs[-1] + 1)
        return len(checked)

    async def checkpoint(self, *, full: bool = False) -> Checkpoint | None:
        """Verify the chain since the last checkpoint and sign its head; ``None`` if empty.

        The chain is verified before it is signed, so a checkpoint never vouches for a log
        that was already broken. A process that has checkpointed before reads on from where
        it stopped (:mod:`services.broker.auditwalk`); the first time, when that walk meets
        anything but the next records in order, or with ``full``, it lists the log (which
        also catches a record removed behind the checkpoint without a trace in the walk)
        and walks from the checkpoint's head.
        """
        if self._signer is None:
            raise SealingError("broker.checkpoint_unsigned", "no broker signing key")
        anchor = await self.load_checkpoint()
        cursor, seen = None, 0
        if self._cursor is not None and not full:
            cursor, seen = await read_on(
                self._kv,
                self._cursor,
                anchor,
                self._follows,
                self._longest,
                pause_s=self._walk_pause_s,
            )
        if cursor is None:
            # Its remembered state proved wrong (not merely an hourly full check).
            self._relist_prune = self._cursor is not None and not full
            anchor, cursor = await self._walk_all(seen)
            if cursor is None:
                return None
        self._longest = max(self._longest, cursor.seq + 1)
        if anchor is not None and anchor.seq == cursor.seq:
            self._cursor = cursor
            return anchor
        made = Checkpoint(
            seq=cursor.seq, head=cursor.head, count=cursor.seq + 1, time=self._clock()
        )
        token = checkpoints.sign(self._signer, made)
        trusted = self._trusted or TrustedKeys({self._signer.name: self._signer.public_key()})
        await checkpoints.store(self._kv, token, made, trusted)
        self._cursor = cursor
        return made

    def _follows(self, seq: int, blob: bytes, prev: bytes) -> bool:
        """Whether ``blob`` opens as record ``seq`` and links to ``prev``."""
        try:
            record = self._open(seq, blob)
        except SealingError:
            return False
        return hmac.compare_digest(record.prev, prev)

    async def _walk_all(self, seen: int) -> tuple[Checkpoint | None, Cursor | None]:
        """The full check a fresh process makes: list the log, walk from the checkpoint's head.

        Writes up to ``seen`` were made before the listing, so what they did is in it; the
        next walk reads on from there rather than meeting them again.
        """
        seqs, anchor = await self._retained()
        self._oldest = seqs[0] if seqs else None
        start = anchor.seq if anchor is not None else 0
        walked = [seq for seq in seqs if seq >= start]
        if not walked:
            return anchor, None
        _, head, revision = await self._walk(walked, anchor)
        return anchor, Cursor(
            seq=walked[-1], head=head, revision=revision, after=max(revision, seen)
        )

    async def prune(self, max_records: int) -> int:
        """Delete the oldest records beyond ``max_records``, never the checkpoint's head or
        anything after it; return how many were deleted (as far as this process knows: a
        replica may have pruned some of them first). Without a checkpoint, nothing is pruned
        (the records would then be unverifiable).

        Once this process knows its oldest record (from its first checkpoint or prune), this
        is the checkpoint's read, then, when something is due, two reads and one stream
        purge up to the oldest kept record. Otherwise, or when its last checkpoint found the
        log not as it left it, it lists the log first, and afterwards deletes any record
        below the cut that the purge left (one rewritten since, so newer).
        """
        if max_records < 1:
            raise SealingError("broker.audit_field_invalid", "max_records must be positive")
        anchor = await self.load_checkpoint()
        if anchor is None:
            return 0
        oldest = self._oldest
        if oldest is None or self._relist_prune:
            return await self._prune_listed(max_records)
        cutoff = anchor.seq + 1 - max_records
        if cutoff <= oldest:
            return 0
        head = await self._kv.get(audit_key(anchor.seq))
        if head is None or not hmac.compare_digest(hashlib.sha256(head[0]).digest(), anchor.head):
            return await self._prune_listed(max_records)  # which says what is wrong
        if not await self._purge_below(cutoff, head[1]):
            return await self._prune_listed(max_records)  # a peer pruned past it first
        self._oldest = cutoff
        return cutoff - oldest

    async def _purge_below(self, cutoff: int, ceiling: int) -> bool:
        """Purge every record written before record ``cutoff``; ``False`` if it is absent.

        Record n+1 is only ever created after record n, so everything written before the
        oldest kept record is older: one purge, no per-key delete markers left behind. A
        kept record newer than the checkpoint's head (revision ``ceiling``) was rewritten,
        and purging below it would take the head with it, so that is refused.
        """
        kept = await self._kv.get(audit_key(cutoff))
        if kept is None:
            return False
        if kept[1] > ceiling:
            raise SealingError(
                "broker.audit_chain_broken", f"{audit_key(cutoff)} was rewritten after the head"
            )
        await self._kv.purge_before(AUDIT_PREFIX, kept[1])
        return True

    async def _prune_listed(self, max_records: int) -> int:
        """:meth:`prune` from a listing of the log."""
        seqs, anchor = await self._retained()
        if anchor is None or not seqs:
            return 0
        cutoff = min(anchor.seq, seqs[-1] + 1 - max_records)
        doomed = [seq for seq in seqs if seq < cutoff]
        if not doomed:
            self._oldest, self._relist_prune = seqs[0], False
            return 0
        head = await self._kv.get(audit_key(anchor.seq))
        if head is None or not await self._purge_below(cutoff, head[1]):
            raise SealingError("broker.audit_chain_broken", f"{audit_key(cutoff)} vanished")
        remaining = set(await self._sequence_numbers())
        for seq in doomed:  # rewritten since (so newer): oldest first, keeping a suffix
            if seq in remaining:
                await self._kv.delete(audit_key(seq))
        self._oldest, self._relist_prune = cutoff, False
        return len(doomed)
