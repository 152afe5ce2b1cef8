"""`Bus.consume` waits a failover out in place: a message whose handler fails only because the
mesh's own servers do not answer (:class:`Unavailable`) keeps its deliveries, so good evidence
is not dead-lettered over an election; past the bus's ``retry_for`` it counts as any failure."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import nats.js.errors
import pytest
from nats.aio.msg import Msg

from services.mesh import events, subjects
from services.mesh.bus import STOPPING_PUBLISH_S, Bus
from services.mesh.errors import BusError, Rejected, Unavailable
from tests.test_consume import settled

SUBJECT = subjects.evidence("snp", "outage-test")


class _Consumer:
    """``Bus.consume`` running on the test subject until :meth:`stopped` (or the block's end,
    which cancels it: a failed test leaves nothing running)."""

    def __init__(
        self, bus: Bus, durable: str, handler: Callable[[Msg], Awaitable[None]], **options: float
    ) -> None:
        self.stop = asyncio.Event()
        self._consume = bus.consume(
            stream=subjects.STREAM_EVIDENCE,
            durable=durable,
            subject=SUBJECT,
            handler=handler,
            stop=self.stop,
            **options,  # type: ignore[arg-type]
        )
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Consumer:
        self.task = asyncio.create_task(self._consume)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def stopped(self, timeout: float = 10.0) -> float:
        """Set ``stop``, wait for ``consume`` to return; how long that took."""
        assert self.task is not None
        self.stop.set()
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(self.task, timeout)
        return asyncio.get_running_loop().time() - started


async def _dead_letters(bus: Bus) -> list[events.DeadLetter]:
    """The dead letters filed so far (each test has a server of its own)."""
    found: list[events.DeadLetter] = []
    info = await bus.js.stream_info(subjects.STREAM_DLQ)
    if info.state.messages == 0:
        return found
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            stored = await bus.js.get_msg(subjects.STREAM_DLQ, seq)
        except nats.js.errors.NotFoundError:
            continue
        found.append(events.decode(stored.data or b"", events.DeadLetter))
    return found


async def _first_dead_letters(bus: Bus) -> list[events.DeadLetter]:
    """The dead letters once there are any (or none after 10 s)."""
    for _ in range(100):
        letters = await _dead_letters(bus)
        if letters:
            return letters
        await asyncio.sleep(0.1)
    return []


async def test_a_failover_longer_than_every_delivery_loses_nothing(bus: Bus) -> None:
    """Five failures in a row against a limit of two deliveries: the message is handled once
    the servers answer again, on its first delivery, and nothing is dead-lettered."""
    calls: list[int] = []
    handled = asyncio.Event()

    async def handler(msg: Msg) -> None:
        calls.append(msg.metadata.num_delivered)
        if len(calls) <= 5:
            raise Unavailable("kv.unavailable", "no leader")
        handled.set()

    async with _Consumer(bus, "outage-waits", handler, max_deliver=2) as consumer:
        await bus.js.publish(SUBJECT, b"evidence")
        await asyncio.wait_for(handled.wait(), 30.0)
        await consumer.stopped()
    assert calls == [1] * 6
    assert await settled(bus, "outage-waits")
    assert await _dead_letters(bus) == []


async def test_the_message_stays_ours_past_its_ack_wait(bus: Bus) -> None:
    """Waiting longer than ``ack_wait``: the consumer tells the server it is still working on
    the message, so it is not handed out a second time meanwhile."""
    calls: list[int] = []
    handled = asyncio.Event()
    started = asyncio.get_running_loop().time()

    async def handler(msg: Msg) -> None:
        calls.append(msg.metadata.num_delivered)
        if asyncio.get_running_loop().time() - started < 2.5:
            raise Unavailable("bus.unavailable", "TimeoutError")
        handled.set()

    async with _Consumer(bus, "outage-keeps", handler, ack_wait=1.0, max_deliver=5) as consumer:
        await bus.js.publish(SUBJECT, b"evidence")
        await asyncio.wait_for(handled.wait(), 30.0)
        await asyncio.sleep(1.2)  # a redelivery, had the server lost patience, would show
        await consumer.stopped()
    assert len(calls) >= 3 and set(calls) == {1}, calls
    assert await settled(bus, "outage-keeps")


@pytest.mark.parametrize(
    "failure",
    [Unavailable("kv.unavailable", "no leader"), BusError("kv.api_error", "10059")],
    ids=["unanswered", "refused"],
)
async def test_a_failure_that_lasts_spends_deliveries_then_dead_letters(
    bus: Bus, failure: BusError
) -> None:
    """Waiting is bounded: past ``retry_for`` an unanswered server's failure is redelivered
    and counted, and at the limit dead-lettered with its reason, not waited on forever. A
    server's refusal is not a failover: it spends a delivery at once, each time."""
    bus.retry_for = 0.5
    calls: list[int] = []

    async def handler(msg: Msg) -> None:
        calls.append(msg.metadata.num_delivered)
        raise failure

    async with _Consumer(bus, "failure-lasts", handler, max_deliver=2) as consumer:
        await bus.js.publish(SUBJECT, b"evidence")
        letters = await _first_dead_letters(bus)
        await consumer.stopped()
    assert [(x.reason, x.deliveries) for x in letters] == [(failure.reason, 2)]
    if isinstance(failure, Unavailable):
        assert set(calls) == {1, 2} and len(calls) > 2, calls
    else:
        assert calls == [1, 2]


