"""A round whose decision never comes says which stage went silent, and a round never raises
because a service or the node's own connection went away (the real services, in process, on
a real nats-server; ``up`` adds the stage from what its operator connection sees). A
revocation is counted as one, not as a second (duplicated) decision."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.collector.service import CollectorNode
from services.collector.simulator.node import simulated_source
from services.mesh import events, subjects
from services.mesh.bus import Bus
from services.mesh.natskv import NatsKeyValue
from services.mesh.server import NatsServer
from services.policy import release_policy
from services.roundwatch import DECISION_LATE, NO_DECISION, NO_VERDICT, TIMEOUT, StageWatch
from services.testing.mesh import TestMesh


@pytest.fixture
async def mesh(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[TestMesh]:
    running = TestMesh(nats_server, tmp_path)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def watch(bus: Bus) -> StageWatch:
    found = StageWatch()
    await found.start(bus)
    return found


class _Gated:
    """A simulated source that holds its evidence until the test lets it go."""

    def __init__(self, mesh: TestMesh, name: str) -> None:
        self.inner = simulated_source("snp", mesh.pki, seed=7)
        self.family = "snp"
        self.simulated = True
        self.entered = threading.Event()
        self.go = threading.Event()

    def collect(self, report_data: bytes) -> events.Evidence:
        self.entered.set()
        assert self.go.wait(30)
        evidence: events.Evidence = self.inner.collect(report_data)
        return evidence


async def _until(condition: object, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not callable(condition) or not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.05)


async def _evidence_count(bus: Bus) -> int:
    info = await bus.js.stream_info(subjects.STREAM_EVIDENCE)
    return int(info.state.messages)


async def test_no_verdict_then_a_late_decision_once_the_verifier_is_back(
    mesh: TestMesh, bus: Bus, watch: StageWatch
) -> None:
    await mesh.start_policy()
    await mesh.start_broker()
    result = await mesh.node(bus, "node-v", decision_timeout=1.5).attest_once()
    assert (result.status, result.reason) == ("none", TIMEOUT) and result.evidence_id
    assert watch.attribute(result).reason == NO_VERDICT
    assert watch.unanswered([result]) == [result.evidence_id]

    await mesh.start_verifier()  # the evidence waited in its stream
    await _until(lambda: result.evidence_id in watch.decisions)
    assert watch.attribute(result).reason == DECISION_LATE
    assert watch.unanswered([result]) == []
    assert watch.late([result]) == 1 and watch.duplicated([result]) == 0


async def test_a_verdict_without_a_decision_blames_the_policy_service(
    mesh: TestMesh, bus: Bus, watch: StageWatch
) -> None:
    await mesh.start()
    source = _Gated(mesh, "node-p")
    node = CollectorNode(bus, "node-p", source, mesh.collector_trust(), decision_timeout=2.0)
    round_ = asyncio.create_task(node.attest_once())
    await _until(source.entered.is_set)
    await mesh.halt("policy")  # it issued the nonce, and is gone before the verdict
    source.go.set()
    result = await round_
    assert result.reason == TIMEOUT and result.evidence_id in watch.verdicts
    assert watch.attribute(result).reason == NO_DECISION


async def test_the_node_connection_closing_mid_round_is_a_failed_round_not_a_crash(
    mesh: TestMesh, nats_server: NatsServer, bus: Bus
) -> None:
    await mesh.start_policy()  # no verifier: the round waits for a decision
    node_bus = await Bus.connect(nats_server.url, "node-c")
    source = _Gated(mesh, "node-c")
    node = CollectorNode(node_bus, "node-c", source, mesh.collector_trust(), decision_timeout=2.0)
    round_ = asyncio.create_task(node.attest_once())
    await _until(source.entered.is_set)
    before = await _evidence_count(bus)
    source.go.set()
    deadline = asyncio.get_running_loop().time() + 10
    while await _evidence_count(bus) == before:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    await node_bus.nc.close()
    result = await round_  # used to raise ConnectionClosedError from the unsubscribe
    assert (result.status, result.released, result.reason) == ("none", False, TIMEOUT)
    assert result.evidence_id


DENY_ALL = (
    "package attestmesh.release\nimport rego.v1\n"
    'decision := {"allow": false, "reasons": ["all releases suspended"]}\n'
)


async def test_a_node_revoked_by_a_policy_change_is_revoked_not_duplicated(
    mesh: TestMesh, bus: Bus
) -> None:
    """A tightened policy withdraws the node's allow with a second, re-appraisal decision on
    the same evidence; the node then re-attests and is denied. That is one revocation and no
    duplicate, but only for a watch that can check the policy's signature on it."""
    await mesh.start()
    watch = StageWatch(trusted=mesh.collector_trust())
    blind = StageWatch()  # no policy key: cannot tell, so counts the worse case
    await watch.start(bus)
    await blind.start(bus)
    node = mesh.node(bus, "node-r")
    allowed = await node.attest_once()
    assert allowed.released

    policies = NatsKeyValue(await bus.key_value(subjects.BUCKET_POLICIES))
    await release_policy.store(policies, DENY_ALL, operator=mesh.operator_key)
    await _until(lambda: allowed.evidence_id in watch.revocations)
    await _until(lambda: len(blind.decisions.get(allowed.evidence_id, ())) == 2)
    denied = await node.attest_once()
    assert denied.status != "none" and not denied.allowed, denied
    results = [allowed, denied]
    assert watch.revoked(results) == 1 and watch.duplicated(results) == 0
    assert watch.unanswered(results) == [] and watch.decisions[allowed.evidence_id]
    assert blind.revoked(results) == 0 and blind.duplicated(results) == 1


async def test_a_stage_nobody_answers_is_named_and_a_refusal_is_not_masked() -> None:
    from services.collector.service import _stage
    from services.mesh.errors import BusError, Rejected

    async def unanswered() -> None:
        raise BusError("bus.unavailable", "NoRespondersError")

    async def refused() -> None:
        raise Rejected("broker.not_allowed", "secret not released")

    with pytest.raises(BusError) as silent:
        await _stage("collector.no_release", unanswered())
    assert silent.value.reason == "collector.no_release"
    assert silent.value.detail == "bus.unavailable"
    with pytest.raises(Rejected) as refusal:
        await _stage("collector.no_release", refused())
    assert refusal.value.reason == "broker.not_allowed"
