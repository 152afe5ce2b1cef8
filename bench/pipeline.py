"""The mesh end to end, every service its own process: peak throughput, then latency at half.

The mesh is :mod:`bench.harness`'s: what ``attestmesh up`` runs, with ``processes`` replicas
of the SNP verifier (the family driven here). Nodes are simulated SNP machines in this
process, each on its own connection; their keys and certificates are made before the clock
starts, so a round costs the node only its report signature. The peak is measured closed loop
(every node re-attests the moment its round ends); the latency figure comes from an open loop
at half that peak (rounds started at a fixed rate whether or not earlier ones have finished),
the load a deployment should run at. With ``sweep`` fractions, an open loop runs at each of
them too (:mod:`bench.sweep`): latency against offered load.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench import ceiling, hops
from bench import sweep as _sweep
from bench.harness import FAMILY, Running, running_mesh
from bench.loops import Phase, closed_loop, measured, open_loop
from services.embedded import connect_nodes, wait_until_ready
from services.mesh import identities
from services.mesh.bus import Bus

WARM_UP_ROUNDS = 2


def node_name(i: int) -> str:
    return f"bench-{i + 1}"


@dataclass
class Measured:
    peak: Phase
    half: Phase
    steps: list[tuple[float, Phase]]
    """Each sweep step: (fraction of the peak, its phase)."""


async def _drive(
    running: Running, *, nodes: int, seconds: float, fractions: Sequence[float]
) -> Measured:
    async with contextlib.AsyncExitStack() as stack:
        bus = await stack.enter_async_context(
            Bus.session(running.admin, identities.ADMIN, declare=False)
        )
        await wait_until_ready(bus, running.mesh)
        collectors = await connect_nodes(
            stack, running.config, running.seeds, [(node_name(i), FAMILY) for i in range(nodes)]
        )
        for _ in range(WARM_UP_ROUNDS):
            await asyncio.gather(*(c.attest_once() for c in collectors))
        pids = running.pids()
        peak = await measured(pids, closed_loop(collectors, seconds))
        half = await measured(pids, open_loop(collectors, max(peak.per_s / 2, 1.0), seconds))
        steps = []
        for fraction in fractions:
            offered = max(peak.per_s * fraction, _sweep.MIN_RATE_PER_S)
            steps.append((fraction, await measured(pids, open_loop(collectors, offered, seconds))))
    return Measured(peak, half, steps)


def run(
    *,
    seconds: float,
    nodes: int,
    processes: int,
    sweep: Sequence[float] = (),
    ceiling_s: float = 2.0,
) -> dict[str, Any]:
    """The ``pipeline`` member of the bench report (see the README's performance section);
    with ``sweep`` fractions of the peak, its ``sweep`` member too."""
    p384 = ceiling.p384(ceiling_s)
    hop_ms = hops.round_trip_ms()
    names = [node_name(i) for i in range(nodes)]
    with running_mesh(names, processes=processes) as running:
        done = asyncio.run(_drive(running, nodes=nodes, seconds=seconds, fractions=sweep))
    out = report(done.peak, done.half, p384, nodes=nodes, processes=processes)
    out["hop_ms"] = hop_ms
    if done.steps:
        out["sweep"] = [_sweep.row(f, phase, seconds) for f, phase in done.steps]
    return out


def report(peak: Phase, half: Phase, p384: float, *, nodes: int, processes: int) -> dict[str, Any]:
    count = len(peak.released)
    cpu = {
        name: round(used * 1000.0 / count, 3) if count else 0.0
        for name, used in sorted(peak.cpu_s.items())
    }
    return {
        "attestations_per_s": round(peak.per_s, 1),
        "ceiling_per_s": round(p384, 1),
        "ratio": round(peak.per_s / p384, 4) if p384 else 0.0,
        "processes": processes,
        "nodes": nodes,
        "cores": os.cpu_count() or 1,
        "attestations": count,
        "seconds": round(peak.seconds, 3),
        "latency_ms": peak.latency(),
        "failed": peak.failures(),
        "half_load": {
            "per_s": round(half.per_s, 1),
            "attestations": len(half.released),
            "latency_ms": half.latency(),
            "stages_ms": half.stages(),
            "failed": half.failures(),
        },
        "cpu_ms_per_attestation": cpu,
    }
