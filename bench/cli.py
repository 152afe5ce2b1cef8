"""``attestmesh bench`` (and its alias ``make bench``): verification per family, then the
mesh end to end, every figure beside the P-384 ceiling measured in this same run; with
``--sweep``, latency against offered load too; with ``--fleet``, instead, a large simulated
fleet for minutes, its throughput, latency and every process's memory."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_DURATION_S = 10.0
DEFAULT_NODES = 32
MAX_NODES = 1024
MAX_PROCESSES = 8
DEFAULT_FLEET_NODES = 2000
MAX_FLEET_NODES = 10_000
NODES_PER_LOAD_PROCESS = 1000
DEFAULT_SWEEP_STEPS = 10


def add_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="measure verification and the whole mesh's throughput")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument(
        "--duration",
        type=_bounded(float, 0.5, 3600.0),
        default=None,
        help="seconds of each mesh phase (peak, half load, each sweep step; default 10), "
        "or with --fleet of the measured window (default 180)",
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
    bench.add_argument(
        "--sweep",
        type=_bounded(int, 1, 20),
        nargs="?",
        const=DEFAULT_SWEEP_STEPS,
        default=None,
        metavar="STEPS",
        help="also run open loop at 1/STEPS .. 100 %% of the measured peak (default 10 steps)",
    )
    bench.add_argument(
        "--plot", type=Path, default=None, metavar="SVG", help="write the sweep's plot here"
    )
    fleet = bench.add_argument_group("fleet mode")
    fleet.add_argument(
        "--fleet", action="store_true", help="run a large simulated fleet instead (see README)"
    )
    fleet.add_argument(
        "--fleet-nodes",
        type=_bounded(int, 1, MAX_FLEET_NODES),
        default=DEFAULT_FLEET_NODES,
        help=f"nodes of the fleet (default {DEFAULT_FLEET_NODES})",
    )
    fleet.add_argument(
        "--interval",
        type=_bounded(float, 0.5, 600.0),
        default=10.0,
        help="seconds between a node's rounds (default 10)",
    )
    fleet.add_argument(
        "--load-processes",
        type=_bounded(int, 1, 16),
        default=None,
        help=f"processes the fleet's nodes run in (default one per {NODES_PER_LOAD_PROCESS})",
    )
    fleet.add_argument(
        "--tracemalloc",
        action="store_true",
        help="trace allocations in every service and load process and report the call sites "
        "that grew over the window (slows them all: for finding a leak, not for figures)",
    )
    fleet.add_argument(
        "--sample",
        type=_bounded(float, 0.2, 600.0),
        default=None,
        help="seconds between memory samples (default a twelfth of --duration, 0.5 to 10)",
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
    from bench import text
    from services.mesh import telemetry

    problem = _incompatible(args)
    if problem:
        print(f"attestmesh bench: error: {problem}", file=sys.stderr)
        return 2
    telemetry.configure("bench", level="error", stream=open(os.devnull, "w"))  # noqa: SIM115
    report = _fleet(args) if args.fleet else _mesh(args)
    if args.json:
        print(json.dumps(report, indent=2), flush=True)
    elif args.fleet:
        text.print_fleet(report["fleet"])
    else:
        text.print_mesh(report)
    return 0


def _incompatible(args: argparse.Namespace) -> str:
    if args.plot is not None and args.sweep is None:
        return "--plot draws the sweep: give --sweep too"
    if args.fleet and args.sweep is not None:
        return "--fleet and --sweep are separate runs"
    if args.tracemalloc and not args.fleet:
        return "--tracemalloc belongs to --fleet"
    return ""


def _mesh(args: argparse.Namespace) -> dict[str, Any]:
    from bench import pipeline, svgplot, sweep, verifiers

    duration = args.duration if args.duration is not None else DEFAULT_DURATION_S
    # A verification row runs for 2x this (alternating with its ceiling): about 2 s by default.
    seconds = max(0.25, min(1.0, duration / 10.0))
    report: dict[str, Any] = {"verifiers": verifiers.run(seconds)}
    report["pipeline"] = pipeline.run(
        seconds=duration,
        nodes=args.nodes,
        processes=args.processes,
        sweep=sweep.fractions(args.sweep) if args.sweep else [],
    )
    if args.plot is not None:
        svgplot.write_sweep(args.plot, report["pipeline"])
    return report


def _fleet(args: argparse.Namespace) -> dict[str, Any]:
    from bench import fleet

    duration = args.duration if args.duration is not None else fleet.DEFAULT_DURATION_S
    loads = args.load_processes or math.ceil(args.fleet_nodes / NODES_PER_LOAD_PROCESS)
    settings = fleet.Settings(
        nodes=args.fleet_nodes,
        interval=args.interval,
        duration=duration,
        load_processes=min(loads, args.fleet_nodes),
        processes=args.processes,
        sample_s=args.sample if args.sample is not None else min(10.0, max(0.5, duration / 12)),
        tracemalloc=args.tracemalloc,
    )
    return {"fleet": fleet.run(settings)}
