"""Only evidence that proves it is the node changes its standing (real nats-server, real crypto).

Attacks, each against a node that holds a valid decision: junk bytes, a well-formed report with
a bad signature, the node's evidence published on another node's subject, and valid evidence
from another chip under the node's name. None may replace or revoke the node's decision; each
is dead-lettered with its reason and the sender is told. Authenticated evidence from the
node's own chip that fails appraisal still revokes at once, and ``attestmesh node reset``
lets a rebuilt node pin new hardware.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import time
from pathlib import Path

import msgspec
from nats.aio.msg import Msg

from services import cli
from services.broker.audit import Outcome
from services.collector.service import CollectorNode
from services.collector.simulator.node import SimulatedSnp
from services.collector.simulator.snp import DEFAULT_POLICY
from services.mesh import events, subjects
from services.mesh.bus import Bus
from services.mesh.natskv import NatsKeyValue
from services.mesh.server import NatsServer
from services.policy.pins import PinStore
from services.testing.mesh import TestMesh, ask_again
from services.verifier import ear
from services.verifier.collateral import CollateralRequest, store
from services.verifier.families.base import Appraisal, Status
from services.verifier.families.snp.kds import DEFAULT_KDS, crl_url
from services.verifier.families.snp.parse import Product
from services.verifier.worker import expected_report_data

POLICY_DEBUG = 1 << 19


class _Revocations:
    """Every ``attest.revoked.*`` announcement seen while the test runs."""

    def __init__(self) -> None:
        self.nodes: list[str] = []

    async def on_message(self, msg: Msg) -> None:
        self.nodes.append(events.decode(msg.data, events.Revocation).node)


class _Junk:
    """A collector source that sends bytes which are no SNP report at all."""

    family = "snp"
    simulated = True

    def collect(self, report_data: bytes) -> events.Evidence:
        return events.SnpEvidence(report=b"not an attestation report" * 4)


class _DebugGuest:
    """The node's own chip, but a guest launched with POLICY.DEBUG: authentic, yet failing."""

    family = "snp"
    simulated = True

    def __init__(self, chip: SimulatedSnp) -> None:
        self.chip = chip

    def collect(self, report_data: bytes) -> events.Evidence:
        sim = self.chip.simulator
        report = sim.report(
            report_data, measurement=self.chip.measurement, policy=DEFAULT_POLICY | POLICY_DEBUG
        )
        return events.SnpEvidence(report=report, certificates=sim.cert_table())


def _chip(mesh: TestMesh, name: str) -> SimulatedSnp:
    """The chip ``mesh.node(bus, name)`` runs on (the test mesh seeds chips by node name)."""
    return SimulatedSnp(mesh.pki, seed=hash(name) & 0xFFFF)


def _other_chip(mesh: TestMesh, name: str) -> SimulatedSnp:
    return SimulatedSnp(mesh.pki, seed=(hash(name) + 1) & 0xFFFF)


def _flip_signature(evidence: events.SnpEvidence) -> events.SnpEvidence:
    report = bytearray(evidence.report)
    report[0x2A0] ^= 0x01  # first byte of the ECDSA signature's R
    return msgspec.structs.replace(evidence, report=bytes(report))


async def _letters(bus: Bus, count: int) -> list[events.DeadLetter]:
    """The VERDICTS stream's dead letters, once there are at least ``count``."""
    for _ in range(60):
        found: list[events.DeadLetter] = []
        sub = await bus.js.subscribe(subjects.dlq(subjects.STREAM_VERDICTS), ordered_consumer=True)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except TimeoutError:
                    break
                found.append(events.decode(msg.data, events.DeadLetter))
        finally:
            await sub.unsubscribe()
        if len(found) >= count:
            return found
        await asyncio.sleep(0.25)
    raise AssertionError(f"expected {count} dead letters on VERDICTS")


async def _pin_of(bus: Bus, node: str) -> str | None:
    found = await PinStore(NatsKeyValue(await bus.key_value(subjects.BUCKET_PINS))).get(node)
    return found[0].hwid if found is not None else None


