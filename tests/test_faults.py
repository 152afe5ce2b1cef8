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
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

from services.mesh import authconf
from services.mesh.server import NatsServer

pytestmark = pytest.mark.slow

NODES = 6
INTERVAL = "0.3"
BEFORE_KILL_S = 1.0
AFTER_KILL_S = 12.0
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


def _wait_for(
    condition: Callable[[], bool], proc: subprocess.Popen[str], what: str, errors: Path
) -> None:
    deadline = time.monotonic() + 90
    while not condition():
        assert proc.poll() is None, f"up exited before {what}: {errors.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in 90 s"
        time.sleep(0.1)


def run_with_kill(
    data_dir: Path, victim: str | None, replicas: int, hang: float = 0.0
) -> dict[str, Any]:
    """Run ``up``, SIGKILL ``victim`` (a name from pids.json) once rounds are flowing; return
    what was counted, with the summary, the audit records and the pids before and after.

    With ``hang`` the victim is first stopped (SIGSTOP) for that long, so it dies holding
    work: requests and messages the server handed it that it never answered or acked."""
    command = ["up", "--nodes", str(NODES), "--interval", INTERVAL]
    command += ["--replicas", str(replicas), "--data-dir", str(data_dir)]
    errors = data_dir.parent / "up.stderr"
    with errors.open("w") as stderr_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *command],
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            text=True,
            env=_env(),
        )
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        pids_file = data_dir / "pids.json"
        _wait_for(lambda: _rounds(lines) >= 2 * NODES, proc, "rounds", errors)
        before = json.loads(pids_file.read_text())
        assert len(before) == 5 * replicas
        time.sleep(BEFORE_KILL_S)
        at_kill = _rounds(lines)
        if victim is not None:
            if hang:
                os.kill(before[victim], signal.SIGSTOP)
                time.sleep(hang)
            os.kill(before[victim], signal.SIGKILL)
        time.sleep(AFTER_KILL_S)
        after = json.loads(pids_file.read_text())
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(10)
    stderr = errors.read_text()
    stdout = "".join(lines)
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
        "rounds_after_kill": _rounds(lines) - at_kill,
        "before": before,
        "after": after,
        "released_in_audit": sum(released.values()),
        "released_twice": sum(1 for n in released.values() if n > 1),
    }


def _read_lines(stream: IO[str], into: list[str]) -> None:
    for line in stream:
        into.append(line)


def _rounds(lines: list[str]) -> int:
    """Round lines printed so far (not the banner, not the summary)."""
    return sum(1 for line in list(lines) if not line.startswith(("attestmesh up:", "{")))


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
        f"| {found['released_twice']} | {s['latency_ms']['p99']:.0f} ms "
        f"| {s['latency_ms']['max']:.0f} ms "
        f"| {sum(s['restarts'].values())} | {s['failures_by_reason'] or '-'} |"
    )


SCENARIOS = [
    ("verifier-snp", 1, 0.0),
    ("policy", 1, 0.0),
    ("broker", 1, 0.0),
    ("verifier-snp", 2, 0.0),
    ("policy", 2, 0.0),
    ("broker", 2, 0.0),
    ("policy", 2, 1.0),
]


@pytest.mark.parametrize(("victim", "replicas", "hang"), SCENARIOS)
def test_kill_9_of_a_service_loses_and_duplicates_nothing(
    tmp_path: Path, victim: str, replicas: int, hang: float
) -> None:
    found = run_with_kill(tmp_path / "mesh", victim, replicas, hang)
    summary = found["summary"]
    how = f"hang {hang:.0f} s, then kill -9" if hang else "kill -9"
    print(_table_row(f"{how} {victim}, replicas {replicas}", found))
    # The victim was noticed, counted with its reason, and restarted under a new pid.
    assert summary["service_exits"] == {"signal.sigkill": 1}, found["stderr"][-2000:]
    assert summary["restarts"] == {victim: 1}
    assert f"{victim} exited (signal.sigkill)" in found["stderr"]
    assert found["after"][victim] != found["before"][victim]
    assert {k: v for k, v in found["after"].items() if k != victim} == {
        k: v for k, v in found["before"].items() if k != victim
    }
    # Nodes kept attesting after the kill, and nothing was lost or done twice.
    assert found["rounds_after_kill"] >= NODES * 5, summary
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
