"""``attestmesh bench --fleet``: a large simulated fleet re-attesting for minutes.

The mesh is :mod:`bench.harness`'s (every service its own process). The fleet lives in a few
load processes (:mod:`bench.fleetload`), every node on its own connection as its own NATS
identity, node ``i`` of ``N`` first due ``i / N`` of an interval after the start, so the
offered load is an even ``N / interval`` rounds per second. The first interval is warm-up;
then, for ``duration`` seconds, this process samples every ``sample_s``: each process's
resident memory (:mod:`bench.memory`) and the services' JetStream consumers' pending
messages; CPU time and the streams' bytes on disk at the window's start and end. The report
(:mod:`bench.fleetreport`) says plainly whether the mesh kept up, and which processes' memory
kept growing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats.errors

from bench import ceiling, fleetreport, leaks, memory, proc
from bench.fleetload import LoadSpec, Round, read_rounds
from bench.fleetreport import Sample, Window
from bench.harness import FAMILY, NATS_SERVER, Running, running_mesh
from services.embedded import wait_until_ready
from services.mesh import authconf, identities, memtrace, subjects
from services.mesh.bus import Bus

DEFAULT_INTERVAL_S = 10.0
DEFAULT_DURATION_S = 180.0
WARM_UP_INTERVALS = 1
START_DELAY_S = 1.0
DRIVER = "driver"
CONSUMERS = {
    f"verifier-{FAMILY}": (subjects.STREAM_EVIDENCE, f"verifier-{FAMILY}"),
    "policy": (subjects.STREAM_VERDICTS, "policy"),
    "broker": (subjects.STREAM_DECISIONS, "broker"),
}
STREAMS = (
    subjects.STREAM_EVIDENCE,
    subjects.STREAM_VERDICTS,
    subjects.STREAM_DECISIONS,
    f"KV_{subjects.BUCKET_NONCES}",
)
ROUND_BOUND_S = 70.0
"""Longest one round can take (a 30 s decision wait, then up to 30 s of secret retries)."""


@dataclass(frozen=True)
class Settings:
    nodes: int
    interval: float
    duration: float
    load_processes: int
    processes: int
    sample_s: float
    tracemalloc: bool = False
    """Trace allocations in every Python process and report what grew (slows them all)."""

    @property
    def drain_s(self) -> float:
        """How long after the window rounds due in it may still start (the backlog's grace)."""
        return min(max(self.interval, 10.0), 60.0)


@dataclass
class Load:
    name: str
    process: asyncio.subprocess.Process
    out: Path
    log: Path


@dataclass
class Measured:
    rounds: list[Round]
    window: Window
    samples: list[Sample]
    series: dict[str, memory.Series]
    cpu_s: dict[str, float]
    streams: dict[str, dict[str, int]]
    exited: list[str] = field(default_factory=list)
    traced: dict[str, list[memtrace.Growth]] = field(default_factory=dict)


def fleet_node(i: int) -> str:
    return f"fleet-{i + 1}"


def run(settings: Settings, *, ceiling_s: float = 2.0) -> dict[str, Any]:
    """The ``fleet`` member of the bench report (see the README's performance section)."""
    p384 = ceiling.p384(ceiling_s)
    names = [fleet_node(i) for i in range(settings.nodes)]
    with contextlib.ExitStack() as stack:
        traces = None
        if settings.tracemalloc:
            traces = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="attestmesh-")))
            stack.enter_context(leaks.tracing(traces))
        running = stack.enter_context(running_mesh(names, processes=settings.processes))
        measured = asyncio.run(_drive(running, settings, traces))
    return report(measured, settings, p384)


def report(measured: Measured, settings: Settings, p384: float) -> dict[str, Any]:
    figures = fleetreport.throughput(measured.rounds, measured.window, settings.interval)
    mem = fleetreport.memory(measured.series, settings.duration)
    window = measured.window
    attestations = sum(
        1 for r in measured.rounds if r.released and window.start <= r.ended <= window.end
    )
    return {
        "nodes": settings.nodes,
        "interval_s": settings.interval,
        "duration_s": settings.duration,
        "warm_up_s": measured.window.start,
        "load_processes": settings.load_processes,
        "processes": settings.processes,
        "cores": os.cpu_count() or 1,
        "ceiling_per_s": round(p384, 1),
        **figures,
        "timeline": fleetreport.timeline(
            measured.rounds, measured.window, measured.samples, settings.sample_s
        ),
        "cpu": fleetreport.cpu(measured.cpu_s, settings.duration, attestations),
        "memory": mem,
        "memory_sample_t_s": [
            round(s.t, 2) for s in measured.samples if 0 <= s.t <= settings.duration + 0.5
        ],
        "growing": sorted(name for name, m in mem.items() if m["growing"]),
        "streams": measured.streams,
        "exited": measured.exited,
        **({"tracemalloc": measured.traced} if settings.tracemalloc else {}),
    }


