"""`Bus.consume` pulls continuously: one slow message holds up only itself, and stopping
finishes (and acknowledges) what is in flight rather than dropping it."""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg

from services.mesh import subjects
from services.mesh.bus import Bus

SUBJECT = subjects.evidence("snp", "slow-test")


async def settled(bus: Bus, durable: str) -> bool:
    """Whether every message was acknowledged (an ack is a publish the server applies
    asynchronously, so look a few times; unacknowledged, it would stay pending 30 s)."""
    for _ in range(50):
        info = await bus.js.consumer_info(subjects.STREAM_EVIDENCE, durable)
        if info.num_ack_pending == 0 and info.num_pending == 0:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_a_slow_message_does_not_hold_up_the_next(bus: Bus) -> None:
    first_started = asyncio.Event()
    second_done = asyncio.Event()
    handled: list[bytes] = []

    async def handler(msg: Msg) -> None:
        if msg.data == b"first":
            first_started.set()
            # Finishes only once a later message has been handled meanwhile: a consumer
            # that awaits its whole batch before pulling again never gets there.
            await asyncio.wait_for(second_done.wait(), 10.0)
        else:
            second_done.set()
        handled.append(msg.data)

    stop = asyncio.Event()
    consuming = asyncio.create_task(
        bus.consume(
            stream=subjects.STREAM_EVIDENCE,
            durable="slow-test",
            subject=SUBJECT,
            handler=handler,
            stop=stop,
        )
    )
    try:
        await bus.js.publish(SUBJECT, b"first")
        await asyncio.wait_for(first_started.wait(), 10.0)
        await bus.js.publish(SUBJECT, b"second")
        await asyncio.wait_for(second_done.wait(), 5.0)
        stop.set()
        await asyncio.wait_for(consuming, 10.0)
    finally:
        consuming.cancel()
    assert handled == [b"second", b"first"]
    assert await settled(bus, "slow-test")


async def test_stop_finishes_and_acknowledges_messages_in_flight(bus: Bus) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    finished: list[bytes] = []

    async def handler(msg: Msg) -> None:
        started.set()
        await release.wait()
        finished.append(msg.data)

    stop = asyncio.Event()
    consuming = asyncio.create_task(
        bus.consume(
            stream=subjects.STREAM_EVIDENCE,
            durable="stop-test",
            subject=SUBJECT,
            handler=handler,
            stop=stop,
        )
    )
    await bus.js.publish(SUBJECT, b"in flight")
    await asyncio.wait_for(started.wait(), 10.0)
    stop.set()
    await asyncio.sleep(1.5)  # longer than a pull's timeout: consume must still be waiting
    assert not consuming.done()
    release.set()
    await asyncio.wait_for(consuming, 10.0)
    assert finished == [b"in flight"]
    assert await settled(bus, "stop-test")
