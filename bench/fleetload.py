"""One load process of ``attestmesh bench --fleet``: a slice of the simulated fleet.

``python -m bench.fleetload SPEC`` connects every node of the slice (each on its own
connection as its own NATS identity, as a real fleet would reach the server), prints
``ready``, and waits for ``go T0`` on stdin, ``T0`` being a ``time.monotonic()`` instant
(the clock is system-wide on Linux, so every load process and the orchestrator share it).
Each node then re-attests on a fixed schedule, round ``k`` due at ``T0 + phase + k *
interval``: open loop, so a mesh that cannot keep up shows as rounds starting late, never as
a politely lower offered rate. A node runs one round at a time; a round due while the
previous one is still running starts when it ends (its lateness counts in its latency).
Rounds due before the window ends but not started by ``drain_s`` after it are recorded as
``bench.not_started``: the backlog the mesh left. Every round is appended to ``out`` (a line
of JSON) as it ends, and ``done`` printed at the end; the nodes stay connected until stdin
closes.

Why separate processes: thousands of nodes cost real CPU (each report is signed, each
secret unwrapped) that must not be charged to, or compete inside, the orchestrator that
samples the mesh; and several of them spread the fleet over the machine's cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import IO

import msgspec

from bench.harness import FAMILY
from services.collector.service import CollectorNode
from services.collector.simulator.node import simulated_source, test_pki
from services.embedded import connect_nodes
from services.mesh import authconf, identities, memtrace, telemetry
from services.mesh import config as config_mod

NOT_STARTED = "bench.not_started"
_ENCODER = msgspec.json.Encoder()


class LoadSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What one load process runs (written by :mod:`bench.fleet`)."""

    config: str
    nodes: list[str]
    chips: list[int]
    """Each node's simulated chip (its global index: no two nodes of a fleet share one)."""
    phases: list[float]
    """Each node's first round, seconds after ``T0``."""
    interval: float
    window_start: float
    window_end: float
    drain_s: float
    out: str


class Round(msgspec.Struct, frozen=True, array_like=True):
    """One scheduled round; times in seconds after ``T0``, ``started`` -1 if it never was."""

    due: float
    started: float
    ended: float
    released: bool
    reason: str
    admitted: float = -1.0
    """Seconds from the round's nonce to its end (-1: no nonce came)."""


async def _node_rounds(
    node: CollectorNode, phase: float, spec: LoadSpec, t0: float, out: IO[bytes]
) -> int:
    """Run one node's schedule, writing each round to ``out`` as it ends (so this process
    holds no growing list of its own); return how many rounds were written."""
    abandon_at = spec.window_end + spec.drain_s
    k = 0
    while (due := phase + k * spec.interval) < spec.window_end:
        k += 1
        now = time.monotonic() - t0
        if now >= abandon_at:
            out.write(_ENCODER.encode(Round(due, -1.0, -1.0, False, NOT_STARTED)) + b"\n")
            continue
        if due > now:
            await asyncio.sleep(due - now)
        started = time.monotonic() - t0
        result = await node.attest_once()
        reason = "" if result.released else (result.reason or result.status)
        ended = time.monotonic() - t0
        admitted = result.admitted_ms / 1000.0 if result.admitted_ms >= 0 else -1.0
        row = Round(due, started, ended, result.released, reason, admitted)
        out.write(_ENCODER.encode(row) + b"\n")
    return k


def read_rounds(path: Path) -> list[Round]:
    """The rounds a load process wrote (one JSON array per line)."""
    decoder = msgspec.json.Decoder(Round)
    return [decoder.decode(line) for line in path.read_bytes().splitlines() if line]


async def run(spec: LoadSpec) -> None:
    config = config_mod.load(spec.config)
    directory = authconf.identities_dir(Path(config.data_dir))
    seeds = {
        identities.node_identity(n): authconf.seed_file(directory, identities.node_identity(n))
        for n in spec.nodes
    }
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        collectors = await connect_nodes(stack, config, seeds, [(n, FAMILY) for n in spec.nodes])
        pki = test_pki(Path(config.data_dir) / "test-pki")
        for collector, chip in zip(collectors, spec.chips, strict=True):
            collector.source = simulated_source(FAMILY, pki, seed=chip)
        print("ready", flush=True)
        word, _, value = (await loop.run_in_executor(None, sys.stdin.readline)).partition(" ")
        if word != "go":
            return  # the orchestrator went away (end of input) before the start
        t0 = float(value)
        with Path(spec.out).open("wb") as out:
            counts = await asyncio.gather(
                *(
                    _node_rounds(c, p, spec, t0, out)
                    for c, p in zip(collectors, spec.phases, strict=True)
                )
            )
        print(f"done {sum(counts)}", flush=True)
        # Stay connected until the orchestrator has taken its last sample: this process's
        # memory at the window's end is that of a fleet still connected.
        await loop.run_in_executor(None, sys.stdin.readline)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.fleetload SPEC", file=sys.stderr)
        return 2
    spec = msgspec.json.decode(Path(argv[0]).read_bytes(), type=LoadSpec)
    memtrace.install_from_env("load")
    telemetry.configure("bench-load", level="error", stream=open(os.devnull, "w"))  # noqa: SIM115
    asyncio.run(run(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