async def _drive(running: Running, settings: Settings, traces: Path | None) -> Measured:
    async with contextlib.AsyncExitStack() as stack:
        bus = await stack.enter_async_context(
            Bus.session(running.admin, identities.ADMIN, declare=False)
        )
        await wait_until_ready(bus, running.mesh)
        loads = await _spawn(running, settings)
        try:
            return await _measure(bus, running, settings, loads, traces)
        finally:
            await _stop(loads)


async def _spawn(running: Running, settings: Settings) -> list[Load]:
    """Node ``i`` goes to load process ``i mod P``, so each process's nodes are spread over
    the whole interval rather than bunched in one part of it."""
    work = running.data_dir / "fleet"
    work.mkdir()
    window = Window(WARM_UP_INTERVALS * settings.interval, settings.duration)
    loads = []
    for p in range(settings.load_processes):
        mine = range(p, settings.nodes, settings.load_processes)
        name = f"load-{p + 1}"
        spec = LoadSpec(
            config=str(running.config_path),
            nodes=[fleet_node(i) for i in mine],
            chips=list(mine),
            phases=[i * settings.interval / settings.nodes for i in mine],
            interval=settings.interval,
            window_start=window.start,
            window_end=window.end,
            drain_s=settings.drain_s,
            out=str(work / f"{name}.rounds.json"),
        )
        spec_file = work / f"{name}.json"
        spec_file.write_bytes(msgspec.json.encode(spec))
        log = work / f"{name}.log"
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.fleetload",
                str(spec_file),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        loads.append(Load(name, process, Path(spec.out), log))
    return loads


async def _each_says(loads: list[Load], word: bytes, what: str, timeout: float) -> None:
    """Wait for every load process's next line to start with ``word``; a process that says
    anything else, or nothing within ``timeout``, is an error with the tail of its log."""

    async def one(load: Load) -> None:
        assert load.process.stdout is not None
        line = await load.process.stdout.readline()
        if not line.startswith(word):
            tail = load.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{load.name} failed ({load.process.returncode}): {tail}")

    try:
        await asyncio.wait_for(asyncio.gather(*(one(x) for x in loads)), timeout)
    except TimeoutError:
        raise RuntimeError(f"the load processes did not {what} in {timeout:.0f} s") from None


async def _ready(loads: list[Load], timeout: float) -> None:
    await _each_says(loads, b"ready", "connect", timeout)


def _sample_times(window: Window, every: float) -> list[float]:
    """Seconds after the window's start: through the warm-up, then exactly at the window's
    start and end and every ``every`` between."""
    before = [-k * every for k in range(math.ceil(window.start / every), 0, -1)]
    inside = [k * every for k in range(math.ceil(window.duration / every))]
    return [t for t in before if t > -window.start] + inside + [window.duration]


