"""The sweep as a small SVG: latency against offered load, and achieved against offered.

Hand-written rather than through a plotting library: two line charts do not justify a
dependency, and the file must be reproducible byte for byte from the report alone (the README
shows it beside the command that made it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 880, 400
PANEL_W, PANEL_H = 340, 270
LEFT, TOP = 70, 60
GAP = 110
COLOURS = {"p50": "#1f77b4", "p99": "#d62728", "achieved": "#2ca02c", "ideal": "#999999"}


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least ``high`` (steps of 1, 2 or 5 times a power of
    ten, about ``count`` of them)."""
    if high <= 0:
        return [0.0, 1.0]
    raw = high / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    ticks = [0.0]
    while ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def log_ticks(low: float, high: float) -> list[float]:
    """1, 2 and 5 times powers of ten, from the last at or below ``low`` to the first at or
    above ``high`` (both positive)."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    candidates = [m * 10.0**k for k in range(first, last + 1) for m in (1, 2, 5)]
    start = max(i for i, t in enumerate(candidates) if t <= low)
    end = min(i for i, t in enumerate(candidates) if t >= high)
    return candidates[start : max(end, start + 1) + 1]


class _Panel:
    """One chart: axes, ticks and lines in data coordinates (``log``: the y axis is
    logarithmic, for latencies that span orders of magnitude between light and full load)."""

    def __init__(
        self, x0: float, title: str, xs: Sequence[float], ys: Sequence[float], *, log: bool = False
    ) -> None:
        self.x0 = x0
        self.log = log
        self.parts: list[str] = []
        self.xticks = nice_ticks(max(xs, default=1.0))
        positive = [y for y in ys if y > 0] or [1.0]
        if log:
            self.yticks = log_ticks(min(positive), max(positive))
        else:
            self.yticks = nice_ticks(max(ys, default=1.0))
        self.parts.append(
            f'<text x="{x0 + PANEL_W / 2:.1f}" y="{TOP - 14}" text-anchor="middle" '
            f'font-weight="bold">{escape(title)}</text>'
        )

    def x(self, value: float) -> float:
        return self.x0 + PANEL_W * value / self.xticks[-1]

    def y(self, value: float) -> float:
        if self.log:
            low, high = math.log10(self.yticks[0]), math.log10(self.yticks[-1])
            share = (math.log10(max(value, self.yticks[0])) - low) / (high - low)
            return TOP + PANEL_H - PANEL_H * share
        return TOP + PANEL_H - PANEL_H * value / self.yticks[-1]

    def axes(self, xlabel: str, ylabel: str) -> None:
        bottom = TOP + PANEL_H
        for t in self.xticks:
            self.parts.append(
                f'<line x1="{self.x(t):.1f}" y1="{TOP}" x2="{self.x(t):.1f}" y2="{bottom}" '
                f'stroke="#eeeeee"/><text x="{self.x(t):.1f}" y="{bottom + 16}" '
                f'text-anchor="middle">{t:g}</text>'
            )
        for t in self.yticks:
            self.parts.append(
                f'<line x1="{self.x0}" y1="{self.y(t):.1f}" x2="{self.x0 + PANEL_W}" '
                f'y2="{self.y(t):.1f}" stroke="#eeeeee"/><text x="{self.x0 - 6}" '
                f'y="{self.y(t) + 4:.1f}" text-anchor="end">{t:g}</text>'
            )
        self.parts.append(
            f'<rect x="{self.x0}" y="{TOP}" width="{PANEL_W}" height="{PANEL_H}" fill="none" '
            f'stroke="#333333"/><text x="{self.x0 + PANEL_W / 2:.1f}" y="{bottom + 36}" '
            f'text-anchor="middle">{escape(xlabel)}</text>'
            f'<text transform="translate({self.x0 - 48},{TOP + PANEL_H / 2:.1f}) rotate(-90)" '
            f'text-anchor="middle">{escape(ylabel)}</text>'
        )

    def line(
        self, name: str, points: Sequence[tuple[float, float]], *, dashed: bool = False
    ) -> None:
        path = " ".join(f"{self.x(a):.1f},{self.y(b):.1f}" for a, b in points)
        dash = ' stroke-dasharray="5,4"' if dashed else ""
        self.parts.append(
            f'<polyline class="{name}" points="{path}" fill="none" stroke="{COLOURS[name]}" '
            f'stroke-width="2"{dash}/>'
        )
        if not dashed:
            self.parts.extend(
                f'<circle cx="{self.x(a):.1f}" cy="{self.y(b):.1f}" r="3" fill="{COLOURS[name]}"/>'
                for a, b in points
            )

    def legend(self, entries: Sequence[tuple[str, str]]) -> None:
        for i, (name, label) in enumerate(entries):
            y = TOP + 14 + 18 * i
            self.parts.append(
                f'<line x1="{self.x0 + 12}" y1="{y - 4}" x2="{self.x0 + 32}" y2="{y - 4}" '
                f'stroke="{COLOURS[name]}" stroke-width="2"/>'
                f'<text x="{self.x0 + 38}" y="{y}">{escape(label)}</text>'
            )


def render_sweep(pipeline: dict[str, Any]) -> str:
    """The SVG text for a report's ``pipeline`` member (which must hold a ``sweep``)."""
    rows = pipeline["sweep"]
    offered = [float(r["offered_per_s"]) for r in rows]
    p50 = [float(r["latency_ms"]["p50"]) for r in rows]
    p99 = [float(r["latency_ms"]["p99"]) for r in rows]
    achieved = [float(r["achieved_per_s"]) for r in rows]

    latency = _Panel(LEFT, "latency against offered load", offered, p50 + p99, log=True)
    latency.axes("offered attestations/s", "ms from when the round was due (log)")
    latency.line("p50", list(zip(offered, p50, strict=True)))
    latency.line("p99", list(zip(offered, p99, strict=True)))
    latency.legend([("p50", "p50"), ("p99", "p99")])

    top = max(offered + achieved)
    rate = _Panel(LEFT + PANEL_W + GAP, "achieved against offered", offered, [top])
    rate.xticks = rate.yticks = nice_ticks(top)
    rate.axes("offered attestations/s", "released attestations/s")
    rate.line("ideal", [(0.0, 0.0), (top, top)], dashed=True)
    rate.line("achieved", list(zip(offered, achieved, strict=True)))
    rate.legend([("achieved", "achieved"), ("ideal", "achieved = offered")])

    caption = (
        f"attestmesh bench --sweep: SNP, {pipeline['nodes']} nodes, "
        f"{pipeline['processes']} verifier process(es), {pipeline['cores']} cores; "
        f"closed-loop peak {pipeline['attestations_per_s']} /s; "
        f"each point {pipeline['seconds']:.0f} s open loop"
    )
    body = "".join(latency.parts + rate.parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">'
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>{body}'
        f'<text x="{WIDTH / 2:.0f}" y="{HEIGHT - 10}" text-anchor="middle" fill="#555555">'
        f"{escape(caption)}</text></svg>\n"
    )


def write_sweep(path: Path, pipeline: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_sweep(pipeline))
