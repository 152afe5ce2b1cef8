"""The broker remembers what it last saw under each node's decision key
(``services/broker/recorded.py``): fewer round trips, never a weaker decision.

What must hold: a newer presented decision is one compare-and-set, and the consumer meeting
an allow this broker recorded does nothing at all; but a decision written elsewhere (another
replica, a direct write of a genuine newer token) is found by the compare-and-set failing
and respected; a replayed older decision is still ``broker.decision_superseded``; a deny
still wins over an older allow presented later, even one this broker remembers as stored;
and the memory is bounded and its per-node turns disappear when no one takes them.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from nats.aio.msg import Msg

from services.broker import recorded
from services.broker.held import DECISION_PREFIX, STORED_SEPARATOR
from services.broker.recorded import Recorded
from services.broker.service import BrokerService
from services.mesh import events, subjects
from services.mesh.errors import ReleaseError
from services.mesh.keys import TrustedKeys
from services.testing.memkv import CountingKeyValue
from tests.test_presented_decisions import NODE, POLICY, _request, _token

KEY = DECISION_PREFIX + NODE


def _broker(kv: CountingKeyValue | None = None) -> BrokerService:
    """A broker whose decision state is in memory: only its decision handling is used."""
    service = BrokerService(
        None,  # type: ignore[arg-type]
        TrustedKeys({"policy": POLICY.public_key()}),
        None,  # type: ignore[arg-type]
    )
    service.state = kv if kv is not None else CountingKeyValue()
    return service


def _kv(broker: BrokerService) -> CountingKeyValue:
    assert isinstance(broker.state, CountingKeyValue)
    return broker.state


def _delivered(token: str, *, allow: bool = True) -> Msg:
    """The decision as the consumer is delivered it."""
    decision = events.Decision(
        node=NODE,
        evidence_id="evidence",
        status="affirming" if allow else "contraindicated",
        allow=allow,
        expires_at=datetime.now(UTC) + timedelta(minutes=5),
        token=token,
    )
    return Msg(None, subject=subjects.decision(NODE), data=events.encode(decision))  # type: ignore[arg-type]


async def _stored(broker: BrokerService) -> bytes:
    found = await _kv(broker).get(KEY)
    assert found is not None
    return found[0].partition(STORED_SEPARATOR)[0]


async def _refusal(broker: BrokerService, token: str, decision_id: str) -> str:
    with pytest.raises(ReleaseError) as refused:
        await broker._holder(_request(token, decision_id))
    return refused.value.reason


async def test_a_newer_presented_decision_is_one_compare_and_set() -> None:
    broker = _broker()
    kv = _kv(broker)
    first, first_id = _token(after_us=100)
    await broker._holder(_request(first, first_id))
    for after_us in (200, 300, 400):
        token, decision_id = _token(after_us=after_us)
        before = kv.calls.copy()
        assert (await broker._holder(_request(token, decision_id))).decision_id == decision_id
        assert kv.calls - before == {"update": 1}
        assert await _stored(broker) == token.encode()


async def test_the_consumer_meeting_a_presented_allow_does_nothing() -> None:
    broker = _broker()
    kv = _kv(broker)
    token, decision_id = _token(after_us=100)
    await broker._holder(_request(token, decision_id))
    stored = await kv.get(KEY)
    before = kv.round_trips
    await broker.handle_decision(_delivered(token))
    await broker.handle_decision(_delivered(token))  # redelivered
    assert kv.round_trips == before
    assert await kv.get(KEY) == stored


async def test_the_consumer_first_writes_by_compare_and_set_and_the_request_reads_once() -> None:
    broker = _broker()
    kv = _kv(broker)
    first, _ = _token(after_us=100)
    await broker.handle_decision(_delivered(first))
    token, decision_id = _token(after_us=200)
    before = kv.calls.copy()
    await broker.handle_decision(_delivered(token))
    assert kv.calls - before == {"update": 1}
    before = kv.calls.copy()
    assert (await broker._holder(_request(token, decision_id))).decision_id == decision_id
    assert kv.calls - before == {"get": 1}  # the same decision: is anything newer stored?


async def test_the_consumer_and_a_request_racing_on_one_decision_do_not_conflict() -> None:
    broker = _broker()
    kv = _kv(broker)
    first, first_id = _token(after_us=100)
    await broker._holder(_request(first, first_id))
    token, decision_id = _token(after_us=200)
    before = kv.calls.copy()
    await asyncio.gather(
        broker.handle_decision(_delivered(token)), broker._holder(_request(token, decision_id))
    )
    assert kv.calls - before == {"update": 1, "get": 1} or kv.calls - before == {"update": 1}
    assert await _stored(broker) == token.encode()
    assert broker.recorded._turns == {}


async def test_a_newer_decision_written_by_another_replica_is_respected() -> None:
    kv = CountingKeyValue()
    mine, other = _broker(kv), _broker(kv)
    first, first_id = _token(after_us=100)
    await mine._holder(_request(first, first_id))
    newest, newest_id = _token(after_us=900)
    await other._holder(_request(newest, newest_id))
    between, between_id = _token(after_us=500)  # newer than what `mine` remembers
    before = kv.calls.copy()
    assert await _refusal(mine, between, between_id) == "broker.decision_superseded"
    assert kv.calls - before == {"update": 1, "get": 1}  # the conflict, then the read
    assert await _stored(mine) == newest.encode()
    await mine.handle_decision(_delivered(between))  # nor does its consumer write it
    assert await _stored(mine) == newest.encode()


async def test_a_genuine_newer_token_written_directly_is_respected() -> None:
    broker = _broker()
    kv = _kv(broker)
    first, first_id = _token(after_us=100)
    await broker._holder(_request(first, first_id))
    newest, _ = _token(allow=False, after_us=900)
    kv.overwrite(KEY, newest.encode() + STORED_SEPARATOR)
    later, later_id = _token(after_us=500)
    assert await _refusal(broker, later, later_id) == "broker.decision_superseded"
    assert await _refusal(broker, first, first_id) == "broker.decision_superseded"
    assert await _stored(broker) == newest.encode()


async def test_a_replayed_older_decision_is_still_superseded() -> None:
    broker = _broker()
    older, older_id = _token(after_us=100)
    newer, newer_id = _token(after_us=200)
    await broker._holder(_request(older, older_id))
    await broker._holder(_request(newer, newer_id))
    for _ in range(2):
        assert await _refusal(broker, older, older_id) == "broker.decision_superseded"
    assert await _stored(broker) == newer.encode()


async def test_a_deny_recorded_elsewhere_wins_over_the_allow_this_broker_remembers() -> None:
    """The broker remembers its allow as stored; its consumer, redelivered that allow,
    skips it and so cannot write it back over the deny another replica recorded meanwhile;
    the next request under the allow still reads, and is refused."""
    kv = CountingKeyValue()
    mine, other = _broker(kv), _broker(kv)
    allow, allow_id = _token(after_us=100)
    assert (await mine._holder(_request(allow, allow_id))).decision_id == allow_id
    assert mine.recorded.holds(KEY, allow.encode() + STORED_SEPARATOR)
    deny, _ = _token(allow=False, after_us=200)
    assert await other._record(KEY, deny.encode(), other.decisions.read(deny, b"", NODE), NODE)
    await mine.handle_decision(_delivered(allow))
    assert await _stored(mine) == deny.encode()
    assert await _refusal(mine, allow, allow_id) == "broker.decision_superseded"
    assert await _stored(mine) == deny.encode()


async def test_a_deny_written_over_the_remembered_allow_by_compare_and_set() -> None:
    """A deny the consumer meets is written against the remembered allow's revision when
    it is newer (one write, no read); a deny is never skipped from memory."""
    broker = _broker()
    kv = _kv(broker)
    allow, allow_id = _token(after_us=100)
    await broker._holder(_request(allow, allow_id))
    deny, _ = _token(allow=False, after_us=200)
    record = deny.encode()
    held = broker.decisions.read(deny, b"", NODE)
    before = kv.calls.copy()
    assert await broker._record(KEY, record, held, NODE)
    assert kv.calls - before == {"update": 1}
    before = kv.calls.copy()
    assert await broker._record(KEY, record, held, NODE)  # redelivered: read, not skipped
    assert kv.calls - before == {"get": 1}
    assert await _refusal(broker, allow, allow_id) == "broker.decision_superseded"


def test_the_memory_keeps_the_latest_observation_and_is_bounded() -> None:
    memory = Recorded(limit=2)
    memory.note("decision.a", b"x", 5, 10)
    memory.note("decision.a", b"older", 4, 9)  # observed earlier, arrived later: ignored
    seen = memory.recall("decision.a")
    assert seen is not None and (seen.revision, seen.order) == (5, 10)
    assert memory.holds("decision.a", b"x") and not memory.holds("decision.a", b"older")
    memory.forget("decision.a", 4)  # not the entry kept: nothing happens
    assert memory.recall("decision.a") is not None
    memory.forget("decision.a", 5)
    assert memory.recall("decision.a") is None
    for i in range(4):
        memory.note(f"decision.n{i}", b"x", i + 1, i)
    assert len(memory) == 2 and memory.recall("decision.n0") is None
    assert "x" not in repr(memory)


async def test_a_write_over_a_remembered_record_that_changed_forgets_it() -> None:
    kv = CountingKeyValue()
    memory = Recorded()
    revision = await kv.create(KEY, b"one")
    memory.note(KEY, b"one", revision, 1)
    kv.overwrite(KEY, b"changed elsewhere")
    assert not await recorded.write_over(kv, memory, KEY, b"two", 2)
    assert memory.recall(KEY) is None
    assert kv.raw(KEY) == b"changed elsewhere"
    memory.note(KEY, b"three", 99, 3)
    assert not await recorded.write_over(kv, memory, KEY, b"two", 2)  # not older: no write
    assert kv.calls["update"] == 1


async def test_turns_serialise_one_key_and_leave_nothing_behind() -> None:
    memory = Recorded()
    inside: list[str] = []

    async def take(key: str, label: str) -> None:
        async with memory.turn(key):
            inside.append(f"+{label}")
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            inside.append(f"-{label}")

    await asyncio.gather(take("decision.a", "1"), take("decision.a", "2"), take("decision.b", "3"))
    assert inside.index("-1") < inside.index("+2") or inside.index("-2") < inside.index("+1")
    assert memory._turns == {}
    with pytest.raises(RuntimeError):
        async with memory.turn("decision.a"):
            raise RuntimeError("a failure inside a turn")
    assert memory._turns == {}
