"""`attestmesh up` as a user runs it: a subprocess with its own nats-server and services."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from services.testing.otlp import OtlpReceiver


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and str(os.getpid()) != entry.name:
            found.append(cmdline)
    return found


def test_up_runs_rounds_exports_traces_and_leaves_nothing_behind(tmp_path: Path) -> None:
    data_dir = tmp_path / "mesh-data"
    with OtlpReceiver() as otlp:
        completed = _run_up(data_dir, otlp.endpoint)
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["nodes"] == 3
    assert summary["attestations"] == 6
    assert summary["verdicts"] == {"affirming": 6}
    assert summary["decisions"] == 6
    assert summary["secrets_released"] == 6
    assert 0 < summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]
    assert summary["failed"] == 0 and summary["failures_by_reason"] == {}
    assert summary["restarts"] == {} and summary["service_exits"] == {}
    assert summary["lost"] == 0 and summary["duplicated"] == 0
    assert not (data_dir / "pids.json").exists()  # removed with the processes it named
    assert _processes_mentioning(str(data_dir)) == []
    assert (data_dir / "broker-sealing.key").stat().st_mode & 0o777 == 0o600
    # One NATS identity per service, per simulated node and for the operator, all private;
    # the server admitted exactly those and nobody anonymous.
    seeds = sorted(p.name for p in (data_dir / "identities").glob("*.nk"))
    assert seeds == sorted(
        [
            "admin.nk",
            "broker.nk",
            "policy.nk",
            *(f"verifier-{f}.nk" for f in ("snp", "nitro", "tpm")),
            *(f"node-{n}.nk" for n in ("snp-1", "nitro-2", "tpm-3")),
        ]
    )
    for path in (data_dir / "identities").iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    server_conf = json.loads((data_dir / "nats" / "nats-server.conf").read_text())
    assert set(server_conf) == {"authorization"} and len(server_conf["authorization"]["users"]) == 9
    assert json.loads((data_dir / "config.json").read_text())["nats_url"].startswith("nats://")
    assert "Violation" not in (data_dir / "nats" / "nats-server.log").read_text()

    # Each attestation is one trace across the up process and the three service processes
    # that handled it; the nodes alternate between the simulated families.
    roots = [s for s in otlp.spans if s.name == "collector.attest"]
    assert len(roots) == 6
    families = set()
    for root in roots:
        family = root.attributes["attestmesh.family"].string_value
        families.add(family)
        services = {s.service for s in otlp.spans if s.trace_id == root.trace_id}
        assert services == {
            "attestmesh-up",
            "attestmesh-policy",
            f"attestmesh-verifier-{family}",
            "attestmesh-broker",
        }
    assert families == {"snp", "nitro", "tpm"}


def _run_up(data_dir: Path, otlp_endpoint: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--rounds",
            "2",
            "--nodes",
            "3",
            "--json",
            "--interval",
            "0.1",
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, "ATTESTMESH_OTLP_ENDPOINT": otlp_endpoint},
    )


def test_up_refuses_a_replica_count_out_of_range(tmp_path: Path) -> None:
    for bad in ("0", "9", "two"):
        completed = subprocess.run(
            [sys.executable, "-m", "services.cli", "up", "--replicas", bad],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=tmp_path,
        )
        assert completed.returncode == 2 and "--replicas" in completed.stderr
        assert not (tmp_path / ".attestmesh").exists()
