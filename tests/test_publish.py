"""Publishing to a stream: acknowledged, de-duplicated by message id, refusals surfaced."""

from __future__ import annotations

import pytest

from services.mesh import events
from services.mesh.bus import Bus
from services.mesh.errors import BusError


async def test_a_publish_is_acknowledged_and_a_repeat_is_a_duplicate(bus: Bus) -> None:
    await bus.js.add_stream(name="PUB", subjects=["pub.>"])
    message = events.Refusal(reason="x.y")
    first = await bus.publish("pub.one", message)
    again = await bus.publish("pub.one", message)
    assert first.stream == "PUB" and first.seq == 1 and not first.duplicate
    assert again.seq == 1 and again.duplicate
    other = await bus.publish("pub.one", events.Refusal(reason="x.y"))
    assert other.seq == 2 and not other.duplicate


async def test_a_refused_publish_is_an_error_not_an_acknowledgement(bus: Bus) -> None:
    await bus.js.add_stream(name="TINY", subjects=["tiny.>"], max_msg_size=16)
    with pytest.raises(BusError) as refused:
        await bus.publish("tiny.one", events.Refusal(reason="far.too.long.for.this.stream"))
    assert refused.value.reason == "bus.api_error"
