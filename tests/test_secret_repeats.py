"""A node asking again with the very same secret request gets the same answer, once
released (``services/broker/replays.py``); anything else that repeats is still refused."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from nats.aio.msg import Msg

from services.broker import replays
from services.broker.audit import Outcome
from services.broker.replays import Replays, request_key
from services.collector.service import DEFAULT_RESOURCE
from services.mesh import events, subjects
from services.mesh.bus import Bus
from services.testing.mesh import TestMesh, ask_again


def _released(text: str = "s") -> events.SecretResponse:
    return events.SecretResponse(
        node="n", resource="default/x/y", ok=True, enc=b"e", ciphertext=text.encode()
    )


def _counting(answer: events.Message) -> tuple[Callable[[], Awaitable[events.Message]], list[int]]:
    made: list[int] = []

    async def make() -> events.Message:
        made.append(1)
        await asyncio.sleep(0.01)
        return answer

    return make, made


async def test_an_identical_request_gets_the_first_answer_and_no_second_record(
    mesh: TestMesh, bus: Bus
) -> None:
    seen: list[Msg] = []

    async def copy(msg: Msg) -> None:
        seen.append(msg)

    await bus.nc.subscribe(subjects.secret("node-1"), cb=copy)
    node = mesh.node(bus, "node-1")
    assert (await node.attest_once()).released
    assert len(seen) == 1
    original = seen[0]
    first = await bus.nc.request(original.subject, original.data, timeout=5.0)
    again = events.decode(first.data, events.SecretResponse)
    assert again.ok and again.ciphertext and again.enc
    second = events.decode(
        (await bus.nc.request(original.subject, original.data, timeout=5.0)).data,
        events.SecretResponse,
    )
    assert (second.enc, second.ciphertext, second.audit_id) == (
        again.enc,
        again.ciphertext,
        again.audit_id,
    )
    log = await mesh.audit_log(bus)
    assert [record.outcome for record in await log.entries()] == [Outcome.RELEASED]
    assert mesh.broker is not None and mesh.broker.replays.replayed == 2
    # The same decision asked with a new request (another id) is a repeat release: refused.
    other = await ask_again(bus, node)
    assert not other.ok and other.reason == "broker.already_released"
    # Identical bytes on another node's subject are another request (refused, not replayed).
    moved = await bus.nc.request(subjects.secret("node-2"), original.data, timeout=5.0)
    assert events.decode(moved.data, events.SecretResponse).reason == "broker.routing_mismatch"


async def test_copies_in_flight_wait_for_the_first_answer() -> None:
    memo = Replays()
    first = _released()
    make, made = _counting(first)
    key = request_key("attest.secret.n", b"request")
    answers = await asyncio.gather(*(memo.answer(key, make) for _ in range(5)))
    assert made == [1]
    assert [repeated for _, repeated in answers].count(False) == 1
    assert all(answer is first for answer, _ in answers)


async def test_refusals_are_decided_afresh_every_time() -> None:
    memo = Replays()
    refused = events.SecretResponse(
        node="n", resource="default/x/y", ok=False, reason="broker.decision_pending"
    )
    make, made = _counting(refused)
    key = request_key("attest.secret.n", b"request")
    for _ in range(3):
        answer, repeated = await memo.answer(key, make)
        assert not repeated and answer == refused
    assert made == [1, 1, 1]


async def test_an_answer_is_kept_for_a_while_and_then_forgotten() -> None:
    now = [0.0]
    memo = Replays(clock=lambda: now[0])
    make, made = _counting(_released())
    key = request_key("attest.secret.n", b"request")
    await memo.answer(key, make)
    now[0] = replays.KEEP_S - 1
    assert (await memo.answer(key, make))[1] is True
    now[0] = replays.KEEP_S + 1
    assert (await memo.answer(key, make))[1] is False
    assert made == [1, 1]


async def test_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replays, "MAX_KEPT", 8)
    memo = Replays()
    for index in range(50):
        make, _ = _counting(_released(str(index)))
        await memo.answer(request_key("s", str(index).encode()), make)
    assert len(memo._kept) == 8
    make, _ = _counting(_released())
    assert (await memo.answer(request_key("s", b"0"), make))[1] is False  # long forgotten


async def test_a_failed_first_copy_fails_its_waiting_copies_too() -> None:
    memo = Replays()
    key = request_key("attest.secret.n", b"request")

    async def broken() -> events.Message:
        await asyncio.sleep(0.01)
        raise RuntimeError("kv down")

    results = await asyncio.gather(
        *(memo.answer(key, broken) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(result, RuntimeError) for result in results)
    make, made = _counting(_released())
    assert (await memo.answer(key, make))[1] is False and made == [1]


async def _released_request(mesh: TestMesh, bus: Bus, name: str) -> Msg:
    seen: list[Msg] = []

    async def copy(msg: Msg) -> None:
        seen.append(msg)

    sub = await bus.nc.subscribe(subjects.secret(name), cb=copy)
    assert (await mesh.node(bus, name).attest_once()).released
    await sub.unsubscribe()
    assert len(seen) == 1
    return seen[0]


async def _again(bus: Bus, original: Msg) -> events.SecretResponse:
    reply = await bus.nc.request(original.subject, original.data, timeout=5.0)
    return events.decode(reply.data, events.SecretResponse)


async def test_a_replaced_secret_is_not_handed_out_again(mesh: TestMesh, bus: Bus) -> None:
    original = await _released_request(mesh, bus, "node-r1")
    assert (await _again(bus, original)).ok
    assert mesh.broker is not None and mesh.broker.store is not None
    await mesh.broker.store.put(DEFAULT_RESOURCE, b"replaced")
    again = await _again(bus, original)
    assert not again.ok and again.reason == "broker.already_released" and not again.ciphertext


async def test_a_withdrawn_decision_is_not_answered_again(mesh: TestMesh, bus: Bus) -> None:
    original = await _released_request(mesh, bus, "node-r2")
    assert (await _again(bus, original)).ok
    assert mesh.broker is not None and mesh.broker.state is not None
    await mesh.broker.state.delete("decision.node-r2")  # as if revoked and then expired
    mesh.broker.recorded = type(mesh.broker.recorded)()  # and this broker restarted
    again = await _again(bus, original)
    assert not again.ok and not again.ciphertext


async def test_kept_answers_are_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replays, "MAX_KEPT_BYTES", 10)
    memo = Replays()
    for index in range(5):
        make, _ = _counting(_released("abcd"))
        await memo.answer(request_key("s", str(index).encode()), make)
    assert len(memo._kept) == 2 and memo._kept_bytes == 8
