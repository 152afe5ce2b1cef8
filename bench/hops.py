"""The latency floor of one hop: a request and its reply through a local nats-server, with
both ends busy and after each end sat idle.

Why measure it: at half load a round's latency is mostly hops, not work. A round crosses
nats-server about fifteen times in sequence (nonce, evidence, verdict, nonce spent,
decision, secret request, the broker's reads and writes, the answer), and on a mostly idle
machine each crossing wakes a sleeping process. What a wake-up costs is the machine's, not
the mesh's: it is measured here, in the same run, so the latency figures can be read
against it.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import nats
from nats.aio.msg import Msg

from services.mesh.server import NatsServer

BUSY_ROUNDS = 200
IDLE_ROUNDS = 60
IDLE_S = 0.01
SUBJECT = "bench.hop"


async def _measure(url: str) -> dict[str, float]:
    asking = await nats.connect(url)
    answering = await nats.connect(url)
    try:

        async def echo(msg: Msg) -> None:
            await answering.publish(msg.reply, msg.data)

        await answering.subscribe(SUBJECT, cb=echo)
        await answering.flush()

        async def once() -> float:
            started = time.perf_counter()
            await asyncio.wait_for(asking.request(SUBJECT, b"x", timeout=1.0), 2.0)
            return (time.perf_counter() - started) * 1000.0

        busy = [await once() for _ in range(BUSY_ROUNDS)]
        idle = []
        for _ in range(IDLE_ROUNDS):
            await asyncio.sleep(IDLE_S)
            idle.append(await once())
    finally:
        await asking.close()
        await answering.close()
    return {
        "busy": round(statistics.median(busy), 3),
        "after_idle": round(statistics.median(idle), 3),
    }


def round_trip_ms() -> dict[str, float]:
    """Median round trip (ms) back to back, and after 10 ms of idling before each."""
    with tempfile.TemporaryDirectory(prefix="attestmesh-hops-") as tmp:
        server = NatsServer(Path(tmp) / "nats")
        server.start()
        try:
            return asyncio.run(_measure(server.url))
        finally:
            server.stop()