async def test_stopping_ends_the_wait_and_hands_the_message_back(bus: Bus) -> None:
    """A service told to stop during a failover does not sit out the rest of ``retry_for``:
    the message goes back unacknowledged, for the next consumer."""
    failing = asyncio.Event()

    async def handler(msg: Msg) -> None:
        failing.set()
        raise Unavailable("kv.unavailable", "no leader")

    async with _Consumer(bus, "outage-stops", handler, max_deliver=5) as consumer:
        await bus.js.publish(SUBJECT, b"evidence")
        await asyncio.wait_for(failing.wait(), 10.0)
        await consumer.stopped(5.0)
    info = await bus.js.consumer_info(subjects.STREAM_EVIDENCE, "outage-stops")
    assert info.num_ack_pending + info.num_pending == 1
    assert await _dead_letters(bus) == []


async def test_a_dead_letter_that_cannot_be_filed_does_not_stop_the_consumer(bus: Bus) -> None:
    """With the dead-letter stream gone, a poison message cannot be filed: that is logged and
    the message handed back, and the consumer goes on with the next one rather than crash."""
    bus.retry_for = 0.5
    await bus.js.delete_stream(subjects.STREAM_DLQ)
    handled: list[bytes] = []
    done = asyncio.Event()

    async def handler(msg: Msg) -> None:
        handled.append(msg.data)
        if msg.data == b"poison":
            raise Rejected("policy.nonce_replayed", "replayed")
        done.set()

    async with _Consumer(bus, "dlq-gone", handler, max_deliver=3) as consumer:
        await bus.js.publish(SUBJECT, b"poison")
        for _ in range(100):
            if handled.count(b"poison") >= 2:
                break
            await asyncio.sleep(0.1)
        await bus.js.publish(SUBJECT, b"good")
        await asyncio.wait_for(done.wait(), 15.0)
        assert consumer.task is not None and not consumer.task.done()
        await consumer.stopped()
    assert handled.count(b"poison") >= 2  # handed back, not dropped on the first failure
    assert handled.count(b"good") == 1


async def test_stopping_on_a_last_delivery_files_it_without_waiting_out_the_outage(
    bus: Bus,
) -> None:
    """Stopped during a failover on its last delivery, the message can only be filed as a
    dead letter; with the dead-letter stream not answering either, that is tried briefly
    (``STOPPING_PUBLISH_S``), not for the whole ``retry_for``."""
    await bus.js.delete_stream(subjects.STREAM_DLQ)
    failing = asyncio.Event()

    async def handler(msg: Msg) -> None:
        failing.set()
        raise Unavailable("kv.unavailable", "no leader")

    async with _Consumer(bus, "last-stops", handler, max_deliver=1) as consumer:
        await bus.js.publish(SUBJECT, b"evidence")
        await asyncio.wait_for(failing.wait(), 10.0)
        waited = await consumer.stopped(bus.retry_for / 2)
    assert waited >= STOPPING_PUBLISH_S * 0.9  # it did try to file it
