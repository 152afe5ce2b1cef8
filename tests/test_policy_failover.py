"""The policy service across a failover of the server holding its buckets, on a real
nats-server: a verdict that arrives while the ``policies`` bucket goes unanswered is decided
on what the bucket holds once it answers again, however many deliveries that outlasts. A
deny then would revoke an honest node over the mesh's own hiccup; a dead letter would leave
it with no decision at all."""

from __future__ import annotations

import asyncio
from typing import Any

from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.errors import Unavailable
from services.mesh.natskv import NatsKeyValue
from services.policy import release_policy
from services.policy.engine import default_policy
from services.testing.mesh import TestMesh

OUTAGE_S = 4.0
"""Longer than the three deliveries a test mesh allows a verdict (redelivered after 0.4 and
0.8 s), so waiting the outage out with redeliveries alone would deny the round."""


class Unanswered:
    """A bucket whose server stops answering reads until ``until`` (the loop's clock), as one
    does while its stream elects a new leader; every other call goes to the real bucket."""

    def __init__(self, inner: Any, until: float) -> None:
        self.inner = inner
        self.until = until
        self.refused = 0

    async def get(self, key: str) -> tuple[bytes, int] | None:
        if asyncio.get_running_loop().time() < self.until:
            self.refused += 1
            raise Unavailable("kv.unavailable", "TimeoutError")
        result: tuple[bytes, int] | None = await self.inner.get(key)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_verdict_during_a_failover_is_decided_after_it(mesh: TestMesh, bus: Bus) -> None:
    assert mesh.policy is not None and mesh.policy.loader is not None
    loader = mesh.policy.loader
    node = mesh.node(bus, "node-o")
    assert (await node.attest_once()).released

    outage = Unanswered(loader.policies, asyncio.get_running_loop().time() + OUTAGE_S)
    loader.policies = outage
    policies = NatsKeyValue(await bus.key_value(subjects.BUCKET_POLICIES))
    await release_policy.store(policies, default_policy(), operator=mesh.operator_key)
    for _ in range(200):
        if loader.read_failed:
            break
        await asyncio.sleep(0.02)
    assert loader.read_failed and loader.read_unanswered

    result = await node.attest_once()
    # Released is what proves the wait: redeliveries alone (three, over about 1.2 s) would
    # have reached the last one inside the outage and denied it.
    assert result.released, result
    assert outage.refused > 3
