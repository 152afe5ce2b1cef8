"""Resident memory of the mesh's processes over a run, read from ``/proc/<pid>/status``.

Why the kernel's figures and not ``tracemalloc`` or the services' own: a leak may be in C
(OpenSSL, the regopy interpreter, nats-server itself) as well as in Python objects, and what
an operator sizes a pod by is the resident set. ``VmRSS`` is the resident set now, ``VmHWM``
its high-water mark since the process started.

A process's series is judged *growing* when it ends more than ``GROWTH_KB`` and
``GROWTH_PCT`` above where the measured window started and is still rising over the window's
second half at no less than half its overall pace: a cache or a TTL-bounded store filling up
levels off, a leak does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

GROWTH_KB = 2048
GROWTH_PCT = 2.0
_SLACK_S = 0.5
"""A reading meant for the window's end may come this much after it."""


@dataclass(frozen=True)
class Reading:
    rss_kb: int
    hwm_kb: int


def read(pid: int) -> Reading | None:
    """``VmRSS`` and ``VmHWM`` of ``pid`` in KiB (``None`` if it is gone or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    if "VmRSS" not in values:
        return None  # a zombie has no memory lines
    return Reading(values["VmRSS"], values.get("VmHWM", values["VmRSS"]))


@dataclass
class Series:
    """One process's readings: ``(seconds since the window started, reading)``. The window's
    start is the first reading at or after 0, its end the last at or before its duration;
    readings before came during warm-up, after it while the load drained."""

    before_kb: int | None = None
    """Before any load arrived."""
    samples: list[tuple[float, Reading]] = field(default_factory=list)

    def add(self, t: float, reading: Reading | None) -> None:
        if reading is not None:
            self.samples.append((t, reading))

    def window(self, duration: float) -> list[tuple[float, Reading]]:
        return [(t, r) for t, r in self.samples if 0 <= t <= duration + _SLACK_S]

    def summary(self, duration: float) -> dict[str, object] | None:
        """The ``memory`` member for this process (``None`` without two readings in the
        window)."""
        window = self.window(duration)
        if len(window) < 2:
            return None
        start, end = window[0][1].rss_kb, window[-1][1].rss_kb
        growth = end - start
        slope = _slope_per_min(window)
        late = _slope_per_min(window[len(window) // 2 :])
        pct = 100.0 * growth / start if start else 0.0
        growing = growth > GROWTH_KB and pct > GROWTH_PCT and late >= 0.5 * slope > 0
        return {
            "before_load_kb": self.before_kb,
            "start_kb": start,
            "end_kb": end,
            "peak_kb": max(r.rss_kb for _, r in window),
            "hwm_kb": max(r.hwm_kb for _, r in self.samples),
            "growth_kb": growth,
            "growth_pct": round(pct, 2),
            "slope_kb_per_min": round(slope, 1),
            "late_slope_kb_per_min": round(late, 1),
            "growing": growing,
            "samples_kb": [r.rss_kb for _, r in window],
        }


def _slope_per_min(points: list[tuple[float, Reading]]) -> float:
    """Least-squares slope of RSS against time, KiB per minute (0 for fewer than 2 points)."""
    if len(points) < 2:
        return 0.0
    xs = [t for t, _ in points]
    ys = [float(r.rss_kb) for _, r in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return 60.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
