"""KV reads on a real nats-server: the latest value and its revision, absence only when the
key is really gone, and an error (never "absent") when the bucket itself is.

``NatsKeyValue.get`` decodes the stream's stored-message reply itself (see its module); these
tests hold it to what nats-py's own ``get`` returns on the same bucket, and ``next_write``
(reading on through a prefix's writes, as the audit checkpoint does) to the in-memory double.
"""

from __future__ import annotations

import asyncio

import pytest

from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.errors import BusError, Unavailable
from services.mesh.kv import KeyValue
from services.mesh.natskv import NatsKeyValue
from services.mesh.server import NatsServer
from services.testing.memkv import MemoryKeyValue


async def _bucket(bus: Bus, name: str = subjects.BUCKET_REFVALUES) -> NatsKeyValue:
    return NatsKeyValue(await bus.key_value(name))


async def test_the_latest_value_and_its_revision_as_nats_py_reads_them(bus: Bus) -> None:
    raw = await bus.key_value(subjects.BUCKET_REFVALUES)
    kv = NatsKeyValue(raw)
    first = await kv.create("k", b"one")
    await kv.create("other", b"x")
    second = await kv.update("k", bytes(range(256)) * 4, first)
    assert second > first
    assert await kv.get("k") == (bytes(range(256)) * 4, second)
    entry = await raw.get("k")
    assert (entry.value, entry.revision) == await kv.get("k")
    assert await kv.get("other") == (b"x", second - 1)


async def test_deleted_purged_and_never_written_keys_read_as_absent(bus: Bus) -> None:
    raw = await bus.key_value(subjects.BUCKET_REFVALUES)
    kv = NatsKeyValue(raw)
    await kv.create("deleted", b"v")
    await kv.create("purged", b"v")
    await kv.delete("deleted")
    await raw.purge("purged")
    assert await kv.get("deleted") is None
    assert await kv.get("purged") is None
    assert await kv.get("never") is None
    revision = await kv.create("deleted", b"back")  # created again after the delete
    assert await kv.get("deleted") == (b"back", revision)


async def test_an_empty_value_reads_as_absent_as_before(bus: Bus) -> None:
    raw = await bus.key_value(subjects.BUCKET_REFVALUES)
    await raw.put("empty", b"")
    assert await (await _bucket(bus)).get("empty") is None


async def test_a_key_past_the_buckets_ttl_reads_as_absent(nats_server: NatsServer) -> None:
    bus = await Bus.connect(nats_server.url, "ttl")
    try:
        kv = NatsKeyValue(await bus.js.create_key_value(bucket="short-lived", ttl=1.0))
        await kv.create("n1", b"v")
        assert await kv.get("n1") is not None
        for _ in range(100):
            if await kv.get("n1") is None:
                break
            await asyncio.sleep(0.1)
        assert await kv.get("n1") is None
    finally:
        await bus.close()


async def test_a_vanished_bucket_is_an_error_not_an_absent_key(bus: Bus) -> None:
    kv = await _bucket(bus)
    await kv.create("snp", b"{}")
    await bus.js.delete_stream(f"KV_{subjects.BUCKET_REFVALUES}")
    with pytest.raises(BusError) as caught:
        await kv.get("snp")
    assert caught.value.reason == "kv.api_error"
    assert not isinstance(caught.value, Unavailable)  # a refusal: no failover to wait out


async def test_a_closed_connection_is_an_error(bus: Bus) -> None:
    kv = await _bucket(bus)
    await kv.create("k", b"v")
    await bus.nc.close()
    with pytest.raises(BusError) as caught:
        await kv.get("k")
    assert caught.value.reason == "kv.unavailable"
    assert isinstance(caught.value, Unavailable)


async def _read_on(kv: KeyValue, prefix: str, after: int) -> list[tuple[str, bytes | None]]:
    seen: list[tuple[str, bytes | None]] = []
    while (step := await kv.next_write(prefix, after)) is not None:
        key, value, revision = step
        assert revision > after
        seen.append((key, value))
        after = revision
    return seen


async def test_next_write_reads_on_through_values_and_markers_as_the_double_does(
    bus: Bus,
) -> None:
    nats_kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))  # history 1
    for kv in (MemoryKeyValue(), nats_kv):
        first = await kv.create("log.1", b"one")
        await kv.create("other.1", b"x")
        await kv.create("logx", b"y")  # shares the prefix's letters, not its dot
        second = await kv.create("log.2", b"two")
        await kv.create("log.3", b"three")
        await kv.delete("log.1")  # a marker, newer than log.2 and log.3
        await kv.update("log.2", b"TWO", second)  # only the latest write is still held
        assert await _read_on(kv, "log.", 0) == [
            ("log.3", b"three"),
            ("log.1", None),
            ("log.2", b"TWO"),
        ]
        assert await _read_on(kv, "log.", first) == await _read_on(kv, "log.", 0)
        latest = await kv.get("log.2")
        assert latest is not None
        assert await kv.next_write("log.", latest[1]) is None
        with pytest.raises(BusError, match="invalid_key"):
            await kv.next_write("log", 0)


async def test_next_write_reads_a_purge_marker_as_no_value(bus: Bus) -> None:
    raw = await bus.key_value(subjects.BUCKET_BROKER)
    kv = NatsKeyValue(raw)
    await kv.create("log.1", b"one")
    await raw.purge("log.1")
    assert await _read_on(kv, "log.", 0) == [("log.1", None)]
