"""A tightened rule takes effect at once: when the operator signs a deny-all policy or withdraws
a node's measurement from the reference values, running nodes are revoked within seconds
(not at their next re-attestation), and a loosened rule revokes nobody."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.mesh import events, subjects
from services.mesh.bus import Bus
from services.mesh.keys import TrustedKeys
from services.mesh.natskv import NatsKeyValue
from services.mesh.server import NatsServer
from services.policy import reevaluation, refvalues, release_policy
from services.policy.reevaluation import REASON, Standing
from services.testing.memkv import CountingKeyValue, MemoryKeyValue
from services.testing.mesh import TestMesh, ask_again

DENY_ALL = (
    "package attestmesh.release\nimport rego.v1\n"
    'decision := {"allow": false, "reasons": ["all releases suspended"]}\n'
)
WITHIN_S = 5.0


async def _revocations(
    bus: Bus, node: str
) -> tuple[asyncio.Queue[events.Revocation], Subscription]:
    found: asyncio.Queue[events.Revocation] = asyncio.Queue()

    async def on_revoked(msg: Msg) -> None:
        found.put_nowait(events.decode(msg.data, events.Revocation))

    return found, await bus.nc.subscribe(subjects.revoked(node), cb=on_revoked)


async def _signed_reasons(bus: Bus, mesh: TestMesh, node: str) -> list[str]:
    """The reasons the policy signed into the node's latest decision."""
    sub = await bus.js.subscribe(subjects.decision(node), ordered_consumer=True)
    latest = None
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                break
            latest = events.decode(msg.data, events.Decision)
    finally:
        await sub.unsubscribe()
    assert latest is not None
    claims = mesh.trusted.verify(latest.token, accept=lambda n: n == "policy")
    reasons: list[str] = claims["reasons"]
    return reasons


async def test_withdrawn_reference_values_revoke_a_running_node(mesh: TestMesh, bus: Bus) -> None:
    node = mesh.node(bus, "node-rv")
    assert (await node.attest_once()).released
    revoked, sub = await _revocations(bus, "node-rv")
    refs = NatsKeyValue(await bus.key_value(subjects.BUCKET_REFVALUES))
    started = time.monotonic()
    await refvalues.store(refs, "snp", {"measurement": ["00" * 48]}, operator=mesh.operator_key)
    announcement = await asyncio.wait_for(revoked.get(), WITHIN_S)
    took = time.monotonic() - started
    assert announcement.node == "node-rv" and took < WITHIN_S
    refused = await ask_again(bus, node)
    assert not refused.ok and refused.reason == "broker.revoked"
    reasons = await _signed_reasons(bus, mesh, "node-rv")
    assert reasons[0] == REASON
    assert "claim measurement is not among the reference values" in reasons
    await sub.unsubscribe()


async def test_a_deny_all_policy_revokes_every_running_node(mesh: TestMesh, bus: Bus) -> None:
    nodes = [mesh.node(bus, f"node-d{i}") for i in range(3)]
    for node in nodes:
        assert (await node.attest_once()).released
    watches = [await _revocations(bus, n.node) for n in nodes]
    policies = NatsKeyValue(await bus.key_value(subjects.BUCKET_POLICIES))
    await release_policy.store(policies, DENY_ALL, operator=mesh.operator_key)
    for (revoked, _), node in zip(watches, nodes, strict=True):
        announcement = await asyncio.wait_for(revoked.get(), WITHIN_S)
        assert announcement.node == node.node
        assert (await ask_again(bus, node)).reason == "broker.revoked"
    for _, sub in watches:
        await sub.unsubscribe()


async def test_a_loosened_rule_revokes_nobody(mesh: TestMesh, bus: Bus) -> None:
    refs = NatsKeyValue(await bus.key_value(subjects.BUCKET_REFVALUES))
    node = mesh.node(bus, "node-ok")
    result = await node.attest_once()
    assert result.released
    revoked, sub = await _revocations(bus, "node-ok")
    assert mesh.policy is not None and mesh.policy.loader is not None
    before = mesh.policy.loader.engine
    # Re-signed, still admitting everything: the policy recompiles and re-evaluates.
    await refvalues.store(refs, "snp", {"measurement": []}, operator=mesh.operator_key)
    for _ in range(50):  # a new engine means the re-evaluation ran (see PolicyService.reload)
        if mesh.policy.loader.engine is not before:
            break
        await asyncio.sleep(0.1)
    assert mesh.policy.loader.engine is not before, "the change was never adopted"
    await asyncio.sleep(1.0)
    assert revoked.empty()
    assert (await ask_again(bus, node)).reason == "broker.already_released"  # still in force
    await sub.unsubscribe()


