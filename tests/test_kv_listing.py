"""KV listings on a real nats-server: exactly the live keys, never a short list, errors raise.

A listing that silently came back empty once made an audit report "chain OK, 0 records"
over a full bucket; these tests pin down that a listing is either complete or an error.
"""

from __future__ import annotations

import asyncio
import os

import msgspec
import pytest

from services.broker.audit import AuditLog, Outcome
from services.broker.sealing import AeadKey
from services.mesh import natskv, pace, subjects
from services.mesh.bus import Bus
from services.mesh.errors import BusError
from services.mesh.kv import LIST_FAILED
from services.mesh.natskv import NatsKeyValue
from services.mesh.server import NatsServer
from services.testing.memkv import MemoryKeyValue


async def _bucket(bus: Bus, name: str = subjects.BUCKET_BROKER) -> NatsKeyValue:
    return NatsKeyValue(await bus.key_value(name))


async def test_an_empty_bucket_lists_nothing(bus: Bus) -> None:
    assert await (await _bucket(bus)).keys() == []


async def test_lists_exactly_the_live_keys_despite_deletes_and_purges(bus: Bus) -> None:
    raw = await bus.key_value(subjects.BUCKET_REFVALUES)  # history 5: markers pile up
    kv = NatsKeyValue(raw)
    live = {f"k{i}" for i in range(300)}
    for key in sorted(live):
        await kv.create(key, b"v")
    for i in range(0, 300, 7):
        await raw.put(f"k{i}", b"rewritten")
    deleted = {f"k{i}" for i in range(0, 300, 5)}
    purged = {f"k{i}" for i in range(1, 300, 11)} - deleted
    for key in deleted:
        await kv.delete(key)
    for key in purged:
        await raw.purge(key)
    await kv.create("k5", b"back")  # deleted, then created again
    expected = (live - deleted - purged) | {"k5"}

    listed = await kv.keys()

    assert len(listed) == len(set(listed))
    assert set(listed) == expected
    assert len(expected) < 300 - 60  # the markers really were there to be filtered


async def test_a_listing_under_a_prefix_asks_the_server_for_those_keys_alone(bus: Bus) -> None:
    """The broker's audit listing used to check every key of its bucket, two per node, to
    keep the audit records among them: at 2,000 nodes that was 16 % of its CPU."""
    kv = await _bucket(bus)
    for i in range(5):
        await kv.create(f"audit.{i:012d}", b"r")
        await kv.create(f"decision.node-{i}", b"d")
    await kv.create("auditor", b"not under the prefix")
    await kv.delete("audit.000000000003")
    checked: list[str] = []
    live = kv._live

    async def counted(subject: str) -> bool:
        checked.append(subject)
        return await live(subject)

    kv._live = counted  # type: ignore[method-assign]
    listed = await kv.keys("audit.")
    assert sorted(listed) == [f"audit.{i:012d}" for i in (0, 1, 2, 4)]
    assert len(checked) == 5  # the other keys were never looked at
    assert len(await kv.keys()) == 10
    assert await kv.keys("nothing.") == []  # confirmed empty, though the bucket is not
    for bad in ("audit", ".", "a b.", "audit.>"):
        with pytest.raises(BusError):
            await kv.keys(bad)
    assert sorted(await MemoryKeyValue().keys("audit.")) == []


async def test_a_paced_listing_checks_one_key_at_a_time_with_pauses(bus: Bus) -> None:
    """The broker's first checkpoint lists its whole log on the loop that answers secret
    requests: sixteen checks at a time held rounds up by 60-110 ms."""
    kv = await _bucket(bus)
    for i in range(2 * pace.EVERY + 3):
        await kv.create(f"audit.{i:012d}", b"r")
    live = kv._live
    running = peak = 0

    async def counted(subject: str) -> bool:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            return await live(subject)
        finally:
            running -= 1

    kv._live = counted  # type: ignore[method-assign]
    started = asyncio.get_running_loop().time()
    paced = await kv.keys("audit.", pause_s=0.05)
    assert asyncio.get_running_loop().time() - started >= 2 * 0.05
    assert peak == 1
    assert sorted(paced) == sorted(await kv.keys("audit."))
    assert peak > 1  # unpaced, the checks overlap


async def test_a_filtered_listing_the_server_answers_empty_is_checked_not_trusted(
    bus: Bus,
) -> None:
    """The audit derives "no records" from an empty listing, so an empty answer for a prefix
    that does hold keys must raise, not list nothing."""
    kv = await _bucket(bus)
    for i in range(3):
        await kv.create(f"audit.{i:012d}", b"r")
    nc = kv._kv._js._nc
    real = nc.request

    class Reply:
        def __init__(self, data: bytes) -> None:
            self.data = data

    async def emptied(subject: str, payload: bytes = b"", **kwargs: object) -> object:
        reply = await real(subject, payload, **kwargs)  # type: ignore[arg-type]
        if ".STREAM.INFO." not in subject:
            return reply
        info = msgspec.json.decode(reply.data)
        info["state"]["subjects"] = {}
        info.pop("total", None)
        return Reply(msgspec.json.encode(info))

    nc.request = emptied  # type: ignore[method-assign,assignment]
    try:
        with pytest.raises(BusError) as failed:
            await kv.keys("audit.")
    finally:
        nc.request = real  # type: ignore[method-assign]
    assert failed.value.reason == LIST_FAILED


