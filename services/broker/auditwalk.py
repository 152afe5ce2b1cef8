"""Reading on through the audit log from where the last checkpoint walk stopped.

A checkpoint must verify the chain from the stored checkpoint's head to the current head
before signing it. Listing the bucket to find the records costs the whole bucket (every
key of every node, and every retained record) each time; this reads only what was written
since. The broker bucket keeps one revision per key, so reading on through the writes under
``audit.`` after the revision where the last walk stopped (:meth:`KeyValue.next_write`)
meets each key written since exactly once, oldest first: in a log that only grows, exactly
the next records, in sequence order. Anything else met on the way (a record rewritten, a
delete or purge marker, a stray key, a gap in the sequence) ends the walk without a verdict,
and the caller makes the full check, which lists the log and names the break, or finds none
(a marker left by pruning a record rewritten behind the checkpoint, say).

What this cannot see is a record removed without a marker (a message deleted from the
stream itself, beyond the KV operations): the walk re-reads its own starting record (which
the stored checkpoint names) and checks its revision, so the checkpoint's head cannot go
that way unnoticed, a gap among the new records shows as a missing next record, and a
running log knows how far the chain reached; but such a removal strictly behind the last
checkpoint, among records that walk already verified, is left to the listing checks
(``attestmesh audit verify`` and ``list``, and a fresh process's first checkpoint).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from services.broker.auditrecord import AUDIT_PREFIX, audit_key
from services.broker.checkpoint import Checkpoint
from services.mesh.kv import KeyValue
from services.mesh.pace import Pace

MAX_WALKED = 100_000
"""The most writes one walk reads on through before giving way to the full check (which
fails loudly on a bucket that large)."""


@dataclass(frozen=True)
class Cursor:
    """Where a checkpoint walk ended.

    Record ``seq`` (its sealed blob hashing to ``head``, at KV revision ``revision``) is the
    newest one verified link by link from the stored checkpoint's head. Every write to the
    log up to revision ``after`` has been accounted for (read by a walk, or reflected in a
    listing taken after it), so the next walk reads on from ``after``.
    """

    seq: int
    head: bytes
    revision: int
    after: int


async def read_on(
    kv: KeyValue,
    cursor: Cursor,
    anchor: Checkpoint | None,
    follows: Callable[[int, bytes, bytes], bool],
    longest: int,
    *,
    pause_s: float = 0.0,
) -> tuple[Cursor | None, int]:
    """Verify what was written to the log since ``cursor``; return where the chain now ends.

    With ``pause_s``, the walk pauses that long every few reads (:mod:`services.mesh.pace`). A
    walk costs its process about 0.15 ms of CPU per record, all of it on the event loop that
    answers secret requests: a checkpoint of 1,000 records took 0.2 s back to back and held
    up the releases meanwhile (rounds finishing during it took 30 ms longer, every 1,000
    releases). Paced, the same work is spread thin; nothing waits on a checkpoint.

    ``follows(seq, blob, prev)`` says whether ``blob`` opens as record ``seq`` linking to
    ``prev``; ``longest`` is one past the newest record this process has seen. This costs
    one read per new record plus two, and no listing. The result is ``None`` when only a
    full check can tell: a write other than the next record in order, a record that does
    not open or follow, the starting record rewritten or gone, a stored checkpoint that is
    not the one the walk started from or one ahead of it, or a log ending before the
    checkpoint or before ``longest``. The walk then reads on to the newest write without
    checking more, and the second value is that write's revision: a listing the caller takes
    next reflects every write up to it, so the walk after that need not meet them again.
    """
    pace = Pace(pause_s)
    found, after = await _verify(kv, cursor, anchor, follows, longest, pace=pace)
    if found is None:
        after = await _newest(kv, after, pace)
    return found, after


async def _verify(
    kv: KeyValue,
    cursor: Cursor,
    anchor: Checkpoint | None,
    follows: Callable[[int, bytes, bytes], bool],
    longest: int,
    *,
    pace: Pace,
) -> tuple[Cursor | None, int]:
    """:func:`read_on`'s checks; the second value is the revision it stopped at."""
    after = cursor.after
    if (
        anchor is None
        or anchor.seq < cursor.seq
        or (anchor.seq == cursor.seq and not hmac.compare_digest(anchor.head, cursor.head))
    ):
        return None, after
    found = await kv.get(audit_key(cursor.seq))
    if found is None or found[1] != cursor.revision:
        return None, after
    seq, head, revision = cursor.seq, cursor.head, cursor.revision
    for _ in range(MAX_WALKED):
        await pace.step()
        step = await kv.next_write(AUDIT_PREFIX, after)
        if step is None:
            break
        key, blob, after = step
        if key != audit_key(seq + 1) or blob is None or not follows(seq + 1, blob, head):
            return None, after
        seq, head, revision = seq + 1, hashlib.sha256(blob).digest(), after
        if seq == anchor.seq and not hmac.compare_digest(head, anchor.head):
            return None, after
    else:
        return None, after
    if seq < anchor.seq or seq + 1 < longest:
        return None, after
    return Cursor(seq=seq, head=head, revision=revision, after=after), after


async def _newest(kv: KeyValue, after: int, pace: Pace) -> int:
    """The revision of the newest write to the log after ``after`` (at most
    :data:`MAX_WALKED` on)."""
    for _ in range(MAX_WALKED):
        await pace.step()
        step = await kv.next_write(AUDIT_PREFIX, after)
        if step is None:
            break
        after = step[2]
    return after
