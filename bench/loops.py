"""The two ways a benchmark drives a set of nodes, and what one phase of it measured.

Closed loop: every node re-attests the moment its round ends, the most the mesh completes.
Open loop: rounds start on a fixed schedule whether or not earlier ones have finished, the
way independent clients arrive, so the latency includes any queueing the load causes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field

from bench import proc
from services.collector.service import CollectorNode, RoundResult
from services.roundwatch import _percentile


@dataclass
class Phase:
    """The rounds of one measurement phase."""

    seconds: float
    results: list[RoundResult] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def released(self) -> list[RoundResult]:
        return [r for r in self.results if r.released]

    @property
    def per_s(self) -> float:
        return len(self.released) / self.seconds if self.seconds > 0 else 0.0

    def latency(self) -> dict[str, float]:
        values = sorted(r.latency_ms for r in self.released)
        return {"p50": round(_percentile(values, 50), 2), "p99": round(_percentile(values, 99), 2)}

    def stages(self) -> dict[str, dict[str, float]]:
        """p50/p99 of each stage of the released rounds (:data:`collector.service.STAGES`)."""
        times: dict[str, list[float]] = {}
        for result in self.released:
            for name, ms in result.stages_ms:
                times.setdefault(name, []).append(ms)
        return {
            name: {
                "p50": round(_percentile(sorted(values), 50), 2),
                "p99": round(_percentile(sorted(values), 99), 2),
            }
            for name, values in times.items()
        }

    def failures(self) -> dict[str, int]:
        return dict(Counter(r.reason or r.status for r in self.results if not r.released))


async def closed_loop(collectors: list[CollectorNode], seconds: float) -> Phase:
    """Every node attests back to back until the deadline; rounds still running then are
    awaited (not counted in the rate's time, so a slow tail lowers the rate, never raises it)."""
    deadline = time.perf_counter() + seconds
    results: list[RoundResult] = []

    async def loop(node: CollectorNode) -> None:
        while time.perf_counter() < deadline:
            results.append(await node.attest_once())

    started = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in collectors))
    return Phase(seconds=time.perf_counter() - started, results=results)


async def open_loop(collectors: list[CollectorNode], per_s: float, seconds: float) -> Phase:
    """Start a round every ``1 / per_s`` seconds on a node that is idle; when every node is
    busy the round waits for one (counted in its latency, as a client would see it). The
    phase lasts until its last round ended, and at least ``seconds``."""
    idle: asyncio.Queue[CollectorNode] = asyncio.Queue()
    for node in collectors:
        idle.put_nowait(node)
    results: list[RoundResult] = []

    async def one(scheduled: float) -> None:
        node = await idle.get()
        try:
            result = await node.attest_once()
        finally:
            idle.put_nowait(node)
        waited_ms = (time.perf_counter() - scheduled) * 1000.0 - result.latency_ms
        results.append(
            RoundResult(
                result.node,
                result.status,
                result.allowed,
                result.released,
                result.latency_ms + max(0.0, waited_ms),
                result.reason,
                result.evidence_id,
                result.admitted_ms,
                result.stages_ms,
            )
        )

    count = max(1, int(per_s * seconds))
    started = time.perf_counter()
    tasks = []
    for k in range(count):
        at = started + k / per_s
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(at)))
    await asyncio.gather(*tasks)
    # The phase lasts at least its schedule: rounds that all finished early must not make
    # the achieved rate look higher than the rate offered.
    return Phase(seconds=max(seconds, time.perf_counter() - started), results=results)


async def measured(pids: dict[str, int], run: Awaitable[Phase]) -> Phase:
    """Run one phase and charge each service (and this driver) the CPU it used meanwhile."""
    before = proc.snapshot(pids)
    driver_before = time.process_time()
    phase = await run
    after = proc.snapshot(pids)
    phase.cpu_s = {name: after[name] - before.get(name, 0.0) for name in after}
    phase.cpu_s["driver"] = time.process_time() - driver_before
    return phase
