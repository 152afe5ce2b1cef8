"""Heartbeats on a real nats-server: fresh while connected, stale once the bus is gone."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from services.cli import main
from services.mesh.bus import Bus
from services.mesh.health import Heartbeat, check
from services.mesh.server import NatsServer


async def test_the_heartbeat_stops_while_nats_is_down(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    path = tmp_path / "health"
    bus = await Bus.connect(nats_server.url, "beating")
    stop = asyncio.Event()
    beating = asyncio.create_task(Heartbeat(path, bus, interval=0.05).run(stop))
    try:
        await asyncio.sleep(0.2)
        assert check(path, 1.0) is None
        nats_server.stop()
        await asyncio.sleep(0.3)
        before = path.read_text()
        await asyncio.sleep(0.3)
        assert path.read_text() == before  # no beats while disconnected
        assert check(path, 0.2) is not None
        nats_server.start()
        await asyncio.sleep(1.5)
        assert check(path, 0.5) is None  # beats again after reconnecting
    finally:
        stop.set()
        await beating
        await bus.close()
    assert not path.exists()


def test_check_reports_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "health"
    assert "does not exist" in (check(path, 10) or "")
    path.write_text("garbage")
    assert "unreadable" in (check(path, 10) or "")
    path.write_text(f"{time.time() - 100}")
    assert "100 s ago" in (check(path, 10) or "") or "99 s ago" in (check(path, 10) or "")


def test_health_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "health"
    path.write_text(f"{time.time()}")
    assert main(["health", "--file", str(path), "--max-age", "30"]) == 0
    path.write_text(f"{time.time() - 120}")
    assert main(["health", "--file", str(path), "--max-age", "30"]) == 1
    assert "unhealthy" in capsys.readouterr().err
