"""The bench report as plain text (``--json`` prints the same figures as one object)."""

from __future__ import annotations

from typing import Any

from bench import hops


def print_mesh(report: dict[str, Any]) -> None:
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
    stages = ", ".join(
        f"{name} {ms['p50']}/{ms['p99']}" for name, ms in half.get("stages_ms", {}).items()
    )
    if stages:
        print(f"  half load by stage, p50/p99 ms: {stages}")
    hop = p.get("hop_ms")
    if hop:
        print(
            f"  one hop through nats-server (request and reply), p50: {hop['busy']} ms back to "
            f"back, {hop['after_idle']} ms after {hops.IDLE_S * 1000:.0f} ms idle"
        )
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in p["cpu_ms_per_attestation"].items())
    print(f"  CPU ms per attestation at peak: {cpu}")
    failed = {**p["failed"], **half["failed"]}
    if failed:
        print(f"  failed rounds: {failed}")
    for step in p.get("sweep", []):
        print(
            f"  sweep {step['fraction'] * 100:5.0f} %: offered {step['offered_per_s']:7.1f} /s, "
            f"achieved {step['achieved_per_s']:7.1f} /s; p50 {step['latency_ms']['p50']} ms, "
            f"p99 {step['latency_ms']['p99']} ms; CPU {step['cpu_ms_per_attestation']:.1f} ms "
            "per attestation (all processes)"
            + (f"; failed {step['failed']}" if step["failed"] else "")
        )


def print_fleet(f: dict[str, Any]) -> None:
    offered, achieved = f["offered"], f["achieved"]
    backlog = f["backlog"]
    print(
        f"fleet: {f['nodes']} SNP nodes re-attesting every {f['interval_s']:g} s in "
        f"{f['load_processes']} load process(es), {f['processes']} verifier process(es), "
        f"{f['cores']} cores; {f['duration_s']:g} s measured after {f['warm_up_s']:g} s warm-up"
    )
    verdict = "kept up" if f["kept_up"] else "did NOT keep up"
    print(
        f"  the mesh {verdict}: offered {offered['per_s']:.1f} /s ({offered['rounds']} rounds), "
        f"achieved {achieved['per_s']:.1f} /s ({achieved['rounds']} released, "
        f"{achieved['ratio'] * 100:.1f} %)"
    )
    lag = backlog["start_lag_ms"]
    print(
        f"  latency p50 {f['latency_ms']['p50']} ms, p99 {f['latency_ms']['p99']} ms "
        f"(round alone p50 {f['round_ms']['p50']} ms, from its nonce p50 "
        f"{f['admitted_ms']['p50']} / p99 {f['admitted_ms']['p99']} ms); "
        f"start lag p99 {lag['p99']} ms, "
        f"max {lag['max']} ms; {backlog['late_rounds']} rounds more than an interval late, "
        f"{backlog['not_started']} never started"
    )
    if f["failed"]:
        print(f"  failed rounds: {f['failed']}")
    pending = [row["pending"] for row in f["timeline"]]
    if pending:
        print(f"  consumer backlog at the end: {pending[-1]}")
    cpu = f["cpu"]
    print(
        f"  CPU: {cpu['total_cores']:.2f} cores busy, {cpu['total_ms_per_attestation']:.1f} ms "
        "per attestation: "
        + ", ".join(
            f"{name} {row['ms_per_attestation']:.2f}"
            for name, row in cpu["processes"].items()
            if row["cpu_s"] > 0
        )
    )
    print("  memory (RSS MiB, window start -> end, peak; growth per minute):")
    for name, m in f["memory"].items():
        flag = "  GROWING" if m["growing"] else ""
        print(
            f"    {name:<16} {m['start_kb'] / 1024:7.1f} -> {m['end_kb'] / 1024:7.1f}, "
            f"peak {m['peak_kb'] / 1024:7.1f}; {m['slope_kb_per_min'] / 1024:+.2f} MiB/min{flag}"
        )
    if f["growing"] and not f["kept_up"]:
        print(
            "  (the mesh fell behind: memory that grew may be holding the backlog; judge a leak "
            "on a run that kept up, or with --tracemalloc)"
        )
    if f["exited"]:
        print(f"  processes that exited during the run: {f['exited']}")
    for name, rows in f.get("tracemalloc", {}).items():
        print(f"  {name}: allocations that grew most over the window (tracemalloc)")
        for row in rows[:3]:
            print(
                f"    +{row['size_diff_kb']:.1f} KiB in {row['count_diff']:+d} blocks at "
                + " <- ".join(row["where"])
            )
