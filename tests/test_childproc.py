"""Children started through ``services.mesh.childproc`` end with the process that started
them (even killed with SIGKILL), and only then: not when the thread that asked for them ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from services.mesh import childproc


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_child_outlives_the_short_lived_thread_that_started_it() -> None:
    started: list[subprocess.Popen[bytes]] = []
    asker = threading.Thread(
        target=lambda: started.append(
            childproc.spawn(["sleep", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
    )
    asker.start()
    asker.join()
    (child,) = started
    try:
        time.sleep(0.5)  # a parent-death signal tied to that thread would have fired by now
        assert child.poll() is None, f"killed with its thread (exit {child.returncode})"
    finally:
        child.kill()
        child.wait()


PARENT = """
import subprocess, sys, threading
from services.mesh import childproc
done = []
def ask():
    done.append(childproc.spawn(["sleep", "30"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True))
worker = threading.Thread(target=ask)
worker.start()
worker.join()
print(done[0].pid, flush=True)
sys.stdin.read()
"""


def test_children_end_when_their_parent_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert _alive(child)
        parent.kill()  # SIGKILL: the parent gets no chance to stop anything itself
        parent.wait()
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(child), "the child outlived its killed parent"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()
