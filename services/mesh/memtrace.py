"""Where a service's memory goes: tracemalloc snapshots on request, for hunting leaks.

Off unless ``ATTESTMESH_TRACEMALLOC`` names a directory. Then the process traces its
allocations from the start (``ATTESTMESH_TRACEMALLOC_FRAMES`` frames each, default 12) and,
on every ``SIGUSR2``, writes a snapshot to ``<directory>/<name>-<pid>-<n>.snap``. Two
snapshots of one process, taken minutes apart under steady load, say which lines' allocations
grew (:func:`growth`); that is how ``attestmesh bench --fleet --tracemalloc`` names the
source of a resident set that keeps rising. Tracing slows a process severalfold, so it is
never on in a measured run.

Why a signal and not a timer: the caller chooses the instants (the start and the end of a
measured window) across every process at once, and nothing runs while no one asks.
"""

from __future__ import annotations

import gc
import itertools
import os
import signal
import tracemalloc
from pathlib import Path
from types import FrameType
from typing import TypedDict

ENV_DIR = "ATTESTMESH_TRACEMALLOC"
ENV_FRAMES = "ATTESTMESH_TRACEMALLOC_FRAMES"
DEFAULT_FRAMES = 12
INNERMOST = 4
_IGNORED = (
    tracemalloc.__file__,
    "<frozen importlib._bootstrap>",
    "<frozen importlib._bootstrap_external>",
    "<unknown>",
)


def install_from_env(name: str) -> Path | None:
    """Start tracing and answer ``SIGUSR2`` with a snapshot if the environment asks; return
    the snapshot directory (``None``: not asked, nothing done)."""
    directory = os.environ.get(ENV_DIR)
    if not directory:
        return None
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(int(os.environ.get(ENV_FRAMES, DEFAULT_FRAMES)))
    numbers = itertools.count(1)

    def dump(_signum: int, _frame: FrameType | None) -> None:
        path = target / f"{name}-{os.getpid()}-{next(numbers)}.snap"
        partial = path.with_suffix(".partial")
        gc.collect()  # cyclic garbage (a traceback's frames) is not a leak: leave it out
        tracemalloc.take_snapshot().dump(str(partial))
        partial.replace(path)  # a reader never sees half a snapshot

    signal.signal(signal.SIGUSR2, dump)
    return target


class Growth(TypedDict):
    size_diff_kb: float
    count_diff: int
    size_kb: float
    where: list[str]
    """Innermost frame first (``path:line``, the path from its package root)."""


def growth(first: Path, second: Path, *, top: int = 10) -> list[Growth]:
    """The ``top`` call sites whose live allocations grew most from ``first`` to
    ``second``, each with its growth in bytes and blocks, its innermost frames and, where
    those are all a library's, the innermost frame of ours (the caller that feeds it)."""
    filters = [tracemalloc.Filter(False, pattern) for pattern in _IGNORED]
    before = tracemalloc.Snapshot.load(str(first)).filter_traces(filters)
    after = tracemalloc.Snapshot.load(str(second)).filter_traces(filters)
    rows: list[Growth] = []
    for stat in after.compare_to(before, "traceback")[: top * 4]:
        if stat.size_diff <= 0:
            continue
        frames = [f"{_short(f.filename)}:{f.lineno}" for f in reversed(stat.traceback)]
        where = frames[:INNERMOST]
        ours = next((f for f in frames if f.startswith(("services/", "bench/"))), None)
        if ours is not None and ours not in where:
            where.append(ours)
        rows.append(
            Growth(
                size_diff_kb=round(stat.size_diff / 1024, 1),
                count_diff=stat.count_diff,
                size_kb=round(stat.size / 1024, 1),
                where=where,
            )
        )
        if len(rows) == top:
            break
    return rows


def _short(filename: str) -> str:
    """A path from the package root on (``services/...``, ``nats/...``), not the machine's."""
    parts = Path(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return "/".join(parts[parts.index(marker) + 1 :])
    if "services" in parts:
        return "/".join(parts[len(parts) - 1 - parts[::-1].index("services") :])
    return "/".join(parts[-2:])