async def test_a_long_listing_holds_a_bounded_number_of_tasks(bus: Bus) -> None:
    """The broker lists its whole audit log at every checkpoint; a task per key made its
    resident set climb with the log (about 1.8 KB a key while a listing ran)."""
    kv = await _bucket(bus)
    for i in range(400):
        await kv.create(f"audit.{i:012d}", b"v")
    before = len(asyncio.all_tasks())
    listing = asyncio.ensure_future(kv.keys())
    most = 0
    while not listing.done():
        most = max(most, len(asyncio.all_tasks()))
        await asyncio.sleep(0)
    assert len(await listing) == 400
    assert most <= before + 1 + natskv._LIST_CONCURRENCY


async def test_a_bucket_of_only_deleted_keys_lists_nothing(bus: Bus) -> None:
    kv = await _bucket(bus)
    for i in range(20):
        await kv.create(f"gone{i}", b"v")
        await kv.delete(f"gone{i}")
    assert await kv.keys() == []


async def test_a_listing_under_concurrent_writes_is_never_short(
    bus: Bus, nats_server: NatsServer
) -> None:
    """The shape that made nats-py's ``keys()`` come back empty now and then: a few keys that
    never change, other keys put and deleted as fast as writers on other connections can."""
    kv = await _bucket(bus)
    stable = {f"stable{i}" for i in range(5)}
    for key in stable:
        await kv.create(key, b"v")
    writer_buses = [await Bus.connect(nats_server.url, f"writer{i}") for i in range(4)]
    buckets = [await b.key_value(subjects.BUCKET_BROKER) for b in writer_buses]
    stop = asyncio.Event()

    async def churn(n: int) -> int:
        writer = buckets[n % len(buckets)]
        done = 0
        while not stop.is_set():
            await writer.put(f"churn{n}x{done % 5}", os.urandom(8))
            await writer.delete(f"churn{n}x{(done + 2) % 5}")
            done += 1
        return done

    writers = [asyncio.create_task(churn(n)) for n in range(16)]
    try:
        for _ in range(150):
            listed = set(await kv.keys())
            assert stable <= listed
            assert all(key in stable or key.startswith("churn") for key in listed)
    finally:
        stop.set()
        writes = await asyncio.gather(*writers)
        for writer_bus in writer_buses:
            await writer_bus.close()
    assert sum(writes) > 150  # the bucket really was busy while it was listed


async def test_a_closed_connection_raises(nats_server: NatsServer) -> None:
    bus = await Bus.connect(nats_server.url, "closing")
    await bus.setup()
    kv = await _bucket(bus)
    await kv.create("k", b"v")
    await bus.close()
    with pytest.raises(BusError) as caught:
        await kv.keys()
    assert caught.value.reason == LIST_FAILED


async def test_a_missing_stream_raises(bus: Bus) -> None:
    kv = await _bucket(bus, subjects.BUCKET_REFVALUES)
    await kv.create("snp", b"{}")
    await bus.js.delete_stream(f"KV_{subjects.BUCKET_REFVALUES}")
    with pytest.raises(BusError) as caught:
        await kv.keys()
    assert caught.value.reason == LIST_FAILED


async def test_an_audit_whose_listing_fails_reports_an_error_not_an_empty_chain() -> None:
    kv = MemoryKeyValue()
    key = AeadKey.generate()
    log = AuditLog(kv, key)
    for i in range(3):
        await log.append(
            node=f"node-{i}",
            resource="default/db",
            decision_id=f"dec-{i}",
            verdict_digest="ab" * 32,
            outcome=Outcome.RELEASED,
        )
    assert await AuditLog(kv, key).verify_chain() == 3
    kv.list_error = BusError(LIST_FAILED, "injected")
    with pytest.raises(BusError) as caught:
        await AuditLog(kv, key).verify_chain()
    assert caught.value.reason == LIST_FAILED


async def test_a_stream_vanishing_mid_listing_is_not_read_as_deleted_keys(bus: Bus) -> None:
    """The per-subject read after the stream info: "stream not found" is an error, only
    "no message on this subject" means the key is gone."""
    kv = await _bucket(bus, subjects.BUCKET_REFVALUES)
    await kv.create("snp", b"{}")
    subject = f"$KV.{subjects.BUCKET_REFVALUES}.snp"
    assert await kv._live(subject)
    assert not await kv._live(f"$KV.{subjects.BUCKET_REFVALUES}.never-written")
    await bus.js.delete_stream(f"KV_{subjects.BUCKET_REFVALUES}")
    with pytest.raises(BusError) as caught:
        await kv._live(subject)
    assert caught.value.reason == LIST_FAILED
