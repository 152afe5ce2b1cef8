"""End to end on a real nats-server: simulated SEV-SNP nodes attest and receive secrets."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
from nats.aio.msg import Msg
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.collector.service import RoundResult
from services.mesh import events, subjects
from services.mesh.bus import Bus
from services.mesh.keys import SigningKey
from services.mesh.server import NatsServer
from services.testing.mesh import TestMesh, ask_again
from services.verifier import ear
from services.verifier.families.base import Appraisal, Status
from services.verifier.worker import derived_id


async def _dead_letters(bus: Bus, stream: str) -> list[events.DeadLetter]:
    letters: list[events.DeadLetter] = []
    sub = await bus.js.subscribe(subjects.dlq(stream), ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                return letters
            letters.append(events.decode(msg.data, events.DeadLetter))
    finally:
        await sub.unsubscribe()


async def _verdicts(bus: Bus) -> list[events.Verdict]:
    found: list[events.Verdict] = []
    sub = await bus.js.subscribe(subjects.VERDICT_ALL, ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                return found
            found.append(events.decode(msg.data, events.Verdict))
    finally:
        await sub.unsubscribe()


def _forged_verdict(
    key: SigningKey,
    node: str,
    status: Status,
    *,
    nonce: bytes = b"n" * 32,
    evidence_id: str = "e",
    routing_status: str | None = None,
    reappraisal: bool = False,
) -> events.Verdict:
    """A verdict signed by ``key`` about evidence nobody sent, for the policy's refusals."""
    appraisal = Appraisal(family="snp", status=status, verified=True)
    subject = ear.Subject(node=node, evidence_id=evidence_id, nonce=nonce, public_key=b"k" * 32)
    token = ear.issue(key, appraisal, subject, now=events.utcnow(), ttl=60, reappraisal=reappraisal)
    return events.Verdict(
        node=node,
        family="snp",
        evidence_id=evidence_id,
        status=routing_status or status.value,  # type: ignore[arg-type]
        ear=token,
    )



async def test_several_nodes_attest_and_decrypt_their_secret(mesh: TestMesh, bus: Bus) -> None:
    received: dict[str, bytes] = {}
    nodes = [mesh.node(bus, f"node-{i}", received=received) for i in range(4)]
    results = await asyncio.gather(*(n.attest_once() for n in nodes))
    assert [r.status for r in results] == ["affirming"] * 4, results
    assert all(r.released for r in results)
    expected = await mesh.stored_secret(bus)
    assert received == {f"node-{i}": expected for i in range(4)}


async def test_tampered_evidence_is_contraindicated_and_gets_nothing(
    mesh: TestMesh, bus: Bus
) -> None:
    def flip(evidence: events.SnpEvidence) -> events.SnpEvidence:
        report = bytearray(evidence.report)
        report[0x90] ^= 0x01  # a MEASUREMENT byte, inside the signed region
        return msgspec.structs.replace(evidence, report=bytes(report))

    received: dict[str, bytes] = {}
    result = await mesh.node(bus, "evil", tamper=flip, received=received).attest_once()
    assert result.status == "contraindicated"
    assert not result.allowed and not result.released and received == {}
    (verdict,) = [v for v in await _verdicts(bus) if v.node == "evil"]
    read = ear.read(verdict.ear, mesh.trusted, now=events.utcnow())
    assert read.status is Status.CONTRAINDICATED
    assert any("signature" in r["code"] for r in read.reasons), read.reasons


async def test_a_replayed_nonce_is_rejected(mesh: TestMesh, bus: Bus) -> None:
    node = mesh.node(bus, "node-r")
    first = await node.attest_once()
    assert first.released
    (verdict,) = [v for v in await _verdicts(bus) if v.node == "node-r"]
    # The same signed EAR, re-sent as a new verdict message: the nonce is already spent.
    replay = events.Verdict(
        node=verdict.node,
        family=verdict.family,
        evidence_id=verdict.evidence_id,
        status=verdict.status,
        ear=verdict.ear,
    )
    await bus.publish(subjects.verdict("snp", "node-r"), replay)
    letters = await _wait_for_letters(bus, subjects.STREAM_VERDICTS, 1)
    assert [d.reason for d in letters] == ["policy.nonce_replayed"]
    assert not await _decision_exists(bus, derived_id("decision", replay.id))


async def test_unsigned_or_foreign_verdicts_are_ignored(mesh: TestMesh, bus: Bus) -> None:
    challenge = await bus.request(
        subjects.nonce("node-f"), events.NonceRequest(node="node-f"), events.NonceChallenge
    )
    forged_by = SigningKey.generate("verifier-snp")
    foreign = _forged_verdict(forged_by, "node-f", Status.AFFIRMING, nonce=challenge.nonce)
    unsigned = msgspec.structs.replace(
        foreign, id=events.new_id(), ear="eyJhbGciOiJub25lIn0.eyJ4IjoxfQ."
    )
    for verdict in (foreign, unsigned):
        await bus.publish(subjects.verdict("snp", "node-f"), verdict)
    letters = await _wait_for_letters(bus, subjects.STREAM_VERDICTS, 2)
    assert [d.reason for d in letters] == ["token.unknown_signer", "token.unknown_signer"]
    info = await bus.js.stream_info(subjects.STREAM_DECISIONS)
    assert info.state.messages == 0


