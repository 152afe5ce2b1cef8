"""Latency against offered load: open loops at fractions of the measured peak.

Each step offers ``fraction * peak`` rounds per second on a fixed schedule for the phase's
seconds (:func:`bench.loops.open_loop`) and reports what came of it: the rate achieved (never
above the rate offered: a phase lasts at least its schedule), p50/p99 latency including any
wait for a free node, failures, and the CPU all processes spent per released attestation (the
figure a busy machine disturbs least).
"""

from __future__ import annotations

from typing import Any

from bench.loops import Phase

MIN_RATE_PER_S = 0.5
"""No step offers less than this, so a tiny peak still gives every step a round or two."""


def fractions(steps: int) -> list[float]:
    """``1/steps, 2/steps, .., 1``: the fractions of the peak a sweep offers."""
    return [k / steps for k in range(1, steps + 1)]


def row(fraction: float, phase: Phase, seconds: float) -> dict[str, Any]:
    """One step's figures; ``seconds`` is its schedule's length, so ``offered_per_s`` is the
    rounds it actually scheduled over it (the rate asked for, to within one round)."""
    released = len(phase.released)
    cpu_s = sum(phase.cpu_s.values())
    return {
        "fraction": round(fraction, 3),
        "offered_per_s": round(len(phase.results) / seconds, 2),
        "achieved_per_s": round(phase.per_s, 2),
        "attestations": released,
        "seconds": round(phase.seconds, 3),
        "latency_ms": phase.latency(),
        "failed": phase.failures(),
        "cpu_ms_per_attestation": round(1000.0 * cpu_s / released, 3) if released else 0.0,
    }
