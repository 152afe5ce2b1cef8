"""KV conditional writes on a real nats-server: create-if-absent and compare-and-set hold
under races, a deleted or purged key can be created again, and every other refusal is an
error (``NatsKeyValue`` publishes the writes and decodes the acknowledgement itself)."""

from __future__ import annotations

import asyncio

import pytest
from nats.js import api

from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.errors import BusError, Unavailable
from services.mesh.kv import KEY_EXISTS, REVISION_CONFLICT, WriteConflictError
from services.mesh.natskv import NatsKeyValue


async def _bucket(bus: Bus) -> NatsKeyValue:
    return NatsKeyValue(await bus.key_value(subjects.BUCKET_APPRAISALS))


async def test_create_then_compare_and_set(bus: Bus) -> None:
    kv = await _bucket(bus)
    first = await kv.create("n1", b"one")
    assert await kv.get("n1") == (b"one", first)
    with pytest.raises(WriteConflictError) as exists:
        await kv.create("n1", b"again")
    assert exists.value.reason == KEY_EXISTS
    second = await kv.update("n1", bytes(range(256)), first)
    assert second > first and await kv.get("n1") == (bytes(range(256)), second)
    with pytest.raises(WriteConflictError) as stale:
        await kv.update("n1", b"stale", first)
    assert stale.value.reason == REVISION_CONFLICT
    with pytest.raises(WriteConflictError):
        await kv.update("never", b"x", second)
    assert await kv.get("n1") == (bytes(range(256)), second)


async def test_racing_writers_land_once(bus: Bus) -> None:
    kv = await _bucket(bus)
    created = await asyncio.gather(
        *(kv.create("n1", f"{i}".encode()) for i in range(8)), return_exceptions=True
    )
    winners = [r for r in created if isinstance(r, int)]
    assert len(winners) == 1
    assert all(isinstance(r, WriteConflictError) for r in created if not isinstance(r, int))
    updated = await asyncio.gather(
        *(kv.update("n1", f"u{i}".encode(), winners[0]) for i in range(8)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, int) for r in updated) == 1


async def test_a_deleted_or_purged_key_can_be_created_again(bus: Bus) -> None:
    raw = await bus.key_value(subjects.BUCKET_APPRAISALS)
    kv = NatsKeyValue(raw)
    await kv.create("deleted", b"v")
    await kv.create("purged", b"v")
    await kv.delete("deleted")
    await raw.purge("purged")
    for key in ("deleted", "purged"):
        revision = await kv.create(key, b"back")
        assert await kv.get(key) == (b"back", revision)


async def test_a_refused_write_is_an_error(bus: Bus) -> None:
    raw = await bus.js.create_key_value(
        api.KeyValueConfig(bucket="tiny", max_value_size=128, storage=api.StorageType.MEMORY)
    )
    kv = NatsKeyValue(raw)
    revision = await kv.create("k", b"small")
    for write in (kv.create("other", b"x" * 256), kv.update("k", b"x" * 256, revision)):
        with pytest.raises(BusError) as refused:
            await write
        assert refused.value.reason == "kv.api_error"
        assert not isinstance(refused.value, (WriteConflictError, Unavailable))


async def test_a_vanished_bucket_fails_writes(bus: Bus) -> None:
    kv = await _bucket(bus)
    revision = await kv.create("n1", b"v")
    await bus.js.delete_stream(f"KV_{subjects.BUCKET_APPRAISALS}")
    for write in (kv.create("n2", b"v"), kv.update("n1", b"w", revision)):
        with pytest.raises(BusError) as failed:
            await write
        assert failed.value.reason == "kv.unavailable"
    with pytest.raises(BusError) as failed:
        await kv.delete("n1")
    assert failed.value.reason == "kv.unavailable"
