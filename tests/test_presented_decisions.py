"""A node presents its signed allow decision with its secret request; the broker records it
only if it is the node's newest decision (``services/broker/presented.py``).

What must hold: the policy's signature, the node and the expiry are checked as for a recorded
decision; an older allow never replaces a newer decision, however it arrives; denies,
refusals and re-appraisals are never recorded this way; and the consumer, meeting a
decision recorded this way, finds it stored and writes nothing.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from services.broker import presented
from services.broker.held import DECISION_PREFIX, STORED_SEPARATOR, HeldDecision
from services.broker.sealing import KeyFileSource
from services.broker.service import BrokerService
from services.collector.service import DEFAULT_RESOURCE
from services.mesh import events, subjects
from services.mesh.bus import Bus
from services.mesh.errors import ReleaseError
from services.mesh.keys import SigningKey, TrustedKeys
from services.policy import summary
from services.testing.memkv import MemoryKeyValue
from services.testing.mesh import TestMesh
from services.verifier.ear import b64url

POLICY = SigningKey.generate("policy")
NODE = "node-p"
KEY = b"k" * 32


def _token(
    *,
    allow: bool = True,
    after_us: int = 0,
    node: str = NODE,
    signer: SigningKey = POLICY,
    precise: bool = True,
    reappraisal: bool = False,
    refused: bool = False,
    appraisal: bytes = b"",
) -> tuple[str, str]:
    """A policy-signed decision issued ``after_us`` microseconds into the current second."""
    now = events.utcnow().replace(microsecond=0)
    decision_id = events.new_id()
    claims: dict[str, object] = {
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(minutes=5)).timestamp()),
        "jti": decision_id,
        "node": node,
        "family": "snp",
        "status": "affirming",
        "allow": allow,
        "reasons": [],
        "public_key": b64url(KEY),
        "verdict_id": "verdict-" + decision_id,
        "evidence_id": "evidence-" + decision_id,
        "reappraisal": reappraisal,
        "refused": refused,
    }
    if precise:
        claims["issued_us"] = int(now.timestamp()) * 1_000_000 + after_us
    if appraisal:
        claims["appraisal_sha256"] = summary.digest(appraisal)
    return signer.sign(claims), decision_id


def _request(
    token: str, decision_id: str, *, evidence_id: str = "", appraisal: bytes = b""
) -> events.SecretRequest:
    return events.SecretRequest(
        node=NODE,
        resource=DEFAULT_RESOURCE,
        public_key=KEY,
        decision_id=decision_id,
        evidence_id=evidence_id,
        decision_token=token,
        decision_appraisal=appraisal,
    )


@pytest.fixture
def broker() -> BrokerService:
    """A broker whose decision state is in memory: only its decision handling is used."""
    service = BrokerService(
        None,  # type: ignore[arg-type]
        TrustedKeys({"policy": POLICY.public_key()}),
        None,  # type: ignore[arg-type]
    )
    service.state = MemoryKeyValue()
    return service


async def _stored(broker: BrokerService) -> bytes | None:
    """The stored decision's token (the appraisal bytes follow it after a newline)."""
    assert broker.state is not None
    found = await broker.state.get(DECISION_PREFIX + NODE)
    return None if found is None else found[0].partition(STORED_SEPARATOR)[0]


async def _refusal(broker: BrokerService, request: events.SecretRequest) -> str:
    with pytest.raises(ReleaseError) as refused:
        await broker._holder(request)
    return refused.value.reason


async def test_a_presented_allow_is_recorded_when_nothing_newer_is(
    broker: BrokerService,
) -> None:
    first, first_id = _token(after_us=100)
    held = await broker._holder(_request(first, first_id))
    assert held.decision_id == first_id and await _stored(broker) == first.encode()
    newer, newer_id = _token(after_us=200)
    assert (await broker._holder(_request(newer, newer_id))).decision_id == newer_id
    assert await _stored(broker) == newer.encode()
    again = await broker._holder(_request(newer, newer_id))  # asked twice: nothing rewritten
    assert again.decision_id == newer_id


async def test_an_older_allow_never_replaces_a_newer_deny(broker: BrokerService) -> None:
    older_allow, allow_id = _token(after_us=100)
    newer_deny, _ = _token(allow=False, after_us=200)
    assert broker.state is not None
    await broker.state.create(DECISION_PREFIX + NODE, newer_deny.encode())
    assert await _refusal(broker, _request(older_allow, allow_id)) == "broker.decision_superseded"
    assert await _stored(broker) == newer_deny.encode()


async def test_an_older_allow_never_replaces_a_newer_allow(broker: BrokerService) -> None:
    older, older_id = _token(after_us=100)
    newer, newer_id = _token(after_us=900_000)
    await broker._holder(_request(newer, newer_id))
    assert await _refusal(broker, _request(older, older_id)) == "broker.decision_superseded"
    assert await _stored(broker) == newer.encode()


async def test_decisions_of_one_second_without_microseconds_do_not_replace_each_other(
    broker: BrokerService,
) -> None:
    stored, _ = _token(precise=False)
    offered, offered_id = _token(precise=False)
    assert broker.state is not None
    await broker.state.create(DECISION_PREFIX + NODE, stored.encode())
    assert await _refusal(broker, _request(offered, offered_id)) == "broker.decision_pending"
    assert await _stored(broker) == stored.encode()


