"""Collectors act only on decisions the policy signed for their round."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from nats.aio.msg import Msg

from services.collector import decisions
from services.mesh import events, subjects
from services.mesh.bus import Bus
from services.mesh.errors import Rejected
from services.mesh.keys import SigningKey, TrustedKeys
from services.testing.mesh import TestMesh
from services.verifier.ear import b64url

NOW = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = SigningKey.generate("policy")
TRUSTED = TrustedKeys.from_pem("policy", POLICY.public_pem())
KEY = b"k" * 32


def _decision(
    signer: SigningKey,
    *,
    node: str = "node-1",
    evidence_id: str = "ev-1",
    allow: bool = False,
    public_key: bytes = KEY,
    issued: datetime = NOW,
    decision_id: str | None = None,
) -> events.Decision:
    decision_id = decision_id or events.new_id()
    token = signer.sign(
        {
            "iat": int(issued.timestamp()),
            "exp": int((issued + timedelta(minutes=5)).timestamp()),
            "jti": decision_id,
            "node": node,
            "status": "affirming",
            "allow": allow,
            "reasons": [],
            "public_key": b64url(public_key),
            "evidence_id": evidence_id,
        }
    )
    return events.Decision(
        id=decision_id,
        node=node,
        evidence_id=evidence_id,
        status="affirming",
        allow=allow,
        expires_at=issued + timedelta(minutes=5),
        token=token,
    )


def _read(decision: events.Decision, *, now: datetime = NOW) -> decisions.SignedDecision:
    return decisions.read(
        decision, TRUSTED, node="node-1", evidence_id="ev-1", public_key=KEY, now=now
    )


def _refusal(decision: events.Decision, *, now: datetime = NOW) -> str:
    with pytest.raises(Rejected) as err:
        _read(decision, now=now)
    return err.value.reason


def test_a_decision_signed_for_this_round_is_read_from_its_signed_claims() -> None:
    genuine = _decision(POLICY, allow=True)
    read = _read(genuine)
    assert read.allow is True and read.id == genuine.id and read.status == "affirming"


def test_anything_else_is_refused_with_the_reason() -> None:
    unsigned = msgspec.structs.replace(_decision(POLICY), token="eyJhbGciOiJub25lIn0.e30.")
    assert _refusal(unsigned) == "token.unknown_signer"
    assert _refusal(_decision(SigningKey.generate("policy"))) == "token.unknown_signer"
    verifier = SigningKey.generate("verifier-snp")
    both = TrustedKeys(
        {"policy": POLICY._private.public_key(), "verifier-snp": verifier._private.public_key()}
    )
    with pytest.raises(Rejected, match="token.wrong_signer"):
        decisions.read(
            _decision(verifier), both, node="node-1", evidence_id="ev-1", public_key=KEY, now=NOW
        )
    assert _refusal(_decision(POLICY, node="node-2")) == "collector.decision_wrong_node"
    assert _refusal(_decision(POLICY, evidence_id="ev-0")) == "collector.decision_wrong_evidence"
    assert _refusal(_decision(POLICY, public_key=b"x" * 32)) == "collector.decision_wrong_key"
    assert _refusal(_decision(POLICY), now=NOW + timedelta(minutes=6)) == "token.expired"
    flipped = msgspec.structs.replace(_decision(POLICY), allow=True)  # plain field lies
    assert _refusal(flipped) == "collector.decision_routing_mismatch"


async def test_forged_denies_are_ignored_and_the_node_gets_its_secret(
    mesh: TestMesh, bus: Bus
) -> None:
    """Evidence ids are public on ``attest.evidence.>``: an attacker answers first."""
    await mesh.halt("verifier-snp")  # so the attacker's answers surely come first
    received: dict[str, bytes] = {}
    node = mesh.node(bus, "node-v", received=received, decision_timeout=60.0)

    async def attack(msg: Msg) -> None:
        event = events.decode(msg.data, events.EvidenceEvent)
        forged = _decision(
            SigningKey.generate("policy"),
            node=event.node,
            evidence_id=event.id,
            public_key=event.public_key,
            issued=events.utcnow(),
        )
        unsigned = msgspec.structs.replace(forged, id=events.new_id(), token="e30.e30.")
        # Genuinely signed by the policy, but about the node's earlier evidence.
        replayed = _decision(
            mesh.policy_key,
            node=event.node,
            evidence_id="an-earlier-evidence-id",
            public_key=event.public_key,
            issued=events.utcnow() - timedelta(seconds=60),
        )
        for decision in (unsigned, forged, replayed):
            await bus.nc.publish(subjects.decision(event.node), events.encode(decision))

    sub = await bus.nc.subscribe(subjects.evidence("snp", "node-v"), cb=attack)
    try:
        round_task = asyncio.create_task(node.attest_once())
        for _ in range(200):
            if sum(node.ignored.values()) >= 3:
                break
            await asyncio.sleep(0.05)
        assert node.ignored == Counter(
            {"token.unknown_signer": 2, "collector.decision_wrong_evidence": 1}
        )
        assert not round_task.done()  # still waiting for the genuine decision
        await mesh.start_verifier()
        result = await asyncio.wait_for(round_task, 60)
    finally:
        await sub.unsubscribe()
    assert result.allowed and result.released, result
    assert received["node-v"] == mesh.secret


async def test_a_node_subscribes_once_and_only_a_waiting_round_reads(
    mesh: TestMesh, bus: Bus
) -> None:
    node = mesh.node(bus, "node-s")
    assert (await node.attest_once()).released
    listening = node._decision_sub
    assert listening is not None
    await bus.nc.publish(subjects.decision("node-s"), b"not a decision")
    await bus.nc.flush()
    await asyncio.sleep(0.2)
    assert not node.ignored  # no round was waiting: nothing read, nothing counted
    assert (await node.attest_once()).released
    assert node._decision_sub is listening
    assert not node._listeners