async def test_evidence_that_does_not_prove_it_is_the_node_changes_nothing(
    mesh: TestMesh, bus: Bus
) -> None:
    revoked = _Revocations()
    watch = await bus.nc.subscribe("attest.revoked.*", cb=revoked.on_message)
    victim = mesh.node(bus, "node-x")
    bystander = mesh.node(bus, "node-y")
    assert (await victim.attest_once()).released
    assert (await bystander.attest_once()).released
    pin = await _pin_of(bus, "node-x")
    assert pin is not None and pin.startswith("snp.chip_id:")

    # (a) junk bytes and (b) a well-formed report with a broken signature, under X's name:
    # the collector that sent them learns at once that its round was refused.
    junk = await CollectorNode(
        bus, "node-x", _Junk(), mesh.collector_trust(), decision_timeout=10
    ).attest_once()
    forged = await mesh.node(bus, "node-x", tamper=_flip_signature).attest_once()
    for result in (junk, forged):
        assert result.reason == "evidence.unauthenticated", result
        assert result.status == "contraindicated" and not result.allowed

    # (c) X's genuine evidence, for X's challenge, published on Y's subject.
    challenge = await bus.request(
        subjects.nonce("node-x"), events.NonceRequest(node="node-x"), events.NonceChallenge
    )
    public = os.urandom(32)
    genuine = _chip(mesh, "node-x").collect(expected_report_data(challenge.nonce, public))
    crossed = events.EvidenceEvent(
        node="node-x", nonce=challenge.nonce, public_key=public, evidence=genuine, simulated=True
    )
    await bus.publish(subjects.evidence("snp", "node-y"), crossed)

    # (d) valid, authenticated evidence from another chip under X's name.
    impostor = CollectorNode(
        bus, "node-x", _other_chip(mesh, "node-x"), mesh.collector_trust(), decision_timeout=10
    )
    stolen = await impostor.attest_once()
    assert stolen.reason == "node.identity_mismatch", stolen
    assert stolen.status == "contraindicated" and not stolen.allowed and not stolen.released

    letters = await _letters(bus, 4)
    reasons = sorted(d.reason for d in letters)
    assert reasons == ["evidence.unauthenticated"] * 3 + ["node.identity_mismatch"], reasons
    details = " ".join(d.detail for d in letters)
    for family_reason in ("snp.report_signature_invalid", "wire.envelope_mismatch"):
        assert family_reason in details, details

    await asyncio.sleep(0.5)  # give a (wrong) revocation every chance to arrive
    await watch.unsubscribe()
    assert revoked.nodes == [], revoked.nodes
    for node in (victim, bystander):
        # Releases are answered once per decision: "already released" (not "not allowed",
        # "revoked" or "pending") proves the decision that released is still the current one.
        still = await ask_again(bus, node)
        assert still.reason == "broker.already_released", (node.node, still.reason)
    assert await _pin_of(bus, "node-x") == pin
    assert (await victim.attest_once()).released  # and the real node carries on


async def test_junk_does_not_spend_the_nodes_nonce(mesh: TestMesh, bus: Bus) -> None:
    challenge = await bus.request(
        subjects.nonce("node-n"), events.NonceRequest(node="node-n"), events.NonceChallenge
    )
    public = os.urandom(32)
    junk = events.EvidenceEvent(
        node="node-n",
        nonce=challenge.nonce,
        public_key=public,
        evidence=events.SnpEvidence(report=bytes(1184)),
        simulated=True,
    )
    await bus.publish(subjects.evidence("snp", "node-n"), junk)
    (letter,) = await _letters(bus, 1)
    assert letter.reason == "evidence.unauthenticated"

    decided: asyncio.Queue[events.Decision] = asyncio.Queue()

    async def on_decision(msg: Msg) -> None:
        decided.put_nowait(events.decode(msg.data, events.Decision))

    sub = await bus.nc.subscribe(subjects.decision("node-n"), cb=on_decision)
    evidence = _chip(mesh, "node-n").collect(expected_report_data(challenge.nonce, public))
    real = msgspec.structs.replace(junk, id=events.new_id(), evidence=evidence)
    await bus.publish(subjects.evidence("snp", "node-n"), real)
    while True:
        decision = await asyncio.wait_for(decided.get(), 20)
        if decision.evidence_id == real.id:
            break
    await sub.unsubscribe()
    assert decision.allow and not decision.refused  # the same challenge still counts