async def _measure(
    bus: Bus, running: Running, settings: Settings, loads: list[Load], traces: Path | None
) -> Measured:
    await _ready(loads, timeout=60.0 + 0.05 * settings.nodes)
    extra = {load.name: load.process.pid for load in loads} | {DRIVER: os.getpid()}
    pids = running.pids() | extra
    series = {name: memory.Series() for name in pids}
    for name, pid in pids.items():
        reading = memory.read(pid)
        series[name].before_kb = reading.rss_kb if reading else None
    t0 = time.monotonic() + START_DELAY_S
    for load in loads:
        assert load.process.stdin is not None
        load.process.stdin.write(f"go {t0!r}\n".encode())
        await load.process.stdin.drain()
    window = Window(WARM_UP_INTERVALS * settings.interval, settings.duration)
    samples: list[Sample] = []
    cpu_start: dict[str, float] = {}
    cpu_end: dict[str, float] = {}
    streams: dict[str, dict[str, int]] = {}
    for t in _sample_times(window, settings.sample_s):
        delay = t0 + window.start + t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        pids = running.pids() | extra
        for name, pid in pids.items():
            series.setdefault(name, memory.Series()).add(t, memory.read(pid))
        if t == 0:
            cpu_start = {name: proc.cpu_seconds(pid) for name, pid in pids.items()}
            streams = {name: {"start_bytes": n} for name, n in _stream_bytes(running).items()}
        if t == window.duration:
            cpu_end = {name: proc.cpu_seconds(pid) for name, pid in pids.items()}
            for name, n in _stream_bytes(running).items():
                streams.setdefault(name, {})["end_bytes"] = n
        samples.append(Sample(t, await _pending(bus, min(2.0, settings.sample_s / 2))))
        if traces is not None and t in (0, window.duration):
            await leaks.snapshot(_traced(pids), traces)
    exited = sorted(name for name, pid in running.pids().items() if not proc.alive(pid))
    rounds = await _collect(loads, timeout=settings.drain_s + ROUND_BOUND_S + 30.0)
    cpu_s = {name: cpu_end[name] - cpu_start.get(name, 0.0) for name in cpu_end}
    traced = leaks.growth(_traced(pids), traces) if traces is not None else {}
    return Measured(rounds, window, samples, series, cpu_s, streams, exited, traced)


def _traced(pids: dict[str, int]) -> dict[str, int]:
    """The Python processes that trace (the services and the load), not nats-server or
    this one."""
    return {name: pid for name, pid in pids.items() if name not in (NATS_SERVER, DRIVER)}


async def _pending(bus: Bus, timeout: float) -> dict[str, int | None]:
    """Each service consumer's messages not yet delivered or not yet acknowledged (``None``
    when JetStream did not answer within ``timeout``: itself a sign of a struggling mesh)."""

    async def one(stream: str, durable: str) -> int | None:
        try:
            info = await asyncio.wait_for(bus.js.consumer_info(stream, durable), timeout)
        except (nats.errors.Error, TimeoutError):
            return None
        return int(info.num_pending) + int(info.num_ack_pending)

    names = list(CONSUMERS)
    counts = await asyncio.gather(*(one(*CONSUMERS[name]) for name in names))
    return dict(zip(names, counts, strict=True))


def _stream_bytes(running: Running) -> dict[str, int]:
    """Bytes each stream holds on disk (its message blocks): what JetStream keeps for the
    streams' retention, read from the store since the operator identity may not ask."""
    store = authconf.server_store_dir(running.data_dir) / "jetstream"
    out: dict[str, int] = {}
    for name in STREAMS:
        out[name] = sum(
            f.stat().st_size for f in store.glob(f"*/streams/{name}/msgs/*") if f.is_file()
        )
    return out


async def _collect(loads: list[Load], timeout: float) -> list[Round]:
    """Every load process's rounds once it has finished them (each stops scheduling at the
    window's end and gives up on the backlog after the drain); one that does not say
    ``done`` within ``timeout`` is an error. Each is then told to close its connections."""
    await _each_says(loads, b"done", "finish", timeout)
    rounds: list[Round] = []
    for load in loads:
        rounds += read_rounds(load.out)
        assert load.process.stdin is not None
        load.process.stdin.close()
    return rounds


async def _stop(loads: list[Load]) -> None:
    """End the load processes this run started: told to (stdin closed), they exit at once
    unless still in their rounds (an error path), which SIGTERM and then SIGKILL end."""
    for load in loads:
        if load.process.stdin is not None and not load.process.stdin.is_closing():
            load.process.stdin.close()
    processes = [x.process for x in loads]
    if await _exited(processes, 5.0):
        return
    for process in processes:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
    if await _exited(processes, 5.0):
        return
    for process in processes:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    await _exited(processes, None)


async def _exited(processes: list[asyncio.subprocess.Process], timeout: float | None) -> bool:
    waiting = [asyncio.ensure_future(p.wait()) for p in processes if p.returncode is None]
    if not waiting:
        return True
    _, pending = await asyncio.wait(waiting, timeout=timeout)
    for task in pending:
        task.cancel()
    return not pending
