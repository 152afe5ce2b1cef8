"""An in-memory :class:`~services.mesh.kv.KeyValue` for network-free tests.

It follows JetStream KV semantics where the broker depends on them: one revision counter
for the whole bucket, create-if-absent, compare-and-set update and delete, one revision kept
per key (a delete leaves a marker that :meth:`MemoryKeyValue.next_write` reports). Every call
yields to the event loop first, so ``asyncio.gather`` over several clients interleaves
their reads and writes the way concurrent replicas would.

Setting :attr:`MemoryKeyValue.list_error` makes every listing raise it, as a bucket whose
listing fails on the bus does, so callers can be shown to fail closed without a network.

Two extra methods exist for tests that play the attacker: :meth:`MemoryKeyValue.overwrite`
writes unconditionally (an operator with raw bucket access), and
:meth:`MemoryKeyValue.snapshot` / :meth:`MemoryKeyValue.restore` roll the whole bucket back.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from services.mesh.errors import BusError
from services.mesh.kv import (
    KEY_EXISTS,
    REVISION_CONFLICT,
    WriteConflictError,
    validate_key,
    validate_prefix,
)


class MemoryKeyValue:
    """A dictionary with revisions; see the module docstring for its semantics."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, int]] = {}
        self._markers: dict[str, int] = {}
        self._latest: dict[int, str] = {}  # revision -> key, for each key's last write
        self._revision = 0
        self.writes = 0
        self.list_error: BusError | None = None

    def __repr__(self) -> str:
        return f"MemoryKeyValue(keys={len(self._data)}, revision={self._revision})"

    def _bump(self) -> int:
        self._revision += 1
        self.writes += 1
        return self._revision

    def _forget(self, key: str) -> None:
        """Drop ``key``'s value or marker, leaving no trace."""
        found = self._data.pop(key, None)
        if found is not None:
            self._latest.pop(found[1], None)
        marker = self._markers.pop(key, None)
        if marker is not None:
            self._latest.pop(marker, None)

    def _store(self, key: str, value: bytes | None) -> int:
        """``key``'s next revision: a value, or a delete marker for ``None``."""
        self._forget(key)
        revision = self._bump()
        self._latest[revision] = key
        if value is None:
            self._markers[key] = revision
        else:
            self._data[key] = (bytes(value), revision)
        return revision

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """The value and revision of ``key``, or ``None``."""
        validate_key(key)
        await asyncio.sleep(0)
        return self._data.get(key)

    async def create(self, key: str, value: bytes) -> int:
        """Write ``key`` if absent."""
        validate_key(key)
        await asyncio.sleep(0)
        if key in self._data:
            raise WriteConflictError(KEY_EXISTS, key)
        return self._store(key, value)

    async def update(self, key: str, value: bytes, last_revision: int) -> int:
        """Write ``key`` if its revision is still ``last_revision``."""
        validate_key(key)
        await asyncio.sleep(0)
        current = self._data.get(key)
        if current is None or current[1] != last_revision:
            raise WriteConflictError(REVISION_CONFLICT, key)
        return self._store(key, value)

    async def delete(self, key: str, last_revision: int | None = None) -> None:
        """Delete ``key``, conditionally on ``last_revision`` if given."""
        validate_key(key)
        await asyncio.sleep(0)
        current = self._data.get(key)
        if last_revision is not None and (current is None or current[1] != last_revision):
            raise WriteConflictError(REVISION_CONFLICT, key)
        if current is not None:
            self._store(key, None)

    async def keys(self, prefix: str = "", *, pause_s: float = 0.0) -> list[str]:
        """All present keys (under ``prefix``), or :attr:`list_error` raised if a test has
        set one (``pause_s``: one pause, as a paced listing would take)."""
        if prefix:
            validate_prefix(prefix)
        await asyncio.sleep(pause_s)
        if self.list_error is not None:
            raise self.list_error
        return [key for key in self._data if key.startswith(prefix)]

    async def purge_before(self, prefix: str, revision: int) -> None:
        """Drop keys under ``prefix`` last written before ``revision`` (no markers here)."""
        validate_prefix(prefix)
        await asyncio.sleep(0)
        written = {**{k: rev for k, (_, rev) in self._data.items()}, **self._markers}
        for key, last in written.items():
            if key.startswith(prefix) and last < revision:
                self._forget(key)

    async def next_write(self, prefix: str, after: int) -> tuple[str, bytes | None, int] | None:
        """The first key under ``prefix`` last written (or deleted) after ``after``."""
        validate_prefix(prefix)
        await asyncio.sleep(0)
        for revision in range(max(after, 0) + 1, self._revision + 1):
            key = self._latest.get(revision)
            if key is not None and key.startswith(prefix):
                found = self._data.get(key)
                return key, found[0] if found is not None else None, revision
        return None

    def overwrite(self, key: str, value: bytes) -> int:
        """Write unconditionally, as someone with raw access to the bucket could."""
        validate_key(key)
        return self._store(key, value)

    def remove(self, key: str) -> None:
        """Delete unconditionally and without a marker, as someone with raw access to the
        bucket's stream could."""
        self._forget(key)

    def raw(self, key: str) -> bytes:
        """The stored bytes of ``key`` (``KeyError`` if absent)."""
        return self._data[key][0]

    def snapshot(self) -> dict[str, bytes]:
        """A copy of every value, for a later :meth:`restore`."""
        return {key: value for key, (value, _) in self._data.items()}

    def restore(self, snapshot: dict[str, bytes]) -> None:
        """Replace the whole bucket with ``snapshot`` (a whole-state rollback)."""
        self._data, self._markers, self._latest = {}, {}, {}
        for key, value in snapshot.items():
            self._store(key, value)


class CountingKeyValue(MemoryKeyValue):
    """Counts operations, so a test can tell a short path (acting on what it wrote) from a
    read-back: :attr:`reads` the reads, :attr:`calls` every call by operation, conflicting
    writes included (each is a round trip on the bus all the same)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.calls: Counter[str] = Counter()

    async def get(self, key: str) -> tuple[bytes, int] | None:
        self.reads += 1
        self.calls["get"] += 1
        return await super().get(key)

    async def create(self, key: str, value: bytes) -> int:
        self.calls["create"] += 1
        return await super().create(key, value)

    async def update(self, key: str, value: bytes, last_revision: int) -> int:
        self.calls["update"] += 1
        return await super().update(key, value, last_revision)

    async def delete(self, key: str, last_revision: int | None = None) -> None:
        self.calls["delete"] += 1
        await super().delete(key, last_revision)

    async def keys(self, prefix: str = "", *, pause_s: float = 0.0) -> list[str]:
        self.calls["keys"] += 1
        return await super().keys(prefix, pause_s=pause_s)

    async def purge_before(self, prefix: str, revision: int) -> None:
        self.calls["purge_before"] += 1
        await super().purge_before(prefix, revision)

    async def next_write(self, prefix: str, after: int) -> tuple[str, bytes | None, int] | None:
        self.calls["next_write"] += 1
        return await super().next_write(prefix, after)

    @property
    def round_trips(self) -> int:
        """Every call so far: what each would cost on the bus."""
        return sum(self.calls.values())
