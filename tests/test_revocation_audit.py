"""Revocations in the broker's audit log: every deny decision the broker records is one
sealed ``revoked`` record with the policy's signed reasons, written once however often the
decision is delivered and however many broker replicas handle it; ``attestmesh audit
list`` shows it and ``audit verify`` still passes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg

from services import cli
from services.broker.audit import AuditLog, AuditRecord, Outcome
from services.broker.sealing import AeadKey, KeyFileSource
from services.broker.service import BrokerService
from services.mesh import config as config_mod
from services.mesh import events, subjects
from services.mesh.bus import Bus
from services.mesh.errors import BusError, SealingError
from services.mesh.natskv import NatsKeyValue
from services.policy import refvalues, release_policy
from services.policy.reevaluation import REASON as TIGHTENED
from services.testing.memkv import MemoryKeyValue
from services.testing.mesh import TestMesh, ask_again

DENY_ALL = (
    "package attestmesh.release\nimport rego.v1\n"
    'decision := {"allow": false, "reasons": ["all releases suspended"]}\n'
)


@contextlib.asynccontextmanager
async def _replicas(mesh: TestMesh) -> AsyncIterator[tuple[BrokerService, BrokerService]]:
    """Two broker replicas sharing the bucket and sealing key, which handle decisions only
    when the test hands them one: the mesh's own broker is stopped, so nothing else does."""
    await mesh.halt("broker")
    buses = [await Bus.connect(mesh.server.url, f"broker-{i}") for i in range(2)]
    services = [
        BrokerService(
            bus, mesh.trusted, KeyFileSource.in_data_dir(mesh.workdir), signer=mesh.broker_key
        )
        for bus in buses
    ]
    try:
        for service in services:
            await service.start()
        yield services[0], services[1]
    finally:
        for bus in buses:
            await bus.close()


async def _deny_for(bus: Bus, node: str) -> Msg:
    """The latest deny decision on the node's subject, as the stream delivers it."""
    sub = await bus.js.subscribe(subjects.decision(node), ordered_consumer=True)
    found = None
    try:
        for _ in range(100):
            try:
                msg = await sub.next_msg(timeout=0.2)
            except TimeoutError:
                if found is not None:
                    return found
                continue
            if not events.decode(msg.data, events.Decision).allow:
                found = msg
    finally:
        await sub.unsubscribe()
    raise AssertionError("no deny decision was published")


async def _revoked(mesh: TestMesh, bus: Bus) -> list[AuditRecord]:
    log = await mesh.audit_log(bus)
    await log.verify_chain()
    return [r for r in await log.entries() if r.outcome is Outcome.REVOKED]


async def _announcements(bus: Bus, node: str) -> int:
    info = await bus.js.stream_info(subjects.STREAM_DECISIONS, subjects_filter=">")
    return (info.state.subjects or {}).get(subjects.revoked(node), 0)


