"""Requests served concurrently, through a bounded queue, with stale ones dropped unread
(``services/mesh/responder.py``), and senders that back off (``Bus.request``), on a real
nats-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
import pytest
from nats.aio.msg import Msg

from services.mesh import bus as bus_mod
from services.mesh import events
from services.mesh.bus import Bus
from services.mesh.errors import BusError, ParseError
from services.mesh.responder import (
    BUSY,
    DEFAULT_TIMEOUT_MS,
    EXPIRED,
    MAX_TIMEOUT_MS,
    TIMEOUT_HEADER,
    request_timeout_ms,
)

SUBJECT = "attest.nonce.node-r"


def _challenge(node: str) -> events.NonceChallenge:
    return events.NonceChallenge(node=node, nonce=b"n" * 32, expires_at=events.utcnow())


async def _raw(bus: Bus, headers: dict[str, str] | None = None, timeout: float = 2.0) -> Msg:
    payload = events.encode(events.NonceRequest(node="node-r"))
    return await bus.nc.request(SUBJECT, payload, timeout=timeout, headers=headers)


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never came about")


async def test_requests_are_handled_at_once_not_one_after_another(bus: Bus) -> None:
    running = 0
    most = 0
    release = asyncio.Event()

    async def slow(msg: Msg) -> events.Message:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return _challenge("node-r")

    await bus.serve(SUBJECT, slow, queue="policy", workers=8)
    asks = [
        asyncio.create_task(
            bus.request(SUBJECT, events.NonceRequest(node="node-r"), events.NonceChallenge)
        )
        for _ in range(6)
    ]
    for _ in range(100):
        if most == 6:
            break
        await asyncio.sleep(0.01)
    release.set()
    answers = await asyncio.gather(*asks)
    assert most == 6  # one at a time would have stopped at 1
    assert all(answer.nonce == b"n" * 32 for answer in answers)


async def test_a_full_queue_says_busy_at_once(bus: Bus) -> None:
    release = asyncio.Event()

    async def slow(msg: Msg) -> events.Message:
        await release.wait()
        return _challenge("node-r")

    responder = await bus.serve(SUBJECT, slow, queue="policy", workers=1, queue_limit=1)
    first = asyncio.create_task(_raw(bus))
    await _until(lambda: responder.running == 1)  # taken up by the worker
    second = asyncio.create_task(_raw(bus))
    await _until(lambda: responder.waiting == 2)  # and one waiting in the queue
    started = time.monotonic()
    refused = await _raw(bus)
    assert time.monotonic() - started < 1.0
    assert events.decode(refused.data, events.Refusal).reason == BUSY
    assert responder.shed[BUSY] == 1
    release.set()
    for answered in await asyncio.gather(first, second):
        assert events.decode(answered.data, events.NonceChallenge).node == "node-r"


async def test_a_request_that_waited_past_its_timeout_is_dropped_unread(bus: Bus) -> None:
    release = asyncio.Event()
    seen: list[str] = []

    async def slow(msg: Msg) -> events.Message:
        seen.append(msg.headers.get(TIMEOUT_HEADER, "") if msg.headers else "")
        await release.wait()
        return _challenge("node-r")

    responder = await bus.serve(SUBJECT, slow, queue="policy", workers=1)
    first = asyncio.create_task(_raw(bus, timeout=5.0))
    await _until(lambda: responder.running == 1)
    stale = asyncio.create_task(_raw(bus, {TIMEOUT_HEADER: "200"}, timeout=0.2))
    with pytest.raises(TimeoutError):
        await stale
    await asyncio.sleep(0.1)  # past 80 % of its 200 ms in the queue
    release.set()
    await first
    for _ in range(50):
        if responder.shed[EXPIRED]:
            break
        await asyncio.sleep(0.01)
    assert responder.shed[EXPIRED] == 1
    assert len(seen) == 1  # the stale request's handler never ran


def test_the_timeout_header_is_bounded() -> None:
    def msg(value: str | None) -> Msg:
        return Msg(None, headers=None if value is None else {TIMEOUT_HEADER: value})  # type: ignore[arg-type]

    assert request_timeout_ms(msg(None)) == DEFAULT_TIMEOUT_MS
    assert request_timeout_ms(msg("250")) == 250
    assert request_timeout_ms(msg("999999")) == MAX_TIMEOUT_MS
    for junk in ("", "-5", "1e9", "12345678901234567890", "0x10", " 50"):
        assert request_timeout_ms(msg(junk)) == DEFAULT_TIMEOUT_MS, junk
    assert request_timeout_ms(msg("0")) == DEFAULT_TIMEOUT_MS


async def test_a_sender_backs_off_while_busy_and_then_gets_its_answer(bus: Bus) -> None:
    calls = 0

    async def answer(msg: Msg) -> events.Message:
        nonlocal calls
        calls += 1
        if calls <= 3:
            return events.Refusal(reason=BUSY)  # what a full queue answers
        return _challenge("node-r")

    await bus.serve(SUBJECT, answer, queue="policy")
    got = await bus.request(SUBJECT, events.NonceRequest(node="node-r"), events.NonceChallenge)
    assert got.node == "node-r" and calls == 4


async def test_a_sender_gives_up_busy_when_it_never_clears(bus: Bus) -> None:
    async def busy(msg: Msg) -> events.Message:
        return events.Refusal(reason=BUSY)

    await bus.serve(SUBJECT, busy, queue="policy")
    with pytest.raises(BusError) as failed:
        await bus.request(
            SUBJECT, events.NonceRequest(node="node-r"), events.NonceChallenge, retry_for=0.5
        )
    assert failed.value.reason == "bus.busy"


async def test_a_sender_waits_as_long_as_the_busy_answer_says(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bus_mod._jitter, "random", lambda: 0.5)  # the hint itself
    asked: list[float] = []

    async def answer(msg: Msg) -> events.Message:
        asked.append(time.monotonic())
        if len(asked) == 1:
            return events.Refusal(reason=BUSY, retry_after_ms=400)
        return _challenge("node-r")

    await bus.serve(SUBJECT, answer, queue="policy")
    got = await bus.request(SUBJECT, events.NonceRequest(node="node-r"), events.NonceChallenge)
    assert got.node == "node-r"
    assert asked[1] - asked[0] >= 0.39


async def test_a_sender_told_to_wait_past_its_budget_gives_up_at_once(bus: Bus) -> None:
    async def busy(msg: Msg) -> events.Message:
        return events.Refusal(reason=BUSY, retry_after_ms=20_000)

    await bus.serve(SUBJECT, busy, queue="policy")
    started = time.monotonic()
    with pytest.raises(BusError) as failed:
        await bus.request(
            SUBJECT, events.NonceRequest(node="node-r"), events.NonceChallenge, retry_for=5.0
        )
    assert failed.value.reason == "bus.busy" and time.monotonic() - started < 2.0


def test_the_retry_hint_is_bounded() -> None:
    good = events.encode(events.Refusal(reason=BUSY, retry_after_ms=events.MAX_RETRY_AFTER_MS))
    assert events.decode(good, events.Refusal).retry_after_ms == events.MAX_RETRY_AFTER_MS
    for bad in (0, -1, events.MAX_RETRY_AFTER_MS + 1):
        raw = good.replace(str(events.MAX_RETRY_AFTER_MS).encode(), str(bad).encode())
        with pytest.raises(ParseError):
            events.decode(raw, events.Refusal)


def test_a_refusal_without_a_hint_reads_as_it_did_before_the_field() -> None:
    """Peers that predate ``retry_after_ms`` reject unknown fields: only a hint sends it."""

    class OldRefusal(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
        schema_version: int
        id: str
        reason: str

    for reason in (BUSY, "broker.not_allowed"):
        raw = events.encode(events.Refusal(reason=reason))
        assert b"retry_after_ms" not in raw
        assert msgspec.json.decode(raw, type=OldRefusal).reason == reason


def test_backoff_grows_randomised_and_capped() -> None:
    pauses = [[bus_mod.backoff_s(attempt) for attempt in range(12)] for _ in range(200)]
    for row in pauses:
        for attempt, pause in enumerate(row):
            assert 0 < pause <= min(bus_mod.BACKOFF_MAX_S, bus_mod.BACKOFF_FIRST_S * 2**attempt)
    firsts = {row[0] for row in pauses}
    assert len(firsts) > 150  # spread out, not a crowd coming back together
    assert max(row[-1] for row in pauses) > bus_mod.BACKOFF_MAX_S / 2
