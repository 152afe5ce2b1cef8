"""The supervisor of ``attestmesh up`` on real child processes: it notices a death and why,
restarts with doubling, capped delays, keeps ``pids.json`` current and stops everything."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from services.supervisor import (
    ChildSpec,
    Failure,
    Supervisor,
    backoff_delay,
    exit_reason,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _spec(tmp_path: Path, name: str, code: str) -> ChildSpec:
    return ChildSpec(name, [sys.executable, "-c", code], dict(os.environ), tmp_path / f"{name}.log")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _wait_dead(supervisor: Supervisor, name: str) -> None:
    deadline = time.monotonic() + 10
    while name in supervisor.running():
        assert time.monotonic() < deadline, f"{name} did not exit"
        time.sleep(0.02)


def test_reasons_name_the_signal_or_the_exit_code() -> None:
    assert exit_reason(-signal.SIGKILL) == "signal.sigkill"
    assert exit_reason(-signal.SIGSEGV) == "signal.sigsegv"
    assert exit_reason(3) == "exit.3"
    assert exit_reason(0) == "exit.0"


def test_back_off_doubles_up_to_the_cap() -> None:
    delays = [backoff_delay(n, base=0.5, cap=5.0) for n in range(1, 8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert backoff_delay(10_000, base=0.5, cap=30.0) == 30.0


def test_a_killed_child_is_restarted_after_the_delay_with_a_new_pid(tmp_path: Path) -> None:
    clock = FakeClock()
    seen: list[Failure] = []
    pids_file = tmp_path / "pids.json"
    supervisor = Supervisor(
        [
            _spec(tmp_path, "victim", "import time; time.sleep(60)"),
            _spec(tmp_path, "bystander", "import time; time.sleep(60)"),
        ],
        pids_file=pids_file,
        on_failure=seen.append,
        clock=clock,
    )
    supervisor.start()
    try:
        first = json.loads(pids_file.read_text())
        assert set(first) == {"victim", "bystander"}
        os.kill(first["victim"], signal.SIGKILL)
        _wait_dead(supervisor, "victim")
        assert supervisor.poll() == [Failure("victim", "signal.sigkill", 0.5)]
        assert seen == [Failure("victim", "signal.sigkill", 0.5)]
        assert "victim" not in json.loads(pids_file.read_text())  # no stale pid while down
        clock.now += 0.4
        assert supervisor.poll() == [] and supervisor.restarts == {}
        clock.now += 0.2
        supervisor.poll()
        second = json.loads(pids_file.read_text())
        assert second["bystander"] == first["bystander"]
        assert second["victim"] != first["victim"] and _alive(second["victim"])
        assert supervisor.restarts == {"victim": 1}
        assert supervisor.failures == {"signal.sigkill": 1}
    finally:
        supervisor.stop()
    assert not _alive(second["victim"]) and not _alive(second["bystander"])
    assert not pids_file.exists()
    assert supervisor.poll() == []  # nothing is restarted once stopping


def test_a_crash_looping_child_backs_off_and_a_stable_one_starts_over(tmp_path: Path) -> None:
    clock = FakeClock()
    supervisor = Supervisor(
        [_spec(tmp_path, "crasher", "raise SystemExit(3)")],
        clock=clock,
        base_delay=0.5,
        max_delay=2.0,
        stable_after=30.0,
    )
    supervisor.start()
    delays = []
    try:
        for _ in range(5):
            _wait_dead(supervisor, "crasher")
            (failure,) = supervisor.poll()
            assert failure.reason == "exit.3"
            delays.append(failure.restart_in)
            clock.now += failure.restart_in
            supervisor.poll()
        assert delays == [0.5, 1.0, 2.0, 2.0, 2.0]
        assert supervisor.restarts == {"crasher": 5}
        # After a run longer than stable_after, the next failure waits the base delay again.
        _wait_dead(supervisor, "crasher")
        clock.now += 31.0
        (failure,) = supervisor.poll()
        assert failure.restart_in == 0.5
    finally:
        supervisor.stop()
    assert supervisor.failures == {"exit.3": 6}


@pytest.mark.parametrize("replicas", [1, 3])
def test_replicas_share_a_service_identity(replicas: int) -> None:
    from services.embedded import identity_of, service_commands

    commands = service_commands(replicas)
    assert len(commands) == 5 * replicas
    identities = {name: identity_of(name) for name in commands}
    assert set(identities.values()) == {
        "verifier-snp",
        "verifier-nitro",
        "verifier-tpm",
        "policy",
        "broker",
    }
    assert identities.get("policy-3", "policy") == "policy"
    assert commands.get("broker-2", ["broker"]) == ["broker"]


def test_a_restart_gets_a_new_metrics_port_if_its_old_one_was_taken(tmp_path: Path) -> None:
    import socket

    from services.embedded import Mesh
    from services.mesh import config as config_mod

    config = config_mod.load(None, data_dir=str(tmp_path))
    mesh = Mesh(config, tmp_path / "config.json", tmp_path / "logs")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        mesh.metrics_ports["policy"] = taken
        spec = ChildSpec("policy", ["true"], {"ATTESTMESH_METRICS_PORT": str(taken)}, tmp_path)
        moved = mesh._fresh_port(spec)
    port = int(moved.env["ATTESTMESH_METRICS_PORT"])
    assert port != taken and mesh.metrics_ports["policy"] == port
    urls = json.loads((tmp_path / "metrics.json").read_text())
    assert urls["policy"] == f"http://127.0.0.1:{port}/metrics"
    assert mesh._fresh_port(moved) is moved  # a free port is kept


def test_every_start_goes_through_prepare(tmp_path: Path) -> None:
    clock = FakeClock()
    prepared: list[str] = []

    def prepare(spec: ChildSpec) -> ChildSpec:
        prepared.append(spec.name)
        return spec

    supervisor = Supervisor(
        [_spec(tmp_path, "once", "raise SystemExit(1)")], clock=clock, prepare=prepare
    )
    supervisor.start()
    try:
        _wait_dead(supervisor, "once")
        supervisor.poll()
        clock.now += 1.0
        supervisor.poll()
    finally:
        supervisor.stop()
    assert prepared == ["once", "once"]
