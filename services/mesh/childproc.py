"""Child processes that end when the process that started them ends, however it ends.

Why this module: ``attestmesh up`` runs nats-server and the services as children. Stopped
properly (Ctrl-C, the end of ``--rounds``) it stops them itself; killed with SIGKILL it cannot,
and nats-server (a Go binary, in its own session) would keep running with its ports and store.
Linux's parent-death signal (``PR_SET_PDEATHSIG``, set in the child between fork and exec and
kept across exec) covers every kind of child without code inside it, but Linux sends it when
the *thread* that forked the child ends, not the process: a child started from a worker thread
(``up`` restarts a dead nats-server from one, via ``asyncio.to_thread``) would be killed when
that thread is retired, while ``up`` still needs it. So every such child is forked here, by one
thread that lives as long as the process (:func:`spawn` hands the work to it from whichever
thread calls).

Between fork and ``prctl`` the parent may already be gone; the child then checks its parent
is still the process that asked and exits at once if not, so that window leaks nothing either.
The signal is SIGTERM by default: nats-server then flushes its store, and a service closes
its connection, as when ``up`` stops them itself.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import IO

from services.mesh.errors import ConfigError

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[[int, ctypes.c_ulong], int] | None:
    """libc's ``prctl``, looked up once here: a forked child must not load libraries."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl: Callable[[int, ctypes.c_ulong], int] = libc.prctl
    except (OSError, AttributeError):
        return None
    return prctl


_prctl = _load_prctl()


def _dies_with(parent: int, death_signal: int) -> Callable[[], None]:
    """What the child runs before exec: ask for ``death_signal`` when its forking thread
    ends, then make sure ``parent`` did not end before the request was made."""
    signal_arg = ctypes.c_ulong(death_signal)  # prctl reads an unsigned long

    def preexec() -> None:
        if _prctl is None or _prctl(_PR_SET_PDEATHSIG, signal_arg) != 0:
            # Fail closed: Popen raises in the parent rather than start an unwatched child.
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:
            os._exit(125)  # the parent is gone already; nobody waits for this child

    return preexec


_Start = Callable[[], "subprocess.Popen[bytes]"]
_Job = tuple[_Start, "Future[subprocess.Popen[bytes]]"]


class _Spawner:
    """The one long-lived thread every child is forked from."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def _ensure_thread(self) -> None:
        with self._lock:
            # A forked copy of this process (rare) has no spawner thread: start its own.
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._jobs = queue.SimpleQueue()
                self._pid = os.getpid()
                # A daemon thread: it never blocks interpreter exit, and as an OS thread it
                # lasts until the process itself is gone.
                self._thread = threading.Thread(
                    target=self._serve, args=(self._jobs,), name="attestmesh-spawner", daemon=True
                )
                self._thread.start()

    @staticmethod
    def _serve(jobs: queue.SimpleQueue[_Job]) -> None:
        while True:
            start, result = jobs.get()
            if not result.set_running_or_notify_cancel():
                continue
            try:
                result.set_result(start())
            except Exception as exc:  # noqa: BLE001 - raised again in the caller by result()
                result.set_exception(exc)

    def run(self, start: _Start) -> subprocess.Popen[bytes]:
        self._ensure_thread()
        result: Future[subprocess.Popen[bytes]] = Future()
        self._jobs.put((start, result))
        return result.result()


_SPAWNER = _Spawner()
_Stream = int | IO[bytes] | None


def spawn(
    argv: list[str],
    *,
    stdout: _Stream,
    stderr: _Stream,
    env: Mapping[str, str] | None = None,
    start_new_session: bool = False,
    death_signal: int = signal.SIGTERM,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` (stdin from /dev/null) so that it gets ``death_signal`` when this
    process dies, whichever thread calls this."""
    if _prctl is None:
        raise ConfigError("childproc.unsupported", "no prctl here: children could be orphaned")
    preexec = _dies_with(os.getpid(), death_signal)

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=start_new_session,
            preexec_fn=preexec,  # noqa: PLW1509 - prctl and getppid only, nothing that locks
        )

    return _SPAWNER.run(start)
