"""Fault tests on real processes: kill -9 one service of a running ``attestmesh up``.

Each scenario runs ``up`` as a user would (a subprocess with its own nats-server), kills one
service process with SIGKILL while the nodes attest continuously, keeps going, stops ``up``
with Ctrl-C and reads its one-line JSON summary, then checks the release audit log from
outside (``attestmesh audit verify`` and ``list``, against the mesh's server brought back on
its store). Counted per scenario:
attestations attempted, completed, failed (by reason), lost (accepted evidence that never got
a decision) and duplicated (evidence with two distinct decisions), and releases: secrets the
nodes received against released records in the audit log, none twice for one decision.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from services.mesh import authconf
from services.mesh.server import NatsServer

pytestmark = pytest.mark.slow

NODES = 6
INTERVAL = "0.3"
BEFORE_KILL_S = 3.0
AFTER_KILL_S = 14.0
"""Longer than the ack wait ``up`` configures (10 s), so work a killed process held is redone
before the counts are taken."""


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=_env(),
    )


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ATTESTMESH_"))}


def _wait_for_pids(proc: subprocess.Popen[str], path: Path, count: int) -> dict[str, int]:
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "up wrote no pids.json"
        if path.exists():
            pids: dict[str, int] = json.loads(path.read_text())
            if len(pids) == count:
                return pids
        time.sleep(0.2)


def run_with_kill(data_dir: Path, victim: str | None, replicas: int) -> dict[str, Any]:
    """Run ``up``, SIGKILL ``victim`` (a name from pids.json) mid-run; return what was
    counted, with the summary, the audit records and the pids before and after."""
    command = ["up", "--nodes", str(NODES), "--interval", INTERVAL, "--json"]
    command += ["--replicas", str(replicas), "--data-dir", str(data_dir)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        pids_file = data_dir / "pids.json"
        before = _wait_for_pids(proc, pids_file, 5 * replicas)
        time.sleep(BEFORE_KILL_S)
        if victim is not None:
            os.kill(before[victim], signal.SIGKILL)
        time.sleep(AFTER_KILL_S)
        after = json.loads(pids_file.read_text())
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    summary: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    verified, listed = _read_audit(data_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert listed.returncode == 0, listed.stderr
    records = json.loads(listed.stdout)
    released = Counter(r["decision_id"] for r in records if r["outcome"] == "released")
    return {
        "summary": summary,
        "stderr": stderr,
        "before": before,
        "after": after,
        "released_in_audit": sum(released.values()),
        "released_twice": sum(1 for n in released.values() if n > 1),
    }


def _read_audit(
    data_dir: Path,
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """Verify and list the audit log after ``up`` stopped (so it holds every release the
    nodes counted): bring the mesh's server back on its store and point the config at it."""
    server = NatsServer(
        authconf.server_store_dir(data_dir), config_file=authconf.server_config_path(data_dir)
    )
    server.start()
    try:
        config_path = data_dir / "config.json"
        config = json.loads(config_path.read_text())
        config["nats_url"] = server.url
        config_path.write_text(json.dumps(config))
        verified = _cli("audit", "verify", "--data-dir", str(data_dir))
        listed = _cli("audit", "list", "--json", "--data-dir", str(data_dir))
    finally:
        server.stop()
    return verified, listed


def _table_row(name: str, found: dict[str, Any]) -> str:
    s = found["summary"]
    return (
        f"| {name} | {s['attestations']} | {s['attestations'] - s['failed']} | {s['failed']} "
        f"| {s['lost']} | {s['duplicated']} | {s['secrets_released']} "
        f"| {found['released_twice']} | {s['restarts']} | {s['failures_by_reason']} |"
    )


SCENARIOS = [
    ("verifier-snp", 1),
    ("policy", 1),
    ("broker", 1),
    ("verifier-snp", 2),
    ("policy", 2),
    ("broker", 2),
]


@pytest.mark.parametrize(("victim", "replicas"), SCENARIOS)
def test_kill_9_of_a_service_loses_and_duplicates_nothing(
    tmp_path: Path, victim: str, replicas: int
) -> None:
    found = run_with_kill(tmp_path / "mesh", victim, replicas)
    summary = found["summary"]
    print(_table_row(f"kill -9 {victim}, replicas {replicas}", found))
    # The victim was noticed, counted with its reason, and restarted under a new pid.
    assert summary["service_exits"] == {"signal.sigkill": 1}, found["stderr"][-2000:]
    assert summary["restarts"] == {victim: 1}
    assert f"{victim} exited (signal.sigkill)" in found["stderr"]
    assert found["after"][victim] != found["before"][victim]
    assert {k: v for k, v in found["after"].items() if k != victim} == {
        k: v for k, v in found["before"].items() if k != victim
    }
    # Nodes kept attesting after the kill, and nothing was lost or done twice.
    assert summary["attestations"] >= NODES * 8
    assert summary["lost"] == 0 and summary["duplicated"] == 0
    assert found["released_twice"] == 0
    # Every secret a node received is a sealed release record (the audit chain verified).
    assert found["released_in_audit"] == summary["secrets_released"]
    # Whatever rounds failed name a stage, never a crash.
    for reason in summary["failures_by_reason"]:
        assert reason.startswith("collector."), summary
    if replicas > 1:
        # The surviving replica kept serving: at most the rounds the victim held in flight
        # were late, and they completed within the node's decision timeout.
        assert summary["failed"] <= NODES, summary


def test_up_without_faults_counts_no_failures(tmp_path: Path) -> None:
    """The baseline row of the table: the same load with nothing killed."""
    found = run_with_kill(tmp_path / "mesh", None, 1)
    summary = found["summary"]
    print(_table_row("no fault", found))
    assert summary["failed"] == 0 and summary["restarts"] == {}
    assert summary["lost"] == 0 and summary["duplicated"] == 0
    assert found["released_in_audit"] == summary["secrets_released"] == summary["attestations"]