async def test_the_nodes_own_failing_evidence_revokes_and_a_reset_repins(
    mesh: TestMesh, bus: Bus, tmp_path: Path
) -> None:
    revoked: asyncio.Queue[events.Revocation] = asyncio.Queue()

    async def on_revoked(msg: Msg) -> None:
        revoked.put_nowait(events.decode(msg.data, events.Revocation))

    watch = await bus.nc.subscribe(subjects.revoked("node-r"), cb=on_revoked)
    node = mesh.node(bus, "node-r")
    assert (await node.attest_once()).released
    old_pin = await _pin_of(bus, "node-r")

    # (e) authenticated evidence from the node's own chip that fails appraisal: revoked now.
    debug = CollectorNode(
        bus,
        "node-r",
        _DebugGuest(_chip(mesh, "node-r")),
        mesh.collector_trust(),
        decision_timeout=10,
    )
    failed = await debug.attest_once()
    # A deny (not a refusal): the signed decision names why, in the verifier's code.
    assert failed.status == "contraindicated" and not failed.allowed
    assert failed.reason == "snp.debug_enabled", failed
    announcement = await asyncio.wait_for(revoked.get(), 20)
    assert announcement.node == "node-r"
    refused = await ask_again(bus, node)
    assert not refused.ok
    await watch.unsubscribe()

    # The node is rebuilt on another chip: refused until an operator resets the pin.
    rebuilt = CollectorNode(
        bus, "node-r", _other_chip(mesh, "node-r"), mesh.collector_trust(), decision_timeout=10
    )
    assert (await rebuilt.attest_once()).reason == "node.identity_mismatch"
    assert mesh.broker is not None
    await mesh.broker.maintain()  # a signed checkpoint: the reset must continue its chain
    config = tmp_path / "cli.json"
    config.write_text(json.dumps({"nats_url": mesh.server.url, "data_dir": str(mesh.workdir)}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = await asyncio.to_thread(
            cli.main, ["node", "reset", "node-r", "--config", str(config)]
        )
    assert code == 0 and "pin cleared" in out.getvalue()
    assert await _pin_of(bus, "node-r") is None

    audit = await mesh.audit_log(bus)
    assert await audit.load_checkpoint() is not None
    resets = [e for e in await audit.entries() if e.outcome is Outcome.PIN_RESET]
    assert [(e.node, e.reason) for e in resets] == [("node-r", "node.pin_reset")]
    await audit.verify_chain()

    assert (await rebuilt.attest_once()).released
    new_pin = await _pin_of(bus, "node-r")
    assert new_pin is not None and new_pin != old_pin
    # The old chip is now the stranger.
    assert (await mesh.node(bus, "node-r").attest_once()).reason == "node.identity_mismatch"


async def test_pinning_can_be_switched_off(
    nats_server: NatsServer, tmp_path: Path, bus: Bus
) -> None:
    running = TestMesh(nats_server, tmp_path, pinning=False)
    await running.start()
    try:
        assert (await running.node(bus, "node-o").attest_once()).released
        other = CollectorNode(
            bus,
            "node-o",
            _other_chip(running, "node-o"),
            running.collector_trust(),
            decision_timeout=10,
        )
        assert (await other.attest_once()).released
        assert await _pin_of(bus, "node-o") is None
    finally:
        await running.stop()


async def test_other_hardware_cannot_shield_a_node_from_revocation(
    mesh: TestMesh, bus: Bus
) -> None:
    """Impostor evidence is refused, and must not displace the node's own evidence in the
    verifier's memory: a collateral change afterwards still revokes the real node."""
    revoked: asyncio.Queue[events.Revocation] = asyncio.Queue()

    async def on_revoked(msg: Msg) -> None:
        revoked.put_nowait(events.decode(msg.data, events.Revocation))

    watch = await bus.nc.subscribe(subjects.revoked("node-v"), cb=on_revoked)
    node = mesh.node(bus, "node-v")
    assert (await node.attest_once()).released
    impostor = CollectorNode(
        bus, "node-v", _other_chip(mesh, "node-v"), mesh.collector_trust(), decision_timeout=10
    )
    assert (await impostor.attest_once()).reason == "node.identity_mismatch"

    request = CollateralRequest("crl.der", crl_url(DEFAULT_KDS, Product.MILAN))
    collateral = NatsKeyValue(await bus.key_value(subjects.BUCKET_COLLATERAL))
    await store(collateral, request, mesh.pki.amd.crl(revoke=("ask",)), at=time.time())
    announcement = await asyncio.wait_for(revoked.get(), 20)
    await watch.unsubscribe()
    assert announcement.node == "node-v"
    refused = await ask_again(bus, node)
    assert not refused.ok and refused.reason == "broker.revoked"


async def test_node_reset_of_an_unpinned_or_invalid_name(
    nats_server: NatsServer, bus: Bus, tmp_path: Path
) -> None:
    config = tmp_path / "cli.json"
    config.write_text(json.dumps({"nats_url": nats_server.url, "data_dir": str(tmp_path)}))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        unpinned = await asyncio.to_thread(
            cli.main, ["node", "reset", "node-u", "--config", str(config)]
        )
        invalid = await asyncio.to_thread(
            cli.main, ["node", "reset", "a.b.>", "--config", str(config)]
        )
    assert unpinned == 0 and "not pinned" in out.getvalue()
    assert invalid == 2 and "subject.bad_token" in err.getvalue()
    state = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
    assert [k for k in await state.keys() if k.startswith("audit.")] == []  # nothing to audit


async def test_a_reappraisal_of_other_hardware_revokes_nothing(mesh: TestMesh, bus: Bus) -> None:
    """An impostor's remembered evidence, re-appraised after a collateral change, names the
    impostor's machine even if it reused the node's evidence id: it is refused, and the
    node keeps its decision."""
    node = mesh.node(bus, "node-w")
    assert (await node.attest_once()).released
    pin = await _pin_of(bus, "node-w")
    assert pin is not None
    other = "snp.chip_id:" + "ee" * 64
    assert other != pin
    appraisal = Appraisal(family="snp", status=Status.CONTRAINDICATED, verified=False)
    subject = ear.Subject(
        node="node-w",
        evidence_id=node.last_evidence_id,
        nonce=b"n" * 32,
        public_key=node.last_public_key,
    )
    for hwid, expected in ((other, "node.identity_mismatch"), (pin, None)):
        token = ear.issue(
            mesh.verifier_key,
            appraisal,
            subject,
            now=events.utcnow(),
            ttl=60,
            reappraisal=True,
            proven_hwid=hwid,
        )
        verdict = events.Verdict(
            node="node-w",
            family="snp",
            evidence_id=node.last_evidence_id,
            status=Status.CONTRAINDICATED.value,
            ear=token,
        )
        await bus.publish(subjects.verdict("snp", "node-w"), verdict)
        if expected is not None:
            letters = await _letters(bus, 1)
            assert [d.reason for d in letters] == [expected]
            still = await ask_again(bus, node)
            assert still.reason == "broker.already_released", still  # not revoked
    refused = None
    for _ in range(40):  # the genuine re-appraisal of the node's own machine does revoke
        refused = await ask_again(bus, node)
        if refused.reason == "broker.revoked":
            break
        await asyncio.sleep(0.25)
    assert refused is not None and refused.reason == "broker.revoked", refused
