"""``attestmesh up`` under faults, as the fault tests drive it (``tests/test_faults.py``,
``tests/test_cluster.py``): a subprocess with its own servers, faults applied one at a time.

Several faults share one ``up``. Why: starting a mesh costs more than most faults do, and a
fault is over once every node has finished two rounds after it struck (the round in flight
then, however long whatever held it took, and one begun afterwards), so the next fault meets
a recovered mesh, and a fault's rounds are those that finished between it and its recovery.
Lost and duplicated attestations and double releases are counted over the whole run (by
``up`` itself, and from the release audit log): a run's zero is each of its faults' zero.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from services.embedded import node_names
from services.mesh import authconf
from services.mesh.server import NatsServer

LOST_REPLY = "broker.already_released"
"""The broker's answer when a node asks again for a release it already answered: the reply
was lost (the server frozen, the broker killed after answering), the node's retry is refused
(each decision is answered once) and it attests again. That release is in the audit log,
wrapped to a key only the failed round held: delivered to nobody."""

FAIL_CLOSED = frozenset({"policy.unavailable", "policy.refvalues_unavailable"})
"""Denies the policy service makes while it cannot read its buckets: during a server's loss
they are the fault's doing (counted and shown, not hidden), any other deny is not."""

RECOVERY_TIMEOUT_S = 90.0
"""Far beyond the 10 s ack wait ``up`` sets, after which whatever a killed process held is
redone; a fault not recovered from by then is a failure, not a slow machine."""


_REDIRECTING = ("OTEL_", "ATTESTMESH_")


