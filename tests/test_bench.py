"""`attestmesh bench` works: it runs the mesh as processes, reports every figure, and leaves
nothing behind. The figures themselves are the benchmark's business, never asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    done = _bench(tmp_path, "--json", "--duration", "1", "--nodes", "4")
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
    assert pipeline["failed"] == {} and pipeline["half_load"]["failed"] == {}
    cpu = pipeline["cpu_ms_per_attestation"]
    for service in ("verifier-snp", "policy", "broker", "nats-server", "driver"):
        assert cpu[service] > 0, service
    rows = report["verifiers"]
    assert any(row["family"] == "snp" for row in rows)
    for row in rows:
        assert row["per_s"] > 0 and row["ceiling_per_s"] > 0 and row["ratio_to_ceiling"] > 0
    assert _processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []  # its temporary data directory is gone too


def test_bench_refuses_out_of_range_arguments(tmp_path: Path) -> None:
    for args in (("--processes", "0"), ("--processes", "9"), ("--duration", "0"), ("--nodes", "x")):
        done = _bench(tmp_path, *args)
        assert done.returncode == 2, args
        assert "bench: error: argument" in done.stderr
    assert _processes_mentioning(str(tmp_path)) == []
