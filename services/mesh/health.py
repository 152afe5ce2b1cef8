"""Liveness without a network port: a service touches a file while it is connected to NATS,
and ``attestmesh health`` (a Kubernetes exec probe) checks that the file is fresh.

A service that lost the bus for longer than the probe's window, or whose event loop is wedged,
stops touching the file and gets restarted; one that is merely idle keeps it fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from services.mesh.bus import Bus


class Heartbeat:
    def __init__(self, path: Path, bus: Bus, *, interval: float = 5.0) -> None:
        self.path = path
        self.bus = bus
        self.interval = interval

    def beat(self) -> None:
        """Record that the service is alive now (atomic replace of the file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        partial.write_text(f"{time.time():.3f}\n")
        os.replace(partial, self.path)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.bus.nc.is_connected:
                self.beat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
        with contextlib.suppress(OSError):
            self.path.unlink()


def check(path: Path, max_age: float, *, now: Callable[[], float] = time.time) -> str | None:
    """``None`` when ``path`` was touched within ``max_age`` seconds, else what is wrong."""
    try:
        stamp = float(path.read_text(encoding="ascii").strip())
    except FileNotFoundError:
        return f"{path} does not exist: the service has not connected yet"
    except (OSError, ValueError) as exc:
        return f"{path} is unreadable: {exc}"
    age = now() - stamp
    if age > max_age:
        return f"last heartbeat {age:.0f} s ago (limit {max_age:.0f} s)"
    return None
