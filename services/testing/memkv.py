"""An in-memory :class:`~services.mesh.kv.KeyValue` for network-free tests.

It follows JetStream KV semantics where the broker depends on them: one revision counter
for the whole bucket, create-if-absent, compare-and-set update and delete. Every call
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
        self._revision = 0
        self.writes = 0
        self.list_error: BusError | None = None

    def __repr__(self) -> str:
        return f"MemoryKeyValue(keys={len(self._data)}, revision={self._revision})"

    def _bump(self) -> int:
        self._revision += 1
        self.writes += 1
        return self._revision

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
        revision = self._bump()
        self._data[key] = (bytes(value), revision)
        return revision

    async def update(self, key: str, value: bytes, last_revision: int) -> int:
        """Write ``key`` if its revision is still ``last_revision``."""
        validate_key(key)
        await asyncio.sleep(0)
        current = self._data.get(key)
        if current is None or current[1] != last_revision:
            raise WriteConflictError(REVISION_CONFLICT, key)
        revision = self._bump()
        self._data[key] = (bytes(value), revision)
        return revision

    async def delete(self, key: str, last_revision: int | None = None) -> None:
        """Delete ``key``, conditionally on ``last_revision`` if given."""
        validate_key(key)
        await asyncio.sleep(0)
        current = self._data.get(key)
        if last_revision is not None and (current is None or current[1] != last_revision):
            raise WriteConflictError(REVISION_CONFLICT, key)
        if current is not None:
            self._bump()
            del self._data[key]

    async def keys(self) -> list[str]:
        """All present keys, or :attr:`list_error` raised if a test has set one."""
        await asyncio.sleep(0)
        if self.list_error is not None:
            raise self.list_error
        return list(self._data)

    async def purge_before(self, prefix: str, revision: int) -> None:
        """Drop keys under ``prefix`` last written before ``revision`` (no markers here)."""
        validate_prefix(prefix)
        await asyncio.sleep(0)
        for key in [k for k, (_, rev) in self._data.items() if k.startswith(prefix)]:
            if self._data[key][1] < revision:
                del self._data[key]

    def overwrite(self, key: str, value: bytes) -> int:
        """Write unconditionally, as someone with raw access to the bucket could."""
        validate_key(key)
        revision = self._bump()
        self._data[key] = (bytes(value), revision)
        return revision

    def remove(self, key: str) -> None:
        """Delete unconditionally, as someone with raw access to the bucket could."""
        self._data.pop(key, None)

    def raw(self, key: str) -> bytes:
        """The stored bytes of ``key`` (``KeyError`` if absent)."""
        return self._data[key][0]

    def snapshot(self) -> dict[str, bytes]:
        """A copy of every value, for a later :meth:`restore`."""
        return {key: value for key, (value, _) in self._data.items()}

    def restore(self, snapshot: dict[str, bytes]) -> None:
        """Replace the whole bucket with ``snapshot`` (a whole-state rollback)."""
        self._data = {key: (value, self._bump()) for key, value in snapshot.items()}


class CountingKeyValue(MemoryKeyValue):
    """Counts reads, so a test can tell a short path (acting on what it wrote) from a
    read-back."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def get(self, key: str) -> tuple[bytes, int] | None:
        self.reads += 1
        return await super().get(key)
