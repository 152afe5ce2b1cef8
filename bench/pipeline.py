"""The mesh end to end, every service its own process: peak throughput, then latency at half.

What runs is what ``attestmesh up`` runs (:mod:`services.embedded`): a local nats-server with
file storage admitting only the provisioned identities, the signed seeds, and the services
under the supervisor, with ``processes`` replicas of the SNP verifier (the family driven
here). Nodes are simulated SNP machines in this process, each on its own connection; their
keys and certificates are made before the clock starts, so a round costs the node only its
report signature. The peak is measured closed loop (every node re-attests the moment its
round ends); the latency figure comes from an open loop at half that peak (rounds started at
a fixed rate whether or not earlier ones have finished), the load a deployment should run at.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import ceiling, proc
from services.collector.service import DEFAULT_RESOURCE, CollectorNode, RoundResult
from services.embedded import (
    Mesh,
    as_identity,
    connect_nodes,
    prepare,
    provision_identities,
    seed_policy,
    seed_refvalues,
    seed_secret,
    wait_until_ready,
)
from services.mesh import authconf, identities
from services.mesh.bus import Bus
from services.mesh.config import Config
from services.mesh.server import NatsServer
from services.roundwatch import _percentile

FAMILY = "snp"
WARM_UP_ROUNDS = 2


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

    def failures(self) -> dict[str, int]:
        return dict(Counter(r.reason or r.status for r in self.results if not r.released))


def node_name(i: int) -> str:
    return f"bench-{i + 1}"


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
    busy the round waits for one (counted in its latency, as a client would see it)."""
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
    return Phase(seconds=time.perf_counter() - started, results=results)


async def _measured(pids: dict[str, int], run: Awaitable[Phase]) -> Phase:
    """Run one phase and charge each service (and this driver) the CPU it used meanwhile."""
    before = proc.snapshot(pids)
    driver_before = time.process_time()
    phase = await run
    after = proc.snapshot(pids)
    phase.cpu_s = {name: after[name] - before.get(name, 0.0) for name in after}
    phase.cpu_s["driver"] = time.process_time() - driver_before
    return phase


async def _drive(
    config: Config,
    seeds: dict[str, Path],
    mesh: Mesh,
    server: NatsServer,
    *,
    nodes: int,
    seconds: float,
) -> tuple[Phase, Phase]:
    async with contextlib.AsyncExitStack() as stack:
        admin = as_identity(config, seeds.get(identities.ADMIN))
        bus = await stack.enter_async_context(Bus.session(admin, identities.ADMIN, declare=False))
        await wait_until_ready(bus, mesh)
        collectors = await connect_nodes(
            stack, config, seeds, [(node_name(i), FAMILY) for i in range(nodes)]
        )
        for _ in range(WARM_UP_ROUNDS):
            await asyncio.gather(*(c.attest_once() for c in collectors))
        pids = proc.read_pids(mesh.pids_file) if mesh.pids_file else {}
        pids["nats-server"] = int(server.pid_file.read_text().strip())
        peak = await _measured(pids, closed_loop(collectors, seconds))
        half = await _measured(pids, open_loop(collectors, max(peak.per_s / 2, 1.0), seconds))
    return peak, half


def run(*, seconds: float, nodes: int, processes: int, ceiling_s: float = 2.0) -> dict[str, Any]:
    """The ``pipeline`` member of the bench report (see the README's performance section)."""
    p384 = ceiling.p384(ceiling_s)
    with tempfile.TemporaryDirectory(prefix="attestmesh-bench-") as tmp:
        data_dir = Path(tmp)
        seeds = provision_identities(data_dir, 0)
        directory = authconf.identities_dir(data_dir)
        for i in range(nodes):
            identity = identities.node_identity(node_name(i))
            seeds[identity] = authconf.ensure(directory, identity)
        authconf.write_server_config(authconf.server_config_path(data_dir), directory)
        server = NatsServer(
            authconf.server_store_dir(data_dir), config_file=authconf.server_config_path(data_dir)
        )
        server.start()
        mesh: Mesh | None = None
        try:
            config, config_path = prepare(data_dir, server.url)
            admin = as_identity(config, seeds.get(identities.ADMIN))
            broker = as_identity(config, seeds.get(identities.BROKER))
            asyncio.run(seed_secret(broker, DEFAULT_RESOURCE))
            asyncio.run(seed_policy(admin))
            asyncio.run(seed_refvalues(admin))
            mesh = Mesh(
                config,
                config_path,
                data_dir / "logs",
                seeds,
                replicas=processes,
                replicated=frozenset({f"verifier-{FAMILY}"}),
                pids_file=data_dir / "pids.json",
            )
            mesh.start()
            peak, half = asyncio.run(
                _drive(config, seeds, mesh, server, nodes=nodes, seconds=seconds)
            )
        finally:
            if mesh is not None:
                mesh.stop()
            server.stop()
    return report(peak, half, p384, nodes=nodes, processes=processes)


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
            "failed": half.failures(),
        },
        "cpu_ms_per_attestation": cpu,
    }
