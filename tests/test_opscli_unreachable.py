"""No operator command hangs: against a server that refuses connections, one that accepts
TCP but never speaks NATS, and one without JetStream, every admin command exits 2 with a
one-line reason, within 15 s (connecting gets 10 s by default)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.broker.sealing import KeyFileSource
from services.mesh.keys import SigningKey
from services.mesh.server import binary
from services.policy.engine import default_policy

ROOT = Path(__file__).resolve().parent.parent
BOUND_S = 15.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """Accepts connections and never sends a byte (a firewall or a wrong service)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    try:
        yield f"nats://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


def _data_dir(tmp_path: Path, url: str) -> Path:
    data_dir = tmp_path / "mesh"
    data_dir.mkdir(mode=0o700)
    (data_dir / "config.json").write_text(json.dumps({"nats_url": url, "data_dir": str(data_dir)}))
    SigningKey.load_or_create("operator", data_dir / "keys")
    KeyFileSource.in_data_dir(data_dir, create=True).sealing_key()
    (tmp_path / "release.rego").write_text(default_policy())
    (tmp_path / "value").write_bytes(b"secret-value")
    return data_dir


def _commands(tmp_path: Path) -> list[list[str]]:
    return [
        ["policy", "show"],
        ["policy", "history"],
        ["policy", "set", str(tmp_path / "release.rego")],
        ["policy", "rollback", "1"],
        ["refvalues", "list"],
        ["refvalues", "add", "snp", "measurement", "ab" * 48],
        ["refvalues", "remove", "snp", "measurement", "ab" * 48],
        ["secret", "list"],
        ["secret", "put", "default/key/app", str(tmp_path / "value")],
        ["secret", "delete", "default/key/app"],
        ["audit", "list"],
    ]


BATCH = 4
"""Commands run at once: they mostly wait, but a dozen Python start-ups at once on a small
machine would eat into the time being measured."""


def _run_all(argvs: list[list[str]], extra: list[str]) -> list[tuple[list[str], int, str, float]]:
    results = []
    for start in range(0, len(argvs), BATCH):
        results.extend(_run_batch(argvs[start : start + BATCH], extra))
    return results


def _run_batch(argvs: list[list[str]], extra: list[str]) -> list[tuple[list[str], int, str, float]]:
    """Run ``argvs`` at once, each timed on its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ATTESTMESH_"))}
    env["PYTHONPATH"] = str(ROOT)
    started = []
    for argv in argvs:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *argv, *extra],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append((argv, proc, time.monotonic()))
    results = []
    for argv, proc, t0 in started:
        try:
            _, err = proc.communicate(timeout=BOUND_S * 3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"{argv} hung")
        results.append((argv, proc.returncode, err, time.monotonic() - t0))
    return results


def _assert_bounded(results: list[tuple[list[str], int, str, float]], reason: str) -> None:
    for argv, code, err, elapsed in results:
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (argv, err)
        assert lines[0].startswith(f"attestmesh: {reason}"), (argv, err)
        assert elapsed < BOUND_S, (argv, elapsed)


def test_commands_against_a_refusing_server_exit_2_in_time(tmp_path: Path) -> None:
    """The first batch waits out the default 10 s; the rest, with a shorter --timeout, show
    each command honours it without spending the default again (audit has no --timeout)."""
    data_dir = _data_dir(tmp_path, f"nats://127.0.0.1:{_free_port()}")
    commands = _commands(tmp_path)
    target = ["--data-dir", str(data_dir)]
    audit = [c for c in commands if c[0] == "audit"]
    others = [c for c in commands if c[0] != "audit"]
    first, rest = audit + others[: BATCH - len(audit)], others[BATCH - len(audit) :]
    results = _run_all(first, target)
    results += _run_all(rest, [*target, "--timeout", "2"])
    _assert_bounded(results, "bus.")


def test_commands_against_a_silent_server_exit_2_in_time(
    tmp_path: Path, silent_listener: str
) -> None:
    data_dir = _data_dir(tmp_path, "nats://127.0.0.1:1")
    # --nats outranks the config file: the commands go to the silent listener.
    extra = ["--data-dir", str(data_dir), "--nats", silent_listener]
    # One command of each kind (audit has no --nats).
    commands = [c for c in _commands(tmp_path) if c[1] in {"show", "add", "put"}]
    _assert_bounded(_run_all(commands, extra), "bus.")


def test_a_server_without_jetstream_is_an_error_not_a_wait(tmp_path: Path) -> None:
    port = _free_port()
    server = subprocess.Popen(
        [str(binary()), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        data_dir = _data_dir(tmp_path, f"nats://127.0.0.1:{port}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        extra = ["--data-dir", str(data_dir), "--timeout", "2"]
        _assert_bounded(_run_all([["refvalues", "list"], ["secret", "list"]], extra), "bus.")
    finally:
        server.terminate()
        server.wait(timeout=10)