async def test_broker_restart_keeps_releasing_the_same_secret(mesh: TestMesh, bus: Bus) -> None:
    received: dict[str, bytes] = {}
    assert (await mesh.node(bus, "node-a", received=received).attest_once()).released
    before = received["node-a"]
    await mesh.halt("broker")
    await mesh.start_broker()
    received.clear()
    assert (await mesh.node(bus, "node-a", received=received).attest_once()).released
    assert received["node-a"] == before == mesh.secret


async def test_server_restart_mid_flow_loses_nothing(
    mesh: TestMesh, bus: Bus, nats_server: NatsServer
) -> None:
    await mesh.halt("verifier-snp")
    received: dict[str, bytes] = {}
    node = mesh.node(bus, "node-s", received=received, decision_timeout=60.0)
    round_task = asyncio.create_task(node.attest_once())
    await _wait_for_stream(bus, subjects.STREAM_EVIDENCE, 1)
    nats_server.restart()  # evidence is in the stream; the verifier has not seen it yet
    await mesh.start_verifier()
    result = await asyncio.wait_for(round_task, 90)
    assert result.released, result
    assert received["node-s"] == mesh.secret


async def _wait_for_stream(bus: Bus, stream: str, count: int) -> None:
    for _ in range(100):
        if (await bus.js.stream_info(stream)).state.messages >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{stream} never reached {count} messages")


async def _wait_for_letters(bus: Bus, stream: str, count: int) -> list[events.DeadLetter]:
    for _ in range(40):
        letters = await _dead_letters(bus, stream)
        if len(letters) >= count:
            return letters
        await asyncio.sleep(0.25)
    raise AssertionError(f"expected {count} dead letters for {stream}")


