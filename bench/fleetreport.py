"""The ``fleet`` member of the bench report, from the load processes' rounds and the samples.

Only rounds *due* inside the measured window count (the first interval is warm-up: each
node's first contact pins it and fills the services' per-node state). The rates:

* ``offered``: rounds due in the window, per second of window: what the fleet asked for
  (``nodes / interval`` when every node keeps its schedule);
* ``achieved``: those of them released, per second from the window's start until the last of
  them finished (never less than the window), so rounds that finished late stretch the time
  and lower the rate, and ``achieved <= offered`` always;
* the backlog: how late rounds started (``start_lag_ms``), how many started more than an
  interval late, how many never started before the load gave up (``not_started``), and the
  services' JetStream consumers' pending messages.

``kept_up`` holds only when every offered round started, none more than an interval late, and
at least 99 % were released. Latency is measured from when a round was *due*, so a round
waiting for its node's previous one carries that wait, as the node would see it.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.fleetload import NOT_STARTED, Round
from bench.memory import Series
from services.roundwatch import _percentile

KEPT_UP_RELEASED = 0.99


@dataclass
class Sample:
    """What the orchestrator read at one instant (seconds after the window started)."""

    t: float
    pending: dict[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Window:
    """The measured window in seconds after ``T0``; ``duration`` its length."""

    start: float
    duration: float

    @property
    def end(self) -> float:
        return self.start + self.duration


def _ms(values: list[float], *percentiles: int) -> dict[str, float]:
    ordered = sorted(v * 1000.0 for v in values)
    figures = {f"p{p}": round(_percentile(ordered, p), 2) for p in percentiles}
    figures["max"] = round(ordered[-1], 2) if ordered else 0.0
    return figures


def throughput(rounds: Sequence[Round], window: Window, interval: float) -> dict[str, Any]:
    """Offered against achieved, latency, failures and the backlog, over ``window``."""
    offered = [r for r in rounds if window.start <= r.due < window.end]
    released = [r for r in offered if r.released]
    started = [r for r in offered if r.started >= 0]
    last = max((r.ended for r in released), default=window.end)
    span = max(window.duration, last - window.start)
    lags = [r.started - r.due for r in started]
    late = sum(1 for lag in lags if lag > interval)
    not_started = sum(1 for r in offered if r.reason == NOT_STARTED)
    achieved_per_s = len(released) / span
    offered_per_s = len(offered) / window.duration
    kept_up = (
        bool(offered)
        and not_started == 0
        and late == 0
        and len(released) >= KEPT_UP_RELEASED * len(offered)
    )
    return {
        "offered": {"rounds": len(offered), "per_s": round(offered_per_s, 2)},
        "achieved": {
            "rounds": len(released),
            "per_s": round(achieved_per_s, 2),
            "ratio": round(achieved_per_s / offered_per_s, 4) if offered_per_s else 0.0,
            "seconds": round(span, 3),
        },
        "kept_up": kept_up,
        "latency_ms": _ms([r.ended - r.due for r in released], 50, 99),
        "round_ms": _ms([r.ended - r.started for r in released], 50, 99),
        "admitted_ms": _ms([r.admitted for r in released if r.admitted >= 0], 50, 99),
        "failed": dict(Counter(r.reason for r in offered if not r.released)),
        "backlog": {
            "start_lag_ms": _ms(lags, 50, 99),
            "late_rounds": late,
            "not_started": not_started,
        },
    }


def timeline(
    rounds: Sequence[Round], window: Window, samples: Sequence[Sample], bin_s: float
) -> list[dict[str, Any]]:
    """Per ``bin_s`` of the window: offered and achieved rates, latency of the rounds that
    ended in it, and the consumers' pending messages at the sample nearest its end (so a
    mesh falling further behind shows as the rows go by)."""
    rows = []
    edges = [window.start]
    while edges[-1] + bin_s < window.end - 1e-9:
        edges.append(edges[-1] + bin_s)
    edges.append(window.end)
    for a, b in itertools.pairwise(edges):
        width = b - a
        due = sum(1 for r in rounds if a <= r.due < b)
        ended = [r for r in rounds if r.released and a <= r.ended < b]
        nearest = min(samples, key=lambda s: abs(s.t - (b - window.start)), default=None)
        rows.append(
            {
                "t_s": round(b - window.start, 2),
                "offered_per_s": round(due / width, 2),
                "achieved_per_s": round(len(ended) / width, 2),
                "latency_ms": _ms([r.ended - r.due for r in ended], 50, 99),
                "pending": nearest.pending if nearest else {},
            }
        )
    return rows


def memory(series: dict[str, Series], duration: float) -> dict[str, Any]:
    """Each process's ``memory`` member (see :mod:`bench.memory`)."""
    out: dict[str, Any] = {}
    for name, one in sorted(series.items()):
        summary = one.summary(duration)
        if summary is not None:
            out[name] = summary
    return out


def cpu(used: dict[str, float], seconds: float, attestations: int) -> dict[str, Any]:
    """CPU seconds of each process over the window, the cores that is, and the milliseconds
    per released attestation: the figures a busy machine disturbs least."""
    rows = {
        name: {
            "cpu_s": round(s, 3),
            "cores": round(s / seconds, 3) if seconds else 0.0,
            "ms_per_attestation": round(1000.0 * s / attestations, 3) if attestations else 0.0,
        }
        for name, s in sorted(used.items())
    }
    total = sum(used.values())
    per_attestation = 1000.0 * total / attestations if attestations else 0.0
    return {
        "processes": rows,
        "total_cores": round(total / seconds, 3) if seconds else 0.0,
        "total_ms_per_attestation": round(per_attestation, 3),
    }
