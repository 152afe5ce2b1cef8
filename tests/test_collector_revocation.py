"""A collector consumes its own revocations, on a real nats-server: it drops what it holds
within a second, re-attests at once (back in a round after a transient revocation, still
denied while it keeps failing, and without re-attesting in a loop), survives junk on its
revocation subject, and only the broker can revoke it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from services.collector.revocations import OTHER_REASON, WRONG_NODE, reason_code
from services.collector.secrets import HeldSecrets
from services.collector.service import (
    DEFAULT_RESOURCE,
    REVOKED_DURING_ROUND,
    CollectorNode,
    RoundResult,
)
from services.collector.simulator.node import simulated_source
from services.mesh import events, identities, subjects
from services.mesh.bus import Bus
from services.mesh.errors import ConfigError
from services.mesh.natskv import NatsKeyValue
from services.mesh.server import NatsServer
from services.policy import release_policy
from services.testing.mesh import TestMesh
from services.testing.natsauth import authenticated_server, not_refused

DENY_ALL = (
    "package attestmesh.release\nimport rego.v1\n"
    'decision := {"allow": false, "reasons": ["all releases suspended"]}\n'
)
LONG_INTERVAL = 60.0
"""Longer than any test: a round that follows quickly was started by a revocation."""


class Running:
    """A collector running its continuous loop (as ``attestmesh collector`` runs it)."""

    def __init__(self, node: CollectorNode) -> None:
        self.node = node
        self.stop = asyncio.Event()
        self.results: asyncio.Queue[RoundResult] = asyncio.Queue()
        self.task = asyncio.create_task(
            node.run(self.stop, interval=LONG_INTERVAL, results=self.results)
        )

    async def next(self, within: float = 10.0) -> RoundResult:
        return await asyncio.wait_for(self.results.get(), within)

    async def halt(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)


async def _until(condition: object, within: float) -> float:
    """Seconds until ``condition()`` holds (polled every 5 ms), failing after ``within``."""
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() - started < within, "condition never held"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def _announced(bus: Bus, node: str) -> asyncio.Queue[float]:
    """When each revocation of ``node`` reached an observer (monotonic time)."""
    seen: asyncio.Queue[float] = asyncio.Queue()

    async def on_msg(_: Msg) -> None:
        seen.put_nowait(time.monotonic())

    await bus.nc.subscribe(subjects.revoked(node), cb=on_msg)
    return seen


def test_held_secrets_are_overwritten_on_drop_and_never_shown() -> None:
    held = HeldSecrets(max_held=2)
    held.put("default/key/a", b"first-value")
    buffer = held._values["default/key/a"]
    held.put("default/key/a", b"second-value")
    assert bytes(buffer) == bytes(len(b"first-value"))  # the replaced value was overwritten
    held.put("default/key/b", b"other")
    buffers = list(held._values.values())
    assert "second-value" not in repr(held) and repr(held) == "HeldSecrets(held=2)"
    with pytest.raises(ConfigError) as full:
        held.put("default/key/c", b"x")
    assert full.value.reason == "collector.too_many_secrets"
    assert held.drop() == 2
    assert all(not any(b) for b in buffers), "a dropped value survived in its buffer"
    assert held.get("default/key/a") is None and len(held) == 0 and held.drop() == 0


def test_a_revocation_reason_is_bounded_before_anyone_logs_it() -> None:
    assert reason_code("policy.denied") == "policy.denied"
    for junk in ("", "x" * 200, "policy denied", "a.b\nc", "policy.denied." + "x" * 40):
        assert reason_code(junk) == OTHER_REASON


async def test_a_revoked_node_drops_its_secret_at_once_and_stays_denied(
    mesh: TestMesh, bus: Bus
) -> None:
    received: dict[str, bytes] = {}
    running = Running(mesh.node(bus, "node-r", received=received))
    node = running.node
    try:
        first = await running.next()
        assert first.released and node.secrets.get(DEFAULT_RESOURCE) == mesh.secret
        assert received["node-r"] == mesh.secret
        announced = await _announced(bus, "node-r")
        policies = NatsKeyValue(await bus.key_value(subjects.BUCKET_POLICIES))
        await release_policy.store(policies, DENY_ALL, operator=mesh.operator_key)
        revoked_at = await asyncio.wait_for(announced.get(), 10)
        await _until(lambda: len(node.secrets) == 0, within=1.0)
        dropped_after = time.monotonic() - revoked_at
        assert "node-r" not in received, "the embedding application was not told"
        # It re-attests at once rather than in a minute, and the policy still denies it.
        again = await running.next(within=5.0)
        assert not again.allowed and not again.released
        assert len(node.secrets) == 0
        # The broker announces that deny too; the node knew already, so no round follows.
        await asyncio.sleep(1.0)
        assert running.results.empty(), "the node re-attested in a loop"
        assert node.revocations.received >= 1 and not node.revocations.ignored
        print(f"secret dropped {dropped_after * 1000:.1f} ms after the revocation")
    finally:
        await running.halt()


async def test_a_node_revoked_by_a_transient_failure_is_back_within_a_round(
    mesh: TestMesh, bus: Bus
) -> None:
    received: dict[str, bytes] = {}
    running = Running(mesh.node(bus, "node-t", received=received))
    node = running.node
    try:
        assert (await running.next()).released
        # What the broker announces after a deny that no longer holds (a reference-value
        # bucket briefly unreadable, a collateral fetch that failed).
        revocation = events.Revocation(node="node-t", reason="policy.refvalues_unavailable")
        started = time.monotonic()
        await bus.publish(subjects.revoked("node-t"), revocation)
        recovered = await running.next(within=5.0)
        took = time.monotonic() - started
        assert recovered.released and recovered.reason == ""
        assert node.revocations.received == 1
        assert node.secrets.get(DEFAULT_RESOURCE) == mesh.secret
        assert received["node-t"] == mesh.secret
        assert took < 5.0
        await asyncio.sleep(0.5)
        assert running.results.empty()
    finally:
        await running.halt()
    # Once the collector stops, it no longer listens: a revocation then changes nothing here.
    await bus.publish(subjects.revoked("node-t"), revocation)
    await asyncio.sleep(0.2)
    assert node.revocations.received == 1


async def test_junk_on_the_revocation_subject_is_counted_and_ignored(
    mesh: TestMesh, bus: Bus
) -> None:
    running = Running(mesh.node(bus, "node-j"))
    node = running.node
    try:
        assert (await running.next()).released
        subject = subjects.revoked("node-j")
        valid = json.loads(events.encode(events.Revocation(node="node-j", reason="policy.denied")))
        junk = [
            b"not json",
            b"{}",
            b"[" * 100 + b"]" * 100,
            json.dumps({**valid, "schema_version": 99}).encode(),
            json.dumps({**valid, "node": "node-x"}).encode(),
            json.dumps({**valid, "node": "a.b"}).encode(),
            json.dumps({**valid, "surprise": True}).encode(),
            b"\xff" * 4096,
        ]
        for payload in junk:
            await bus.nc.publish(subject, payload)
        await bus.nc.flush()
        await _until(lambda: sum(node.revocations.ignored.values()) == len(junk), within=2.0)
        assert node.revocations.ignored[WRONG_NODE] == 1
        assert set(node.revocations.ignored) <= {
            WRONG_NODE,
            "wire.malformed",
            "wire.invalid",
            "wire.schema_version",
        }
        assert node.secrets.get(DEFAULT_RESOURCE) == mesh.secret
        assert node.revocations.received == 0 and running.results.empty()
        # Still listening: a well-formed revocation after all that is acted on.
        await bus.nc.publish(subject, json.dumps(valid).encode())
        await _until(lambda: len(node.secrets) == 0, within=1.0)
        assert (await running.next(within=5.0)).released
    finally:
        await running.halt()


class RevokedWhileCollecting:
    """A simulated SNP source during whose first collection the node is revoked (as a
    re-evaluation landing mid-round would be): it waits until the node has taken the
    revocation in, then lets the round go on."""

    family = "snp"
    simulated = True

    def __init__(self, inner: object, bus: Bus, loop: asyncio.AbstractEventLoop) -> None:
        self.inner, self.bus, self.loop = inner, bus, loop
        self.node: CollectorNode | None = None
        self.collected = 0

    async def _revoke(self) -> None:
        assert self.node is not None
        revocation = events.Revocation(node=self.node.node, reason="policy.denied")
        await self.bus.publish(subjects.revoked(self.node.node), revocation)
        await _until(lambda: self.node is not None and self.node.revocations.received, 2.0)

    def collect(self, report_data: bytes) -> events.Evidence:
        self.collected += 1
        if self.collected == 1:
            asyncio.run_coroutine_threadsafe(self._revoke(), self.loop).result(5)
        evidence: events.Evidence = self.inner.collect(report_data)  # type: ignore[attr-defined]
        return evidence


async def test_a_secret_released_to_a_round_that_saw_a_revocation_is_not_kept(
    mesh: TestMesh, bus: Bus
) -> None:
    source = RevokedWhileCollecting(
        simulated_source("snp", mesh.pki, seed=7), bus, asyncio.get_running_loop()
    )
    handed: list[bytes] = []
    node = CollectorNode(
        bus,
        "node-m",
        source,
        mesh.collector_trust(),
        on_secret=lambda _resource, value: handed.append(value),
    )
    source.node = node
    running = Running(node)
    try:
        first = await running.next()
        # Released by the broker (and audited), but the node cannot tell whether the
        # revocation was about this round's decision: it keeps nothing and asks again.
        assert first.released and first.reason == REVOKED_DURING_ROUND
        second = await running.next(within=5.0)
        assert second.released and second.reason == ""
        assert handed == [mesh.secret] and node.secrets.get(DEFAULT_RESOURCE) == mesh.secret
    finally:
        await running.halt()


@pytest.fixture
def auth_nats(tmp_path: Path) -> Iterator[tuple[NatsServer, dict[str, str]]]:
    with authenticated_server(tmp_path / "data", nodes=("node-a", "node-b")) as started:
        yield started


async def _as(server: NatsServer, seeds: dict[str, str], identity: str, inbox: str) -> Bus:
    return await Bus.connect(
        server.url, identity, wait=5.0, nkey_seed_file=seeds[identity], inbox_prefix=inbox
    )


async def test_only_the_broker_can_revoke_a_node(
    auth_nats: tuple[NatsServer, dict[str, str]], tmp_path: Path
) -> None:
    server, seeds = auth_nats
    mesh = TestMesh(server, tmp_path / "mesh", seeds=seeds)
    await mesh.start()
    node_a = await _as(server, seeds, "node-node-a", subjects.node_inbox("node-a"))
    broker = await _as(server, seeds, identities.BROKER, subjects.inbox(identities.BROKER))
    running = Running(mesh.node(node_a, "node-a"))
    node = running.node
    try:
        assert (await running.next()).released
        victim = subjects.revoked("node-a")
        for identity, inbox in (
            ("node-node-b", subjects.node_inbox("node-b")),
            ("node-node-a", subjects.node_inbox("node-a")),  # not even the node itself
            ("policy", subjects.inbox("policy")),
            ("verifier-snp", subjects.inbox("verifier-snp")),
            (identities.ADMIN, subjects.inbox(identities.ADMIN)),
        ):
            published = await not_refused(
                server.url, seeds[identity], [("pub", victim)], inbox_prefix=inbox
            )
            assert published == [], f"{identity} may publish {victim}"
        # node-a cannot listen to another node's revocations either.
        peeked = await not_refused(
            server.url,
            seeds["node-node-a"],
            [("sub", subjects.revoked("node-b")), ("sub", "attest.revoked.*")],
            inbox_prefix=subjects.node_inbox("node-a"),
        )
        assert peeked == []
        # The broker revoking node-b reaches node-b's subject only.
        await broker.publish(
            subjects.revoked("node-b"), events.Revocation(node="node-b", reason="policy.denied")
        )
        await asyncio.sleep(0.3)
        # Had any of those publishes got through, node-a would have counted it (as junk).
        assert node.revocations.received == 0 and not node.revocations.ignored
        assert node.secrets.get(DEFAULT_RESOURCE) == mesh.secret
        await broker.publish(victim, events.Revocation(node="node-a", reason="policy.denied"))
        await _until(lambda: len(node.secrets) == 0, within=1.0)
        assert node.revocations.received == 1
    finally:
        await running.halt()
        await broker.close()
        await node_a.close()
        await mesh.stop()
