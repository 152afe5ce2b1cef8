"""`make bench`: verification throughput per family and end-to-end mesh throughput, each
reported beside the crypto ceiling measured in this same run (one core, no parallelism)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from bench import ceiling, mesh, verifiers
from services.mesh import telemetry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--skip-mesh", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    telemetry.configure("bench", level="error", stream=open(os.devnull, "w"))  # noqa: SIM115

    ceilings = {name: measure(args.seconds) for name, measure in ceiling.MEASURES.items()}
    report: dict[str, Any] = {"ceiling_per_s": {k: round(v, 1) for k, v in ceilings.items()}}
    report["verifiers"] = verifiers.run(args.seconds)
    if not args.skip_mesh:
        report["mesh"] = mesh.run(nodes=args.nodes, rounds=args.rounds)
        report["mesh"]["ratio_to_p384_ceiling"] = round(
            report["mesh"]["per_s"] / ceilings["ecdsa_p384_verify"], 4
        )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


def _print(report: dict[str, Any]) -> None:
    ceilings = report["ceiling_per_s"]
    assert isinstance(ceilings, dict)
    print("crypto ceiling (one core):")
    for name, value in ceilings.items():
        print(f"  {name:<28} {value:>10.1f} /s")
    print("verification (one core, chain and collateral cached; ceiling measured alongside):")
    for row in report["verifiers"]:
        print(
            f"  {row['family']:<10} {row['source']:<34} {row['per_s']:>9.1f} /s   "
            f"{row['ratio_to_ceiling'] * 100:5.1f} % of the {row['ceiling']} ceiling for its "
            f"{row['signatures']} signature(s); {row['ratio_to_one_signature'] * 100:5.1f} % of one"
        )
    if "mesh" in report:
        m = report["mesh"]
        assert isinstance(m, dict)
        print(
            f"mesh end to end: {m['attestations']} attestations by {m['nodes']} nodes in "
            f"{m['seconds']:.2f} s = {m['per_s']:.1f} /s; latency p50 {m['latency_ms']['p50']} ms, "
            f"p99 {m['latency_ms']['p99']} ms ({m['ratio_to_p384_ceiling'] * 100:.1f} % of the "
            "P-384 verify ceiling, all services sharing this one process)"
        )


if __name__ == "__main__":
    sys.exit(main())