async def _decision_exists(bus: Bus, decision_id: str) -> bool:
    sub = await bus.js.subscribe(subjects.DECISION_ALL, ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                return False
            if events.decode(msg.data, events.Decision).id == decision_id:
                return True
    finally:
        await sub.unsubscribe()


async def test_one_attestation_is_one_trace(
    mesh: TestMesh, bus: Bus, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    assert (await mesh.node(bus, "node-t").attest_once()).released
    await asyncio.sleep(0.5)  # the broker records the decision concurrently with the release
    finished = spans.get_finished_spans()
    (root,) = [s for s in finished if s.name == "collector.attest"]
    trace_id = root.context.trace_id
    in_trace = {s.name for s in finished if s.context.trace_id == trace_id}
    assert {
        "collector.attest",
        "policy.nonce",
        "verifier.verify",
        "policy.appraise",
        "broker.record_decision",
        "broker.release",
    } <= in_trace
    for span in finished:
        for value in (span.attributes or {}).values():
            assert mesh.secret.hex() not in str(value)


async def test_decisions_expire(nats_server: NatsServer, tmp_path: Path, bus: Bus) -> None:
    running = TestMesh(nats_server, tmp_path, decision_ttl=2.0)
    await running.start()
    try:
        node = running.node(bus, "node-x")
        assert (await node.attest_once()).released
        await asyncio.sleep(3.1)
        refused = await ask_again(bus, node)
        assert not refused.ok and refused.reason == "broker.decision_expired"
    finally:
        await running.stop()


async def test_collectors_reattest_on_an_interval(mesh: TestMesh, bus: Bus) -> None:
    results: asyncio.Queue[RoundResult] = asyncio.Queue()
    stop = asyncio.Event()
    await mesh.node(bus, "node-i").run(stop, interval=0.05, rounds=3, results=results)
    assert results.qsize() == 3
    while not results.empty():
        assert (await results.get()).released


async def test_routing_fields_must_agree_with_the_signed_verdict(mesh: TestMesh, bus: Bus) -> None:
    challenge = await bus.request(
        subjects.nonce("node-m"), events.NonceRequest(node="node-m"), events.NonceChallenge
    )
    lying = _forged_verdict(
        mesh.verifier_key,
        "node-m",
        Status.CONTRAINDICATED,
        nonce=challenge.nonce,
        routing_status="affirming",
    )
    await bus.publish(subjects.verdict("snp", "node-m"), lying)
    letters = await _wait_for_letters(bus, subjects.STREAM_VERDICTS, 1)
    assert [d.reason for d in letters] == ["policy.routing_mismatch"]
    assert not await _decision_exists(bus, derived_id("decision", lying.id))


async def test_policy_and_reference_values_reload_without_a_restart(
    mesh: TestMesh, bus: Bus
) -> None:
    from services.collector.simulator.node import SimulatedSnp
    from services.mesh.natskv import NatsKeyValue
    from services.policy import refvalues, release_policy
    from services.policy.engine import default_policy

    node = mesh.node(bus, "node-p")
    assert (await node.attest_once()).released

    refs = NatsKeyValue(await bus.key_value(subjects.BUCKET_REFVALUES))
    operator = mesh.operator_key
    await refvalues.store(refs, "snp", {"measurement": ["00" * 48]}, operator=operator)
    for _ in range(50):  # the watcher recompiles asynchronously
        result = await node.attest_once()
        if not result.released:
            break
        await asyncio.sleep(0.1)
    # Denied by the new rules, or allowed by the old ones a moment before the re-evaluation
    # of the change revoked that very decision.
    denied = result.status == "affirming" and not result.allowed
    assert not result.released and (denied or result.reason == "broker.revoked"), result

    assert isinstance(node.source, SimulatedSnp)
    measurement = node.source.measurement.hex()
    await refvalues.store(refs, "snp", {"measurement": [measurement]}, operator=operator)
    policies = NatsKeyValue(await bus.key_value(subjects.BUCKET_POLICIES))
    deny_all = "package attestmesh.release\nimport rego.v1\n" + (
        'decision := {"allow": false, "reasons": ["closed for maintenance"]}'
    )
    await release_policy.store(policies, deny_all, operator=operator)
    for _ in range(50):
        result = await node.attest_once()
        if not result.allowed:
            break
        await asyncio.sleep(0.1)
    assert not result.allowed

    # Back to the default policy: a new signed version (putting back the old one would be
    # a rollback, and refused).
    await release_policy.store(policies, default_policy(), operator=operator)
    for _ in range(50):
        result = await node.attest_once()
        if result.released:
            break
        await asyncio.sleep(0.1)
    assert result.released  # the measurement is now a reference value


async def test_a_collateral_change_revokes_affected_nodes(mesh: TestMesh, bus: Bus) -> None:
    """AMD publishes a CRL revoking the ASK: nodes verified under it lose their secrets."""
    from services.mesh.natskv import NatsKeyValue
    from services.verifier.collateral import CollateralRequest, store
    from services.verifier.families.snp.kds import DEFAULT_KDS, crl_url
    from services.verifier.families.snp.parse import Product

    revoked: asyncio.Queue[events.Revocation] = asyncio.Queue()

    async def on_revoked(msg: Msg) -> None:
        revoked.put_nowait(events.decode(msg.data, events.Revocation))

    sub = await bus.nc.subscribe("attest.revoked.*", cb=on_revoked)
    node = mesh.node(bus, "node-c")
    assert (await node.attest_once()).released
    other = mesh.node(bus, "node-d")  # another chip under the same ASK
    assert (await other.attest_once()).released

    # The same cache key the verifier's planner looks up for the product's CRL.
    request = CollateralRequest("crl.der", crl_url(DEFAULT_KDS, Product.MILAN))
    kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_COLLATERAL))
    await store(kv, request, mesh.pki.amd.crl(revoke=("ask",)), at=time.time())

    first = await asyncio.wait_for(revoked.get(), 20)
    second = await asyncio.wait_for(revoked.get(), 20)
    assert {first.node, second.node} == {"node-c", "node-d"}
    await sub.unsubscribe()
    refused = await ask_again(bus, node)
    assert not refused.ok and refused.reason == "broker.revoked"
    # A fresh attestation is now judged under the new CRL too.
    again = await node.attest_once()
    assert again.status == "contraindicated" and not again.released


async def test_a_reappraisal_can_only_withdraw_trust(mesh: TestMesh, bus: Bus) -> None:
    granting = _forged_verdict(mesh.verifier_key, "node-g", Status.AFFIRMING, reappraisal=True)
    await bus.publish(subjects.verdict("snp", "node-g"), granting)
    letters = await _wait_for_letters(bus, subjects.STREAM_VERDICTS, 1)
    assert [d.reason for d in letters] == ["policy.reappraisal_not_negative"]


async def test_a_stale_reappraisal_revokes_nothing(mesh: TestMesh, bus: Bus) -> None:
    node = mesh.node(bus, "node-s2")
    assert (await node.attest_once()).released
    stale = _forged_verdict(
        mesh.verifier_key, "node-s2", Status.CONTRAINDICATED, evidence_id="older", reappraisal=True
    )
    await bus.publish(subjects.verdict("snp", "node-s2"), stale)
    await asyncio.sleep(1.0)  # the policy decides; the broker must ignore it
    still = await ask_again(bus, node)
    # Answered once already, but not revoked: the node's current decision was never replaced
    # (``already_released`` is only said to the holder of the current decision).
    assert still.reason == "broker.already_released"