async def test_a_reappraisal_deny_is_audited_once_across_redeliveries_and_replicas(
    mesh: TestMesh, bus: Bus, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = mesh.node(bus, "node-rv")
    assert (await node.attest_once()).released
    async with _replicas(mesh) as (first, second):
        policies = NatsKeyValue(await bus.key_value(subjects.BUCKET_POLICIES))
        await release_policy.store(policies, DENY_ALL, operator=mesh.operator_key)
        msg = await _deny_for(bus, "node-rv")
        # Both replicas take the first delivery at once, then it is redelivered twice.
        await asyncio.gather(first.handle_decision(msg), second.handle_decision(msg))
        await first.handle_decision(msg)
        await second.handle_decision(msg)
        # The revocation holds, and refusing its holder is still sealed once beside it.
        assert (await ask_again(bus, node)).reason == "broker.revoked"

    (record,) = await _revoked(mesh, bus)
    decision = events.decode(msg.data, events.Decision)
    claims = mesh.trusted.verify(decision.token, accept=lambda name: name == "policy")
    assert record.node == "node-rv" and record.decision_id == decision.id == claims["jti"]
    assert record.verdict_digest == hashlib.sha256(claims["verdict_id"].encode()).hexdigest()
    assert record.reason == "policy.reappraisal" and record.resource == "*"
    assert record.reasons[0] == TIGHTENED and "all releases suspended" in record.reasons
    assert len(record.trace_id) == 32
    assert await _announcements(bus, "node-rv") == 1  # de-duplicated, like the record
    records = await (await mesh.audit_log(bus)).entries()
    outcomes = [r.outcome for r in records if r.outcome is not Outcome.SUMMARY]
    assert outcomes == [Outcome.RELEASED, Outcome.REVOKED, Outcome.REFUSED]

    config = tmp_path / "audit-config.json"
    config_mod.save(
        config_mod.load(
            None,
            nats_url=mesh.server.url,
            data_dir=str(mesh.workdir),
            keys_dir=str(mesh.keys_dir),
        ),
        config,
    )
    capsys.readouterr()
    assert await asyncio.to_thread(cli.main, ["audit", "verify", "--config", str(config)]) == 0
    # Besides these three, a summary of counted refusals if any were counted.
    assert f"audit chain intact: {len(records)} records checked" in capsys.readouterr().out
    listing = ["audit", "list", "--config", str(config)]
    assert await asyncio.to_thread(cli.main, [*listing, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    (shown,) = [r for r in listed if r["outcome"] == "revoked"]
    assert shown["decision_id"] == decision.id and shown["reasons"] == record.reasons
    assert await asyncio.to_thread(cli.main, listing) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if " revoked " in ln]
    assert "node-rv" in line and "reason=policy.reappraisal" in line
    assert "all releases suspended" in line


async def test_a_denied_attestation_is_audited_with_the_policy_reasons(
    mesh: TestMesh, bus: Bus
) -> None:
    refs = NatsKeyValue(await bus.key_value(subjects.BUCKET_REFVALUES))
    await refvalues.store(refs, "snp", {"measurement": ["00" * 48]}, operator=mesh.operator_key)
    node = mesh.node(bus, "node-dn")
    for _ in range(50):  # until the policy service has adopted the values
        result = await node.attest_once()
        if not result.allowed:
            break
    assert not result.allowed and result.status != "none"
    for _ in range(50):  # the broker records the deny beside the node reading it
        revoked = [r for r in await _revoked(mesh, bus) if r.decision_id == node.last_decision_id]
        if revoked:
            break
        await asyncio.sleep(0.1)
    (record,) = revoked
    assert record.reason == "policy.denied" and record.node == "node-dn"
    assert "claim measurement is not among the reference values" in record.reasons


async def test_a_failed_append_is_written_on_the_redelivery(
    mesh: TestMesh, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = mesh.node(bus, "node-fl")
    assert (await node.attest_once()).released
    async with _replicas(mesh) as (first, _):
        policies = NatsKeyValue(await bus.key_value(subjects.BUCKET_POLICIES))
        await release_policy.store(policies, DENY_ALL, operator=mesh.operator_key)
        msg = await _deny_for(bus, "node-fl")
        assert first.audit is not None
        append = first.audit.append
        calls = 0

        async def flaky(**fields: Any) -> AuditRecord:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise BusError("kv.unavailable", "the bucket did not answer")
            return await append(**fields)

        monkeypatch.setattr(first.audit, "append", flaky)
        with pytest.raises(BusError):
            await first.handle_decision(msg)
        assert await _revoked(mesh, bus) == []
        assert await _announcements(bus, "node-fl") == 1  # announced before the log
        await first.handle_decision(msg)  # the redelivery
        await first.handle_decision(msg)
        assert len(await _revoked(mesh, bus)) == 1 and calls == 2


async def test_revoked_records_bound_their_reasons() -> None:
    log = AuditLog(MemoryKeyValue(), AeadKey.generate())
    fields: dict[str, Any] = {
        "node": "node-1",
        "resource": "*",
        "decision_id": "d-1",
        "verdict_digest": hashlib.sha256(b"v").hexdigest(),
        "outcome": Outcome.REVOKED,
        "reason": "policy.denied",
    }
    for bad in (["x"] * 17, ["line\nbreak"], [""], ["x" * 254]):
        with pytest.raises(SealingError) as refused:
            await log.append(**fields, reasons=bad)
        assert refused.value.reason == "broker.audit_field_invalid"
    stored = await log.append(**fields, reasons=["policy.tightened", "x" * 253])
    assert stored.reasons == ["policy.tightened", "x" * 253]
    (read,) = await log.entries()
    assert read.reasons == stored.reasons and read.outcome is Outcome.REVOKED
