"""Child-process supervision for ``attestmesh up``: restart what dies, with back-off.

Why a supervisor in ``up`` at all: the services recover on their own from a restart (durable
consumers resume, streams keep the work, KV keeps the state), so the one thing missing on a
single machine is someone to start them again. A dead child is never a reason for ``up`` to
exit; it is a counted failure with a reason (``exit.<code>`` or ``signal.<name>``) and a
restart after a delay that doubles with each failure in a row, up to a cap, so a child that
cannot start does not turn into a hot loop. A child that stayed up for ``stable_after``
seconds starts its next failure series from the base delay again.

The supervisor is polled (:meth:`Supervisor.poll`, or :meth:`Supervisor.run` in an event
loop) rather than woken by SIGCHLD, so it never competes with asyncio's own child watcher.
Each child's pid is written to ``pids_file`` whenever it changes, for operators and for the
fault tests that kill them. Children are started by :func:`services.mesh.childproc.spawn`, so
they end with the supervising process even when it is killed and cannot stop them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.mesh import childproc

DEFAULT_BASE_DELAY_S = 0.5
DEFAULT_MAX_DELAY_S = 30.0
DEFAULT_STABLE_AFTER_S = 30.0
POLL_INTERVAL_S = 0.2


def exit_reason(returncode: int) -> str:
    """A dotted reason for how a child ended: ``signal.sigkill``, ``exit.1``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"signal.{name.lower()}"
    return f"exit.{returncode}"


def backoff_delay(failures_in_a_row: int, *, base: float, cap: float) -> float:
    """The delay before restart number ``failures_in_a_row`` (1-based): base, 2x, 4x ... cap."""
    if failures_in_a_row < 1:
        return 0.0
    return float(min(cap, base * 2 ** min(failures_in_a_row - 1, 32)))


@dataclass(frozen=True)
class ChildSpec:
    """What to run for one supervised child, and where its output goes."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path


@dataclass(frozen=True)
class Failure:
    name: str
    reason: str
    restart_in: float


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    in_a_row: int = 0
    restart_at: float | None = None


@dataclass
class Supervisor:
    """Start, watch and restart a fixed set of children."""

    specs: list[ChildSpec]
    pids_file: Path | None = None
    on_failure: Callable[[Failure], None] | None = None
    prepare: Callable[[ChildSpec], ChildSpec] | None = None
    """Called before every start of a child, e.g. to replace a port another process took
    while the child was down (the same port again would only fail again)."""
    base_delay: float = DEFAULT_BASE_DELAY_S
    max_delay: float = DEFAULT_MAX_DELAY_S
    stable_after: float = DEFAULT_STABLE_AFTER_S
    clock: Callable[[], float] = time.monotonic
    failures: Counter[str] = field(default_factory=Counter)
    """Failures so far, by reason."""
    restarts: Counter[str] = field(default_factory=Counter)
    """Restarts so far, by child name."""
    _children: dict[str, _Child] = field(default_factory=dict)
    _stopping: bool = False

    def start(self) -> None:
        for spec in self.specs:
            child = self._children.setdefault(spec.name, _Child(spec))
            self._spawn(child)
        self._write_pids()

    def _spawn(self, child: _Child) -> None:
        if self.prepare is not None:
            child.spec = self.prepare(child.spec)
        spec = child.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with spec.log_path.open("ab") as log:  # the child keeps its own copy
            # SIGKILL if ``up`` dies, from whichever thread this restart runs on: a service
            # asked to stop gracefully then may wait on a server that died with ``up``, and
            # anything it held is redelivered (at-least-once) to the next one anyway.
            child.proc = childproc.spawn(
                spec.argv,
                env=spec.env,
                stdout=log,
                stderr=log,
                start_new_session=True,
                death_signal=signal.SIGKILL,
            )
        child.started_at = self.clock()
        child.restart_at = None

    def pids(self) -> dict[str, int]:
        """The pid of each child that is running (or has died and not yet been reaped)."""
        return {
            name: child.proc.pid
            for name, child in sorted(self._children.items())
            if child.proc is not None and child.restart_at is None
        }

    def _write_pids(self) -> None:
        if self.pids_file is None:
            return
        tmp = self.pids_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.pids(), indent=2) + "\n")
        os.replace(tmp, self.pids_file)

    def poll(self) -> list[Failure]:
        """Notice children that died (recording why) and restart those whose delay is over."""
        if self._stopping:
            return []
        now = self.clock()
        noticed: list[Failure] = []
        changed = False
        for name, child in self._children.items():
            if child.restart_at is None and child.proc is not None:
                code = child.proc.poll()
                if code is None:
                    continue
                if now - child.started_at >= self.stable_after:
                    child.in_a_row = 0
                child.in_a_row += 1
                delay = backoff_delay(child.in_a_row, base=self.base_delay, cap=self.max_delay)
                child.restart_at = now + delay
                failure = Failure(name, exit_reason(code), delay)
                self.failures[failure.reason] += 1
                noticed.append(failure)
                changed = True
                if self.on_failure is not None:
                    self.on_failure(failure)
            elif child.restart_at is not None and now >= child.restart_at:
                self._spawn(child)
                self.restarts[name] += 1
                changed = True
        if changed:
            self._write_pids()
        return noticed

    def running(self) -> list[str]:
        return [
            name
            for name, child in self._children.items()
            if child.proc is not None and child.restart_at is None and child.proc.poll() is None
        ]

    async def run(self, stop: asyncio.Event, interval: float = POLL_INTERVAL_S) -> None:
        while not stop.is_set():
            self.poll()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every child, wait, then SIGKILL what is left; no restarts after this."""
        self._stopping = True
        procs = [c.proc for c in self._children.values() if c.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.pids_file is not None:
            self.pids_file.unlink(missing_ok=True)  # stale pids could name someone else later
