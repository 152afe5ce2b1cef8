"""`attestmesh up` as a user runs it: a subprocess with its own nats-server and services."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

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
    assert summary["lost"] == 0 and summary["duplicated"] == 0 and summary["revoked"] == 0
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


def _alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for whoever adopted it to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _until(condition: Callable[[], bool], what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert proc.poll() is None, f"up exited before {what}"
        assert time.monotonic() < deadline, f"no {what} in 120 s"
        time.sleep(0.05)


def _pid_in(path: Path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_a_killed_up_takes_every_child_with_it(tmp_path: Path) -> None:
    """``up`` killed with SIGKILL cannot stop its children itself: each must end on its own,
    the nats-server included, and so must children ``up`` restarted (which it starts from
    other threads than the first ones)."""
    data_dir = tmp_path / "mesh"
    pids_file, server_pid_file = data_dir / "pids.json", data_dir / "nats" / "nats-server.pid"
    errors = tmp_path / "up.stderr"
    command = ["up", "--nodes", "1", "--interval", "1", "--data-dir", str(data_dir)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ATTESTMESH_"))}
    with errors.open("w") as stderr_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *command],
            stdout=subprocess.DEVNULL,
            stderr=stderr_file,
            env=env,
        )
    children: dict[str, int] = {}
    try:

        def services() -> dict[str, int]:
            try:
                found: dict[str, int] = json.loads(pids_file.read_text())
            except (OSError, ValueError):
                return {}
            return found if len(found) == 5 else {}

        _until(lambda: bool(services()) and _alive(_pid_in(server_pid_file)), "children", proc)
        first_server, first_policy = _pid_in(server_pid_file), services()["policy"]
        os.kill(first_server, signal.SIGKILL)
        _until(
            lambda: _alive(_pid_in(server_pid_file)) and _pid_in(server_pid_file) != first_server,
            "server restart",
            proc,
        )
        os.kill(first_policy, signal.SIGKILL)
        _until(lambda: services().get("policy", first_policy) != first_policy, "restart", proc)
        children = {**services(), "nats-server": _pid_in(server_pid_file)}
        assert all(_alive(pid) for pid in children.values()), children
        assert "nats-server exited; restarting" in errors.read_text()

        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in children.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = {name: pid for name, pid in children.items() if _alive(pid)}
        assert left == {}, f"still running 5 s after up was killed: {left}"
        assert _processes_mentioning(str(data_dir)) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children.values():  # whatever a failure left behind, and nothing else
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
