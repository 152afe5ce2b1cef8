"""``--tracemalloc``: which lines' allocations grew in each Python process of a fleet run.

Every service and load process started while :func:`tracing` is active traces its
allocations (:mod:`services.mesh.memtrace`); :func:`snapshot` asks each for a snapshot (at the
measured window's start and end) and :func:`growth` compares each process's first and last.
A run with tracing is for finding a leak, not for figures: tracing slows every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from services.mesh import memtrace

SNAPSHOT_TIMEOUT_S = 60.0


@contextlib.contextmanager
def tracing(directory: Path) -> Iterator[None]:
    """Processes started inside this block (they inherit the environment) trace, and write
    their snapshots to ``directory``."""
    before = os.environ.get(memtrace.ENV_DIR)
    os.environ[memtrace.ENV_DIR] = str(directory)
    try:
        yield
    finally:
        if before is None:
            del os.environ[memtrace.ENV_DIR]
        else:
            os.environ[memtrace.ENV_DIR] = before


def _snapshots(directory: Path, pid: int) -> list[Path]:
    found = directory.glob(f"*-{pid}-*.snap")
    return sorted(found, key=lambda p: int(p.stem.rsplit("-", 1)[1]))


async def snapshot(pids: dict[str, int], directory: Path) -> None:
    """Ask every process in ``pids`` for one more snapshot and wait until each has written
    it (taking one can take seconds on a large heap); a process that does not answer in
    time is left out of :func:`growth`, never waited on for ever."""
    wanted = {}
    for name, pid in pids.items():
        wanted[name] = len(_snapshots(directory, pid)) + 1
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + SNAPSHOT_TIMEOUT_S
    while time.monotonic() < deadline:
        if all(len(_snapshots(directory, pids[n])) >= k for n, k in wanted.items()):
            return
        await asyncio.sleep(0.2)


def growth(
    pids: dict[str, int], directory: Path, top: int = 10
) -> dict[str, list[memtrace.Growth]]:
    """Per process: the call sites that grew most between its first and last snapshot."""
    out: dict[str, list[memtrace.Growth]] = {}
    for name, pid in sorted(pids.items()):
        snaps = _snapshots(directory, pid)
        if len(snaps) >= 2:
            out[name] = memtrace.growth(snaps[0], snaps[-1], top=top)
    return out