def env() -> dict[str, str]:
    """The test's environment without settings that would redirect the mesh under test."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_REDIRECTING)}


def cli(*args: str) -> tuple[int, str, str]:
    """``attestmesh ARGS`` through its entry point, in this process: the same command as on
    the command line without the seconds a fresh interpreter costs on a busy machine, and
    with the settings the environment could add to the mesh's config left out. Returns the
    exit code, stdout and stderr."""
    from services.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(_REDIRECTING)}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.environ.update(saved)
    return code, out.getvalue(), err.getvalue()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass(frozen=True)
class Round:
    """One round as ``up`` printed it."""

    node: str
    status: str
    released: bool
    reason: str
    latency_ms: float

    @property
    def failed(self) -> bool:
        """No decision, or an allow without its secret (a policy's deny is a completed round)."""
        return self.status == "none" or self.reason.startswith("collector.")

    @property
    def denied(self) -> bool:
        """A decision that allowed nothing (a policy's deny, or one it made failing closed)."""
        return self.status != "none" and not self.released and not self.failed

    @property
    def explained(self) -> bool:
        """Failed for a reason a fault may cause: a stage that did not answer, or a lost reply."""
        return self.reason.startswith("collector.") or self.reason == LOST_REPLY


def parse_round(line: str) -> Round | None:
    """A round line (``node status outcome latency ms``); None for the banner and summary."""
    words = line.split()
    if len(words) < 4 or line.startswith(("attestmesh up:", "{")) or words[-1] != "ms":
        return None
    outcome = words[2:-2]
    released = outcome == ["secret", "released"]
    reason = "" if released else " ".join(outcome[1:])
    return Round(words[0], words[1], released, reason, float(words[-2]))


@dataclass(frozen=True)
class Phase:
    """One fault and the rounds that finished from it until the mesh had recovered."""

    name: str
    rounds: list[Round]
    recovered_s: float

    @property
    def failed(self) -> list[Round]:
        return [r for r in self.rounds if r.failed]

    @property
    def unexplained(self) -> list[Round]:
        """Failed rounds no fault accounts for (a crash, a refusal): there must be none."""
        return [r for r in self.failed if not r.explained]

    @property
    def denied(self) -> list[Round]:
        return [r for r in self.rounds if r.denied]

    @property
    def denied_unexpectedly(self) -> list[Round]:
        """Denies a fault does not account for (the policy's own are a tightening's doing)."""
        return [r for r in self.denied if r.reason not in FAIL_CLOSED]

    def row(self) -> str:
        """This fault's line of the README table."""
        latencies = sorted(r.latency_ms for r in self.rounds if r.released)
        p50 = statistics.median(latencies) if latencies else 0.0
        top = latencies[-1] if latencies else 0.0
        denied = Counter(r.reason for r in self.denied)
        return (
            f"| {self.name} | {len(self.rounds)} | {len(self.failed)} | {len(self.denied)} "
            f"| {sum(r.released for r in self.rounds)} | {p50:,.0f} / {top:,.0f} ms "
            f"| {self.recovered_s:.1f} s | {dict(denied) or ''}"
        )


class UpRun:
    """A running ``attestmesh up`` (a context manager: it never outlives the test)."""

    def __init__(self, tmp_path: Path, nodes: int, *options: str, interval: str = "0.3") -> None:
        self.data_dir = tmp_path / "mesh"
        self.errors = tmp_path / "up.stderr"
        self.output = tmp_path / "up.stdout"
        self.nodes = [name for name, _ in node_names(nodes)]
        self.command = [*options, "--nodes", str(nodes), "--interval", interval]
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self.summary: dict[str, Any] = {}

    def __enter__(self) -> UpRun:
        command = ["up", *self.command, "--data-dir", str(self.data_dir)]
        with self.errors.open("w") as stderr_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", *command],
                stdout=subprocess.PIPE,
                stderr=stderr_file,
                text=True,
                env=env(),
            )
        stdout = self.proc.stdout
        assert stdout is not None
        self._reader = threading.Thread(target=lambda: self.lines.extend(stdout), daemon=True)
        self._reader.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # a failed test: its children end with it (childproc)
            self.proc.wait()
        self.output.write_text("".join(self.lines))  # every round, for a failure's reader

    def stderr(self) -> str:
        return self.errors.read_text()

    def rounds(self) -> list[Round]:
        return [r for r in map(parse_round, list(self.lines)) if r is not None]

    def until(self, condition: Callable[[], bool], what: str, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"up exited before {what}: {self.stderr()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} in {timeout:.0f} s"
            time.sleep(0.05)

    def _each_node_finished(self, since: int, rounds: int) -> bool:
        finished = Counter(r.node for r in self.rounds()[since:])
        return all(finished[node] >= rounds for node in self.nodes)

    def warm_up(self) -> None:
        """Every node attested twice: the mesh is up and the first rounds' start-up is over."""
        self.until(lambda: self._each_node_finished(0, 2), "rounds from every node", 180)

    def fault(
        self,
        name: str,
        act: Callable[[], None],
        restarted: Callable[[int], bool] | None = None,
        *,
        takes_effect_after: bool = False,
    ) -> Phase:
        """Apply ``act``, then wait until ``restarted`` (if given; it is passed the index of
        the first round of the phase) and every node finished two more rounds. The phase
        starts before ``act``, or after it for a fault that ``act`` only completes (an
        operator's command)."""
        since, started = len(self.rounds()), time.monotonic()
        act()
        if takes_effect_after:
            since, started = len(self.rounds()), time.monotonic()
        self.until(
            lambda: (restarted is None or restarted(since)) and self._each_node_finished(since, 2),
            f"recovery from {name}",
            RECOVERY_TIMEOUT_S,
        )
        return Phase(name, self.rounds()[since:], time.monotonic() - started)

    def pids(self) -> dict[str, int]:
        found: dict[str, int] = json.loads((self.data_dir / "pids.json").read_text())
        return found

    def server_pid(self, member: str = "") -> int:
        """The pid of the single server, or of cluster member ``member`` (``n2``)."""
        store = self.data_dir / "nats-cluster" / member if member else self.data_dir / "nats"
        try:
            return int((store / "nats-server.pid").read_text())
        except (OSError, ValueError):  # being rewritten by a restart
            return 0

    def kill_service(self, victim: str, *, hang: float = 0.0) -> Phase:
        """SIGKILL one service process (first SIGSTOP it for ``hang`` s: it then dies holding
        work it was handed); ``up`` must restart it and no other."""
        before = self.pids()

        def act() -> None:
            if hang:
                os.kill(before[victim], signal.SIGSTOP)
                time.sleep(hang)
            os.kill(before[victim], signal.SIGKILL)

        def restarted(_: int) -> bool:
            return self.pids().get(victim, before[victim]) != before[victim]

        how = f"hung {hang:.0f} s, then kill -9" if hang else "kill -9"
        phase = self.fault(f"{how} {victim}", act, restarted)
        after = self.pids()
        assert {k: v for k, v in after.items() if k != victim} == {
            k: v for k, v in before.items() if k != victim
        }, f"{victim} died and so did another: {before} -> {after}"
        assert f"{victim} exited (signal.sigkill)" in self.stderr()
        return phase

    def kill_server(self, member: str) -> Phase:
        """SIGKILL one nats-server of a cluster; ``up`` must restart it on its ports and store."""
        old = self.server_pid(member)
        assert alive(old)

        def restarted(_: int) -> bool:
            new = self.server_pid(member)
            return new not in (0, old) and alive(new)

        return self.fault(
            f"kill -9 nats-server {member}", lambda: os.kill(old, signal.SIGKILL), restarted
        )

    def outage(self, seconds: float) -> Phase:
        """The single server stops answering for ``seconds`` (SIGSTOP, then SIGCONT)."""
        pid = self.server_pid()

        def act() -> None:
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(seconds)
            finally:
                os.kill(pid, signal.SIGCONT)

        return self.fault(f"nats-server outage, {seconds:.0f} s", act)

    def stop(self) -> dict[str, Any]:
        """Ctrl-C; ``up`` must exit cleanly and print its summary last."""
        assert self.proc is not None and self._reader is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)
        stderr = self.stderr()
        assert self.proc.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        self.summary = json.loads(self.lines[-1])
        return self.summary

    def audit(self) -> Counter[str]:
        """Verify the release audit chain and count its release records per decision, against
        whatever server the mesh's config names (the running one, or one brought back)."""
        code, out, err = cli("audit", "verify", "--data-dir", str(self.data_dir))
        assert code == 0, out + err
        code, out, err = cli("audit", "list", "--json", "--data-dir", str(self.data_dir))
        assert code == 0, err
        records = json.loads(out)
        return Counter(r["decision_id"] for r in records if r["outcome"] == "released")

    def audit_after_stop(self) -> Counter[str]:
        """The audit after ``up`` stopped, so it holds every release the nodes counted: the
        single server brought back on its store, the config pointed at it."""
        server = NatsServer(
            authconf.server_store_dir(self.data_dir),
            config_file=authconf.server_config_path(self.data_dir),
        )
        server.start()
        try:
            config_path = self.data_dir / "config.json"
            config = json.loads(config_path.read_text())
            config["nats_url"] = server.url
            config_path.write_text(json.dumps(config))
            return self.audit()
        finally:
            server.stop()
