"""What this broker last saw stored under each node's decision key, and at which revision.

Why: recording a decision was a read of ``decision.<node>`` and then a compare-and-set
against the revision read, on every presented decision, and the consumer read the key again
for every decision it was delivered, although the value read was nearly always the one this
broker had itself written moments before. Each of those is a round trip through
nats-server. So the broker remembers, per node, the digest of the record it last wrote or
read there, that record's revision and its order (:func:`.presented.order_of`), and:

* a decision newer than the remembered one is written by compare-and-set against the
  remembered revision at once. The write succeeds only if the remembered record is still the
  stored one, and then it is exactly what a fresh read would have allowed; any conflict (the
  key changed elsewhere: another replica, the consumer, an operator with bucket access)
  falls back to a fresh read, as before;
* the consumer, delivered an *allow* decision whose very record this broker has seen stored,
  writes nothing and reads nothing. That skip cannot lose anything: every writer replaces a
  stored decision that still verifies only with one at least as new, and the decision at
  hand still verifies (the consumer has just checked it), so whatever replaced it since is at
  least as new and would have been kept by the read too. A deny is never skipped: it is read,
  recorded, announced and audited exactly as before.

Every refusal and every "nothing to write" other than that skip is decided on a fresh read.
What is remembered is only ever a pair actually observed (a value read at its revision, or
a value written and the revision the write returned), so an entry can be old, never wrong:
an old entry costs one failed compare-and-set. Within one broker, whatever records a node's
decision (a secret request presenting it, the consumer) takes its turn on that node
(:meth:`Recorded.turn`), so the consumer and a request racing on one decision do not both
write against the same remembered revision: the second finds the first one's record
remembered. Entries keep the highest revision seen, and at most :data:`MAX_REMEMBERED` nodes
are kept, least recently used first out (turns exist only while taken or awaited); a digest
is kept rather than the record (a token and its appraisal summary, up to kilobytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.mesh.kv import KeyValue, WriteConflictError

MAX_REMEMBERED = 65_536


@dataclass(frozen=True, slots=True)
class Seen:
    """A record observed under a decision key: its SHA-256, revision and order."""

    digest: bytes
    revision: int
    order: int


def digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


class Recorded:
    """The bounded per-key memory described in the module docstring."""

    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self._limit = limit
        self._seen: OrderedDict[str, Seen] = OrderedDict()
        self._turns: dict[str, tuple[asyncio.Lock, int]] = {}
        """Per key being recorded: its lock and how many hold or await it."""

    def __repr__(self) -> str:
        return f"Recorded(keys={len(self._seen)})"

    def __len__(self) -> int:
        return len(self._seen)

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        """Record under ``key`` only while no one else in this broker does."""
        lock, users = self._turns.get(key, (asyncio.Lock(), 0))
        self._turns[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._turns[key]
            if users == 1:
                del self._turns[key]
            else:
                self._turns[key] = (lock, users - 1)

    def recall(self, key: str) -> Seen | None:
        seen = self._seen.get(key)
        if seen is not None:
            self._seen.move_to_end(key)
        return seen

    def holds(self, key: str, raw: bytes) -> bool:
        """Whether ``raw`` is the record last seen stored under ``key``."""
        seen = self._seen.get(key)
        return seen is not None and seen.digest == digest(raw)

    def note(self, key: str, raw: bytes, revision: int, order: int) -> None:
        """``raw`` (of ``order``) was read or written under ``key`` at ``revision``; an
        observation older than the one kept is ignored."""
        kept = self._seen.get(key)
        if kept is not None and kept.revision >= revision:
            return
        self._seen[key] = Seen(digest(raw), revision, order)
        self._seen.move_to_end(key)
        while len(self._seen) > self._limit:
            self._seen.popitem(last=False)

    def forget(self, key: str, revision: int) -> None:
        """Drop the entry for ``key`` if it is still the one at ``revision`` (a
        compare-and-set against it failed, so it is no longer the stored record)."""
        kept = self._seen.get(key)
        if kept is not None and kept.revision == revision:
            del self._seen[key]


async def write_over(state: KeyValue, memory: Recorded, key: str, raw: bytes, order: int) -> bool:
    """Write ``raw`` (of ``order``) under ``key`` against the remembered revision, if what is
    remembered there is older; ``False`` if nothing is remembered, it is not older, or the
    write conflicted (the caller then reads)."""
    seen = memory.recall(key)
    if seen is None or seen.order >= order:
        return False
    try:
        revision = await state.update(key, raw, seen.revision)
    except WriteConflictError:
        memory.forget(key, seen.revision)
        return False
    memory.note(key, raw, revision, order)
    return True
