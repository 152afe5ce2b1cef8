"""Conditional writes on a three-replica bucket while an earlier write to the same key is
still being replicated: the stream's leader refuses them for that alone, and the KV waits
for the earlier write to land and then decides against it, rather than report a conflict
that a read cannot show yet (the broker's compare-and-set loops then spun on it)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator

import pytest

from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.cluster import LocalCluster
from services.mesh.errors import Unavailable
from services.mesh.kv import WriteConflictError
from services.mesh.natskv import IN_FLIGHT_WAIT_S, NatsKeyValue
from services.mesh.server import NatsServer
from tests.test_cluster import connect_cluster

pytestmark = pytest.mark.slow
BUCKET = subjects.BUCKET_APPRAISALS


async def _leader(bus: Bus) -> str | None:
    info = await bus.js.stream_info(f"KV_{BUCKET}")
    return info.cluster.leader if info.cluster else None


@contextlib.contextmanager
def _frozen(servers: list[NatsServer]) -> Iterator[None]:
    """The servers stop (SIGSTOP) for the block: the leader's proposals get no quorum."""
    pids = [int(s.pid_file.read_text()) for s in servers]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


async def _on_the_leader(cluster: LocalCluster) -> tuple[Bus, NatsKeyValue, list[NatsServer]]:
    """A bus connected to the bucket's stream leader alone, the bucket, and the followers."""
    setup = await connect_cluster(cluster)
    try:
        leader = await _leader(setup)
    finally:
        await setup.close()
    by_name = {s.cluster.server_name: s for s in cluster.servers if s.cluster is not None}
    assert leader in by_name, (leader, list(by_name))
    bus = await Bus.connect(by_name[leader].url, "test", wait=30.0)
    followers = [s for name, s in by_name.items() if name != leader]
    # Freezing the followers holds writes only while this server still leads the stream.
    assert await _leader(bus) == leader, "the stream changed leader during the set-up"
    return bus, NatsKeyValue(await bus.key_value(BUCKET)), followers


async def test_a_write_behind_one_in_flight_waits_for_it_or_is_an_outage(
    cluster: LocalCluster,
) -> None:
    """Held back briefly, the earlier write lands and the one behind it is decided against
    it. With no quorum for longer than the wait, the write behind is an outage to wait out
    (``Unavailable``), never a conflict: a conflict would send its caller to read again."""
    bus, kv, followers = await _on_the_leader(cluster)
    try:
        first = await kv.create("k", b"0")
        with _frozen(followers):
            landing = asyncio.create_task(kv.update("k", b"A", first))
            await asyncio.sleep(0.2)  # proposed, not committed: no follower answers
            assert not landing.done()
            late = asyncio.create_task(kv.update("k", b"B", first))
            await asyncio.sleep(0.5)
            assert not late.done()  # waiting for the write ahead of it, not refused
        landed = await asyncio.wait_for(landing, 10.0)
        with pytest.raises(WriteConflictError):
            await asyncio.wait_for(late, 10.0)
        assert await kv.get("k") == (b"A", landed)  # the conflict a read now shows

        with _frozen(followers):
            landing = asyncio.create_task(kv.update("k", b"C", landed))
            await asyncio.sleep(0.2)
            with pytest.raises(Unavailable):
                await asyncio.wait_for(kv.update("k", b"D", landed), IN_FLIGHT_WAIT_S + 5)
        await asyncio.wait_for(landing, 10.0)
        assert (await kv.get("k") or (b"", 0))[0] == b"C"
    finally:
        await bus.close()
