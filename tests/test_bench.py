"""`attestmesh bench` works: it runs the mesh as processes, reports every figure, and leaves
nothing behind. The figures themselves are the benchmark's business, never asserted here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from services import cli

PIPELINE_NUMBERS = ("attestations_per_s", "ceiling_per_s", "ratio", "processes", "attestations")


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or entry.name == str(os.getpid()):
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


def _bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The bench keeps its data in a temporary directory; under tmp_path we can look for
    # any process still naming it afterwards.
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )


@pytest.mark.slow
def test_bench_reports_every_figure_positive_and_leaves_no_process(tmp_path: Path) -> None:
    plot = tmp_path / "plot" / "sweep.svg"
    done = _bench(
        tmp_path, "--json", "--duration", "1", "--nodes", "4", "--sweep", "2", "--plot", str(plot)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    pipeline = report["pipeline"]
    for name in PIPELINE_NUMBERS:
        assert pipeline[name] > 0, name
    assert pipeline["processes"] == 1
    assert pipeline["ratio"] == pytest.approx(
        pipeline["attestations_per_s"] / pipeline["ceiling_per_s"], abs=1e-3
    )
    for figures in (pipeline["latency_ms"], pipeline["half_load"]["latency_ms"]):
        assert set(figures) == {"p50", "p99"}
        assert 0 < figures["p50"] <= figures["p99"]
    assert pipeline["half_load"]["per_s"] > 0
    stages = pipeline["half_load"]["stages_ms"]
    assert list(stages) == ["nonce", "evidence", "decision", "secret"]
    assert all(0 < stage["p50"] <= stage["p99"] for stage in stages.values())
    assert (
        sum(stage["p50"] for stage in stages.values())
        <= 2 * pipeline["half_load"]["latency_ms"]["p99"]
    )
    assert pipeline["failed"] == {} and pipeline["half_load"]["failed"] == {}
    assert pipeline["hop_ms"]["busy"] > 0 and pipeline["hop_ms"]["after_idle"] > 0
    cpu = pipeline["cpu_ms_per_attestation"]
    for service in ("verifier-snp", "policy", "broker", "nats-server", "driver"):
        assert cpu[service] > 0, service
    rows = report["verifiers"]
    assert any(row["family"] == "snp" for row in rows)
    for row in rows:
        assert row["per_s"] > 0 and row["ceiling_per_s"] > 0 and row["ratio_to_ceiling"] > 0
    _check_sweep(pipeline, plot)
    shutil.rmtree(plot.parent)
    assert _processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []  # its temporary data directory is gone too


def _check_sweep(pipeline: dict[str, Any], plot: Path) -> None:
    steps = pipeline["sweep"]
    assert [s["fraction"] for s in steps] == [0.5, 1.0]
    assert steps[0]["offered_per_s"] < steps[1]["offered_per_s"]
    for step in steps:
        assert 0 < step["achieved_per_s"] <= step["offered_per_s"]
        assert 0 < step["latency_ms"]["p50"] <= step["latency_ms"]["p99"]
        assert step["attestations"] > 0 and step["cpu_ms_per_attestation"] > 0
        assert step["failed"] == {}
    svg = ET.parse(plot).getroot()
    lines = {
        line.get("class"): line.get("points", "").split()
        for line in svg.iter("{http://www.w3.org/2000/svg}polyline")
    }
    assert len(lines["p50"]) == len(lines["p99"]) == len(lines["achieved"]) == len(steps)


@pytest.mark.slow
def test_fleet_reports_rates_latency_and_every_process_memory(tmp_path: Path) -> None:
    done = _bench(
        tmp_path,
        "--fleet",
        "--json",
        "--fleet-nodes",
        "12",
        "--interval",
        "1",
        "--duration",
        "3",
        "--load-processes",
        "2",
        "--sample",
        "0.5",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fleet = json.loads(done.stdout)["fleet"]
    assert (fleet["nodes"], fleet["load_processes"], fleet["warm_up_s"]) == (12, 2, 1.0)
    offered, achieved = fleet["offered"], fleet["achieved"]
    assert offered["rounds"] == 36  # every node due once a second for three seconds
    assert 0 < achieved["per_s"] <= offered["per_s"]
    assert achieved["rounds"] <= offered["rounds"]
    assert isinstance(fleet["kept_up"], bool)
    assert fleet["kept_up"] == (
        fleet["backlog"]["not_started"] == 0
        and fleet["backlog"]["late_rounds"] == 0
        and achieved["rounds"] >= 0.99 * offered["rounds"]
    )
    for figures in (
        fleet["latency_ms"],
        fleet["round_ms"],
        fleet["admitted_ms"],
        fleet["backlog"]["start_lag_ms"],
    ):
        assert 0 <= figures["p50"] <= figures["p99"] <= figures["max"]
    assert 0 < fleet["admitted_ms"]["p50"] <= fleet["round_ms"]["p50"]
    assert len(fleet["timeline"]) == 6
    assert set(fleet["timeline"][-1]["pending"]) == {"verifier-snp", "policy", "broker"}
    processes = {"verifier-snp", "policy", "broker", "nats-server", "load-1", "load-2", "driver"}
    assert processes <= set(fleet["memory"])
    for name in processes:
        m = fleet["memory"][name]
        assert m["start_kb"] > 0 and 0 < m["end_kb"] <= m["hwm_kb"], name
        assert m["start_kb"] <= m["peak_kb"] and m["end_kb"] <= m["peak_kb"], name
        assert m["growth_kb"] == m["end_kb"] - m["start_kb"], name
        assert len(m["samples_kb"]) == len(fleet["memory_sample_t_s"]) == 7, name
        assert isinstance(m["growing"], bool)
    assert fleet["growing"] == sorted(n for n, m in fleet["memory"].items() if m["growing"])
    cpu = fleet["cpu"]["processes"]
    for name in ("verifier-snp", "policy", "broker", "nats-server", "load-1", "load-2"):
        assert cpu[name]["cpu_s"] > 0 and cpu[name]["ms_per_attestation"] > 0, name
    assert fleet["streams"]["EVIDENCE"]["end_bytes"] > fleet["streams"]["EVIDENCE"]["start_bytes"]
    assert fleet["exited"] == []
    assert _processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


def test_bench_refuses_out_of_range_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (
        ("--processes", "0"),
        ("--processes", "9"),
        ("--duration", "0"),
        ("--nodes", "x"),
        ("--fleet-nodes", "0"),
        ("--interval", "0"),
        ("--sweep", "0"),
    ):
        with pytest.raises(SystemExit) as exited:
            cli.main(["bench", *args])
        assert exited.value.code == 2, args
        assert "bench: error: argument" in capsys.readouterr().err
    for combination in (("--plot", "x.svg"), ("--fleet", "--sweep"), ("--tracemalloc",)):
        assert cli.main(["bench", *combination]) == 2, combination
        assert "attestmesh bench: error:" in capsys.readouterr().err
