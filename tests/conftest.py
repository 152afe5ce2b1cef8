"""Shared fixtures: a real nats-server per test on a loopback port the server picks itself."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.mesh import telemetry
from services.mesh.bus import Bus
from services.mesh.cluster import LocalCluster
from services.mesh.server import NatsServer
from services.testing.mesh import TestMesh
from services.testing.vectors import roots_dir
from services.verifier.trust import TrustStore


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """Three nats-servers on loopback forming one JetStream cluster."""
    running = LocalCluster(tmp_path / "cluster", size=3)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
async def mesh(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[TestMesh]:
    """The whole mesh in this process (one verifier per family, policy, broker) on a real
    nats-server, as the flow and attack tests drive it."""
    running = TestMesh(nats_server, tmp_path)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    connection = await Bus.connect(nats_server.url, "test")
    await connection.setup(nonce_ttl=60.0)
    try:
        yield connection
    finally:
        await connection.close()


_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="session", autouse=True)
def _telemetry() -> None:
    """Logs to stderr (stdout belongs to the CLI under test) and spans kept in memory."""
    telemetry.configure(
        "tests", level="warning", stream=sys.stderr, extra_processor=SimpleSpanProcessor(_EXPORTER)
    )


@pytest.fixture(autouse=True)
def _logging_kept() -> Iterator[None]:
    """A test that runs ``attestmesh`` admin commands points logging at its own captured
    stderr, which is closed when it ends; put back the session's, so later tests can log."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def spans() -> InMemorySpanExporter:
    """Every span the in-process services finish, for trace-continuity assertions."""
    return _EXPORTER


@pytest.fixture(scope="session")
def store() -> TrustStore:
    """The vendor trust anchors of the shared vectors (tests using it skip without them)."""
    roots = roots_dir()
    assert roots is not None, "guard the test with the vectors' skipif"
    return TrustStore.load(roots)


@pytest.fixture(scope="session")
def identities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Fresh chart identities from deploy/gen-identities.py (public, private, files)."""
    from tests.chart import make_identities

    return make_identities(tmp_path_factory)


@pytest.fixture(scope="session")
def renders(identities: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The chart rendered with default, custom and cert-manager values."""
    from tests.chart import render_all

    return render_all(identities)