@pytest.mark.parametrize(
    ("allow", "refused", "reappraisal"),
    [(False, False, False), (False, True, False), (True, False, True)],
)
async def test_only_allow_decisions_are_recorded_this_way(
    broker: BrokerService, allow: bool, refused: bool, reappraisal: bool
) -> None:
    token, decision_id = _token(after_us=500, allow=allow, refused=refused, reappraisal=reappraisal)
    assert await _refusal(broker, _request(token, decision_id)) == "broker.no_decision"
    assert await _stored(broker) is None


async def test_what_does_not_verify_is_refused_and_not_recorded(broker: BrokerService) -> None:
    forged, forged_id = _token(signer=SigningKey.generate("policy"))
    assert await _refusal(broker, _request(forged, forged_id)) == "broker.decision_invalid"
    other_node, other_id = _token(node="node-q")
    assert await _refusal(broker, _request(other_node, other_id)) == "broker.decision_invalid"
    genuine, genuine_id = _token()
    header, payload, signature = genuine.split(".")
    flipped = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1]
    tampered = ".".join([header, flipped, signature])
    assert await _refusal(broker, _request(tampered, genuine_id)) == "broker.decision_invalid"
    assert await _refusal(broker, _request(genuine, "another-id")) == "broker.routing_mismatch"
    assert await _stored(broker) is None


async def test_the_appraisal_summary_is_recorded_only_if_the_token_signed_it(
    broker: BrokerService,
) -> None:
    appraisal = summary.encode({"measurement": "ab" * 48}, "hw-1")
    token, decision_id = _token(appraisal=appraisal)
    other = summary.encode({"measurement": "cd" * 48}, "hw-1")
    assert await _refusal(broker, _request(token, decision_id, appraisal=other)) == (
        "broker.decision_invalid"
    )
    assert await _refusal(broker, _request(token, decision_id)) == "broker.decision_invalid"
    assert await _stored(broker) is None
    held = await broker._holder(_request(token, decision_id, appraisal=appraisal))
    assert held.appraisal.claims == {"measurement": "ab" * 48}
    assert broker.state is not None
    found = await broker.state.get(DECISION_PREFIX + NODE)
    assert found is not None and found[0] == token.encode() + STORED_SEPARATOR + appraisal
    assert (await broker.current_decision(NODE)).appraisal.claims == held.appraisal.claims


async def test_racing_presentations_leave_the_newest(broker: BrokerService) -> None:
    tokens = [_token(after_us=us) for us in (700, 100, 500, 300, 600, 200)]
    results = await asyncio.gather(
        *(broker._holder(_request(t, i)) for t, i in tokens), return_exceptions=True
    )
    assert await _stored(broker) == tokens[0][0].encode()
    assert any(isinstance(r, HeldDecision) for r in results)
    for (_, decision_id), result in zip(tokens, results, strict=True):
        if isinstance(result, HeldDecision):
            assert result.decision_id == decision_id


def test_the_order_is_the_signed_microseconds_within_the_signed_second() -> None:
    assert presented.order_of({"iat": 5, "issued_us": 5_250_000}) == 5_250_000
    assert presented.order_of({"iat": 5}) == 5_000_000
    assert presented.order_of({"iat": 5, "issued_us": 9_000_000}) == 5_000_000  # not within
    assert presented.order_of({"iat": 5, "issued_us": True}) == 5_000_000


async def test_the_node_gets_its_secret_without_the_brokers_consumer(
    mesh: TestMesh, bus: Bus
) -> None:
    """A broker answering requests but consuming no decisions still releases under a
    presented allow; the consumer, started afterwards, writes nothing more."""
    await mesh.halt("broker")
    standalone = await Bus.connect(mesh.server.url, "broker-standalone")
    try:
        await standalone.setup(nonce_ttl=60.0)
        broker = BrokerService(
            standalone,
            mesh.trusted,
            KeyFileSource.in_data_dir(mesh.workdir),
            signer=mesh.broker_key,
        )
        await broker.start(seed={DEFAULT_RESOURCE: mesh.secret})
        received: dict[str, bytes] = {}
        node = mesh.node(bus, NODE, received=received)
        result = await node.attest_once()
        assert result.released, result
        assert received[NODE] == mesh.secret
        held = await broker.current_decision(NODE)
        assert held.decision_id == node.last_decision_id
        assert broker.state is not None
        found = await broker.state.get(DECISION_PREFIX + NODE)
        assert found is not None

        stop = asyncio.Event()
        consuming = asyncio.create_task(broker.run(stop, max_deliver=3, ack_wait=5.0))
        for _ in range(100):  # the consumer has caught up with the decision stream
            info = await bus.js.consumer_info(subjects.STREAM_DECISIONS, "broker")
            if info.num_ack_pending == 0 and info.num_pending == 0:
                break
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(consuming, 15)
        after = await broker.state.get(DECISION_PREFIX + NODE)
        assert after == found  # the same token at the same revision: not written again
    finally:
        await standalone.close()
