"""``attestmesh bench`` (and its alias ``make bench``): verification per family, then the
mesh end to end, every figure beside the P-384 ceiling measured in this same run."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

DEFAULT_DURATION_S = 10.0
DEFAULT_NODES = 32
MAX_NODES = 1024
MAX_PROCESSES = 8


def add_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="measure verification and the whole mesh's throughput")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument(
        "--duration",
        type=_bounded(float, 0.5, 600.0),
        default=DEFAULT_DURATION_S,
        help="seconds of each mesh phase (peak, then half load; default 10)",
    )
    bench.add_argument(
        "--nodes", type=_bounded(int, 1, MAX_NODES), default=DEFAULT_NODES, help="simulated nodes"
    )
    bench.add_argument(
        "--processes",
        type=_bounded(int, 1, MAX_PROCESSES),
        default=1,
        help="SNP verifier processes (default 1)",
    )


def _bounded(kind: type[int] | type[float], low: float, high: float) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}")
        return value

    return parse


def run(args: argparse.Namespace) -> int:
    from bench import pipeline, verifiers
    from services.mesh import telemetry

    telemetry.configure("bench", level="error", stream=open(os.devnull, "w"))  # noqa: SIM115
    # A verification row runs for 2x this (alternating with its ceiling): about 2 s by default.
    seconds = max(0.25, min(1.0, args.duration / 10.0))
    report: dict[str, Any] = {"verifiers": verifiers.run(seconds)}
    report["pipeline"] = pipeline.run(
        seconds=args.duration, nodes=args.nodes, processes=args.processes
    )
    if args.json:
        print(json.dumps(report, indent=2), flush=True)
    else:
        _print(report)
    return 0


def _print(report: dict[str, Any]) -> None:
    print("verification (one core, chain and collateral cached; ceiling measured alongside):")
    for row in report["verifiers"]:
        print(
            f"  {row['family']:<10} {row['source']:<34} {row['per_s']:>9.1f} /s   "
            f"{row['ratio_to_ceiling'] * 100:5.1f} % of the {row['ceiling']} ceiling for its "
            f"{row['signatures']} signature(s); {row['ratio_to_one_signature'] * 100:5.1f} % of one"
        )
    p = report["pipeline"]
    half = p["half_load"]
    print(
        f"mesh end to end (SNP, {p['nodes']} nodes, {p['processes']} verifier process(es), "
        f"every service its own process, {p['cores']} cores):\n"
        f"  peak      {p['attestations_per_s']:>8.1f} /s = {p['ratio'] * 100:.1f} % of "
        f"{p['ceiling_per_s']:.0f} P-384 verifications/s on one core; "
        f"p50 {p['latency_ms']['p50']} ms, p99 {p['latency_ms']['p99']} ms\n"
        f"  half load {half['per_s']:>8.1f} /s; "
        f"p50 {half['latency_ms']['p50']} ms, p99 {half['latency_ms']['p99']} ms"
    )
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in p["cpu_ms_per_attestation"].items())
    print(f"  CPU ms per attestation at peak: {cpu}")
    failed = {**p["failed"], **half["failed"]}
    if failed:
        print(f"  failed rounds: {failed}")
