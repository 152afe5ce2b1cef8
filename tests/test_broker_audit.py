"""The broker's own trust boundary on a real nats-server: releases are answered once,
refusals to strangers are counted rather than sealed, and the audit log is pruned behind
signed checkpoints that ``attestmesh audit verify`` checks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services import cli
from services.broker.audit import DEFAULT_MAX_RECORDS, Outcome, audit_key
from services.collector.service import DEFAULT_RESOURCE, CollectorNode
from services.mesh import config as config_mod
from services.mesh import events, subjects
from services.mesh.bus import Bus
from services.mesh.errors import ConfigError
from services.mesh.natskv import MAX_LISTED_KEYS, NatsKeyValue
from services.mesh.server import NatsServer
from services.testing.mesh import TestMesh


@pytest.fixture
async def mesh(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[TestMesh]:
    running = TestMesh(nats_server, tmp_path)
    running.broker_options = {"max_records": 3, "maintenance_interval": 3600.0}
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


def _request(collector: CollectorNode, **changes: object) -> events.SecretRequest:
    fields: dict[str, object] = {
        "node": collector.node,
        "resource": DEFAULT_RESOURCE,
        "public_key": collector.last_public_key,
        "decision_id": collector.last_decision_id,
        "evidence_id": collector.last_evidence_id,
    }
    fields.update(changes)
    return events.SecretRequest(**fields)  # type: ignore[arg-type]


async def _ask(bus: Bus, request: events.SecretRequest) -> events.SecretResponse:
    return await bus.request(subjects.secret(request.node), request, events.SecretResponse)


async def _records(mesh: TestMesh, bus: Bus) -> list[Outcome]:
    return [record.outcome for record in await (await mesh.audit_log(bus)).entries()]


async def test_a_replayed_secret_request_adds_no_audit_record(mesh: TestMesh, bus: Bus) -> None:
    node = mesh.node(bus, "node-1")
    assert (await node.attest_once()).released
    assert await _records(mesh, bus) == [Outcome.RELEASED]
    for _ in range(5):  # what a reader of the DECISIONS stream could replay
        again = await _ask(bus, _request(node))
        assert not again.ok and again.reason == "broker.already_released"
        assert not again.ciphertext
    assert await _records(mesh, bus) == [Outcome.RELEASED]
    assert mesh.broker is not None
    assert mesh.broker.refusals.peek()["broker.already_released"] == 5
    # A broker restarted on the same bucket still answers once; stopping sealed its counts.
    await mesh.halt("broker")
    await mesh.start_broker()
    assert (await _ask(bus, _request(node))).reason == "broker.already_released"
    records = await (await mesh.audit_log(bus)).entries()
    assert [r.outcome for r in records] == [Outcome.RELEASED, Outcome.SUMMARY]
    assert records[1].counts["broker.already_released"] == 5
    # A fresh attestation is a fresh decision, released (and audited) again.
    assert (await node.attest_once()).released
    assert (await _records(mesh, bus)).count(Outcome.RELEASED) == 2


async def test_a_thousand_unknown_requests_add_no_sealed_records(mesh: TestMesh, bus: Bus) -> None:
    node = mesh.node(bus, "node-2")
    assert (await node.attest_once()).released
    assert mesh.broker is not None
    mesh.broker.refusals.drain()  # the collector's own retries while the decision was pending
    ghost = _request(node, node="ghost", decision_id="made-up")
    started = time.perf_counter()
    for _ in range(10):
        replies = await asyncio.gather(
            *(_ask(bus, _request(node, node="ghost", decision_id="made-up")) for _ in range(100))
        )
        assert {r.reason for r in replies} == {"broker.no_decision"}
    elapsed = time.perf_counter() - started
    assert ghost.node == "ghost"
    assert await _records(mesh, bus) == [Outcome.RELEASED]
    assert mesh.broker is not None
    assert mesh.broker.refusals.peek() == {"broker.no_decision": 1000}
    assert await mesh.broker.flush_refusals() == 1000
    log = await mesh.audit_log(bus)
    *_, summary = await log.entries()
    assert summary.outcome is Outcome.SUMMARY
    assert summary.counts == {"broker.no_decision": 1000}
    assert mesh.broker.refusals.total == 0
    print(f"1000 unknown-requester refusals in {elapsed:.2f} s, 1 summary record")


async def test_a_refusal_to_the_decision_holder_is_sealed_once(mesh: TestMesh, bus: Bus) -> None:
    node = mesh.node(bus, "node-3")
    assert (await node.attest_once()).released
    for _ in range(3):
        wrong = await _ask(bus, _request(node, public_key=bytes(range(32))))
        assert wrong.reason == "broker.key_mismatch"
    records = await (await mesh.audit_log(bus)).entries()
    assert [(r.outcome, r.reason) for r in records] == [
        (Outcome.RELEASED, ""),
        (Outcome.REFUSED, "broker.key_mismatch"),
    ]
    assert mesh.broker is not None
    assert mesh.broker.refusals.peek()["broker.key_mismatch"] == 2


def _config_file(mesh: TestMesh, tmp_path: Path, url: str) -> Path:
    config = config_mod.load(
        None, nats_url=url, data_dir=str(mesh.workdir), keys_dir=str(mesh.keys_dir)
    )
    path = tmp_path / "audit-config.json"
    config_mod.save(config, path)
    return path


async def _cli(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


async def test_audit_cli_verifies_a_pruned_log_and_detects_deletion(
    mesh: TestMesh, bus: Bus, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = [mesh.node(bus, f"node-{i}") for i in range(5)]
    for node in nodes:
        assert (await node.attest_once()).released
    assert mesh.broker is not None
    mesh.broker.refusals.drain()  # the collectors' retries while decisions were pending
    assert await mesh.broker.maintain() == 2  # 5 records, kept to the last 3
    await (await mesh.audit_log(bus)).verify_chain()
    kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
    assert sorted(k for k in await kv.keys() if k.startswith("audit.")) == [
        audit_key(i) for i in (2, 3, 4)
    ]
    # Pruned by purging, not deleting: no delete markers pile up in the bucket's stream.
    info = await bus.js.stream_info(f"KV_{subjects.BUCKET_BROKER}")
    assert info.state.messages == len(await kv.keys())
    for node in nodes[:2]:
        assert (await node.attest_once()).released
    config = str(_config_file(mesh, tmp_path, mesh.server.url))
    capsys.readouterr()

    assert await _cli("audit", "verify", "--config", config) == 0
    out = capsys.readouterr().out
    assert "3 records checked (from checkpoint 4)" in out

    assert await _cli("audit", "list", "--config", config, "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["seq"] for r in listed] == [2, 3, 4, 5, 6]
    assert {r["outcome"] for r in listed} == {"released"}
    secret_hex = mesh.secret.hex()
    assert all(secret_hex not in json.dumps(r) for r in listed)
    assert await _cli("audit", "list", "--config", config, "--since", "2999-01-01T00:00:00Z") == 0
    assert capsys.readouterr().out == ""

    await kv.delete(audit_key(5))  # a record after the checkpoint
    assert await _cli("audit", "verify", "--config", config) == 1
    assert "audit_chain_broken" in capsys.readouterr().err


async def test_audit_cli_fails_fast_when_nats_is_unreachable(
    mesh: TestMesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(_config_file(mesh, tmp_path, "nats://127.0.0.1:1"))
    started = time.monotonic()
    assert await _cli("audit", "verify", "--config", config, "--timeout", "1") == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert "nats://127.0.0.1:1" in err and ("bus.timeout" in err or "bus.connect_failed" in err)
    missing = tmp_path / "no-such-dir"
    assert await _cli("audit", "list", "--data-dir", str(missing)) == 2
    assert "cli.no_config" in capsys.readouterr().err


async def test_the_broker_checkpoints_on_its_own_every_n_records(
    nats_server: NatsServer, tmp_path: Path, bus: Bus
) -> None:
    running = TestMesh(nats_server, tmp_path)
    running.broker_options = {"checkpoint_every": 2, "max_records": 1}
    await running.start()
    try:
        for i in range(2):
            assert (await running.node(bus, f"node-{i}").attest_once()).released
        log = await running.audit_log(bus)
        deadline = time.monotonic() + 10
        while (anchor := await log.load_checkpoint()) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert anchor is not None and anchor.seq >= 1
        kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
        while len([k for k in await kv.keys() if k.startswith("audit.")]) > 1:
            assert time.monotonic() < deadline, "not pruned to the bound"
            await asyncio.sleep(0.1)
        assert await log.verify_chain() >= 1
    finally:
        await running.stop()


def test_audit_bounds_are_configurable_and_consistent() -> None:
    config = config_mod.load(None)
    assert (config.audit_max_records, config.audit_checkpoint_every) == (20_000, 1000)
    assert config.audit_max_records == DEFAULT_MAX_RECORDS
    assert config_mod.load(None, audit_max_records=5000).audit_max_records == 5000
    with pytest.raises(ConfigError, match="config.invalid"):
        # The log must stay listable: a bucket listing reads at most MAX_LISTED_KEYS keys.
        config_mod.load(None, audit_max_records=MAX_LISTED_KEYS)
    with pytest.raises(ConfigError, match="config.invalid"):
        config_mod.load(None, audit_max_records=10)  # below the checkpoint interval
    with pytest.raises(ConfigError, match="config.invalid"):
        config_mod.load(None, audit_max_records=0)


async def test_malformed_and_misrouted_requests_are_counted_not_sealed(
    mesh: TestMesh, bus: Bus
) -> None:
    node = mesh.node(bus, "node-4")
    assert (await node.attest_once()).released
    assert mesh.broker is not None
    mesh.broker.refusals.drain()
    misrouted = await bus.request(
        subjects.secret("elsewhere"), _request(node), events.SecretResponse
    )
    assert misrouted.reason == "broker.routing_mismatch"
    reply = await bus.nc.request(subjects.secret("node-4"), b"\xff" * 64, timeout=5)
    assert events.decode(reply.data, events.Refusal).reason.startswith("wire.")
    counts = mesh.broker.refusals.peek()
    assert counts.pop("broker.routing_mismatch") == 1
    assert list(counts.values()) == [1] and next(iter(counts)).startswith("wire.")
    assert await _records(mesh, bus) == [Outcome.RELEASED]


async def test_purge_before_removes_only_older_keys_under_the_prefix(bus: Bus) -> None:
    from services.mesh.errors import BusError
    from services.testing.memkv import MemoryKeyValue

    nats_kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
    for kv in (MemoryKeyValue(), nats_kv):
        first = await kv.create("audit.000000000000", b"a")
        await kv.create("auditx", b"b")
        await kv.create("other.1", b"c")
        keep = await kv.create("audit.000000000001", b"d")
        await kv.purge_before("audit.", keep)
        assert sorted(await kv.keys()) == ["audit.000000000001", "auditx", "other.1"]
        assert first < keep
        with pytest.raises(BusError, match="invalid_key"):
            await kv.purge_before("audit", keep)
        for key in await kv.keys():
            await kv.delete(key)
    info = await bus.js.stream_info(f"KV_{subjects.BUCKET_BROKER}")
    assert info.state.messages == 3  # the three delete markers from the clean-up, no more


async def test_maintenance_survives_a_bus_failure() -> None:
    """A NATS hiccup during checkpointing must not end retention for good: the task logs it
    and tries again at the next interval."""
    from services.broker.service import BrokerService
    from services.mesh.errors import BusError

    class Flaky(BrokerService):
        calls = 0

        async def maintain(self) -> int:
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise BusError("kv.unavailable", "TimeoutError")
            return 0

    service = Flaky.__new__(Flaky)
    service.maintenance_interval = 0.01
    service._maintain_now = asyncio.Event()
    stop = asyncio.Event()
    task = asyncio.create_task(service._maintenance(stop))
    try:
        for _ in range(100):
            if Flaky.calls >= 3:
                break
            await asyncio.sleep(0.01)
        assert not task.done(), task
        assert Flaky.calls >= 3
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
