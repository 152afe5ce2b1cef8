"""End-to-end mesh throughput: N simulated nodes attesting R rounds through the real services
on a real nats-server, everything in one process (so one core does all the work)."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from services.collector.service import RoundResult
from services.mesh.bus import Bus
from services.mesh.server import NatsServer
from services.roundwatch import Summary
from services.testing.mesh import TestMesh


async def _run(workdir: Path, nodes: int, rounds: int) -> tuple[list[RoundResult], float]:
    server = NatsServer(workdir / "nats")
    server.start()
    mesh = TestMesh(server, workdir)
    try:
        await mesh.start()
        bus = await Bus.connect(server.url, "bench")
        try:
            collectors = [mesh.node(bus, f"node-{i}") for i in range(nodes)]
            await asyncio.gather(*(c.attest_once() for c in collectors))  # warm-up
            results: asyncio.Queue[RoundResult] = asyncio.Queue()
            stop = asyncio.Event()
            started = time.perf_counter()
            await asyncio.gather(
                *(c.run(stop, interval=0.0, rounds=rounds, results=results) for c in collectors)
            )
            elapsed = time.perf_counter() - started
        finally:
            await bus.close()
        return [results.get_nowait() for _ in range(results.qsize())], elapsed
    finally:
        await mesh.stop()
        server.stop()


def run(*, nodes: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="attestmesh-bench-") as tmp:
        results, elapsed = asyncio.run(_run(Path(tmp), nodes, rounds))
    summary = Summary(nodes=nodes, results=results).to_json()
    per_s = len(results) / elapsed if elapsed else 0.0
    summary.update(seconds=round(elapsed, 3), per_s=round(per_s, 1))
    return summary