async def test_a_node_is_revoked_while_its_decision_lasts_even_if_its_verdict_expired(
    nats_server: NatsServer, tmp_path: Path, bus: Bus
) -> None:
    """The verifier's token may expire before the decision made on it (different lifetimes,
    counted from different moments): the decision is what must stay withdrawable."""
    running = TestMesh(nats_server, tmp_path, verdict_ttl=2.0)
    await running.start()
    try:
        node = running.node(bus, "node-gap")
        assert (await node.attest_once()).released
        await asyncio.sleep(3.0)  # the verdict's token has expired; the decision (300 s) has not
        revoked, sub = await _revocations(bus, "node-gap")
        policies = NatsKeyValue(await bus.key_value(subjects.BUCKET_POLICIES))
        await release_policy.store(policies, DENY_ALL, operator=running.operator_key)
        announcement = await asyncio.wait_for(revoked.get(), WITHIN_S)
        assert announcement.node == "node-gap"
        assert (await ask_again(bus, node)).reason == "broker.revoked"
        await sub.unsubscribe()
    finally:
        await running.stop()


def _verdict(node: str, evidence_id: str) -> events.Verdict:
    return events.Verdict(
        node=node, family="snp", evidence_id=evidence_id, status="affirming", ear="a.b.c"
    )


async def _allow(standing: Standing, verdict: events.Verdict) -> None:
    now = events.utcnow()
    await standing.allowed(verdict, accepted_at=now, decision_expires_at=now)


def _held(kv: MemoryKeyValue, node: str) -> str:
    found = kv._data.get(node)
    assert found is not None
    return events.decode(msgspec.msgpack.decode(found[0])["verdict"], events.Verdict).evidence_id


async def test_a_replica_rewrites_its_own_entry_without_reading_it_back() -> None:
    kv = CountingKeyValue()
    standing = Standing(kv, TrustedKeys({}), events.utcnow)
    await _allow(standing, _verdict("n1", "e1"))
    reads = kv.reads
    await _allow(standing, _verdict("n1", "e2"))
    await _allow(standing, _verdict("n1", "e3"))
    assert kv.reads == reads and _held(kv, "n1") == "e3"


async def test_an_entry_changed_elsewhere_is_read_back_then_written() -> None:
    kv = CountingKeyValue()
    mine, other = (Standing(kv, TrustedKeys({}), events.utcnow) for _ in range(2))
    await _allow(mine, _verdict("n1", "e1"))
    await _allow(other, _verdict("n1", "e2"))  # another replica decided on newer evidence
    await _allow(mine, _verdict("n1", "e3"))
    assert _held(kv, "n1") == "e3"
    await other.denied("n1")
    await _allow(mine, _verdict("n1", "e4"))  # deleted meanwhile: created again
    assert _held(kv, "n1") == "e4"


async def test_the_remembered_revisions_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reevaluation, "MAX_REMEMBERED", 2)
    standing = Standing(MemoryKeyValue(), TrustedKeys({}), events.utcnow)
    for i in range(4):
        await _allow(standing, _verdict(f"n{i}", "e"))
    assert list(standing._written) == ["n2", "n3"]


async def test_a_deny_removes_the_replicas_own_entry_without_reading_it() -> None:
    kv = CountingKeyValue()
    standing = Standing(kv, TrustedKeys({}), events.utcnow)
    await _allow(standing, _verdict("n1", "e1"))
    reads = kv.reads
    await standing.denied("n1")
    assert kv.reads == reads and "n1" not in kv._data


async def test_a_deny_removes_an_entry_written_elsewhere_and_writes_nothing_for_none() -> None:
    kv = CountingKeyValue()
    mine, other = (Standing(kv, TrustedKeys({}), events.utcnow) for _ in range(2))
    await _allow(mine, _verdict("n1", "e1"))
    await _allow(other, _verdict("n1", "e2"))  # the revision mine remembers is stale now
    await mine.denied("n1")
    assert "n1" not in kv._data
    writes = kv.writes
    await mine.denied("n2")  # never allowed: nothing to remove, no delete marker
    await other.denied("n1")  # its remembered entry is gone: read, nothing to remove
    assert kv.writes == writes
