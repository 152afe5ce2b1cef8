"""Release-once claims and refusal counting (the broker's defence against replays and floods)."""

from __future__ import annotations

import asyncio

import pytest

from services.broker.answers import MAX_REASONS, OTHER_REASON, Answers, RefusalCounter
from services.broker.sealing import AeadKey
from services.mesh.errors import SealingError
from services.testing.memkv import MemoryKeyValue

KEY = AeadKey(b"\x07" * 32)


@pytest.fixture
def kv() -> MemoryKeyValue:
    return MemoryKeyValue()


async def test_an_item_is_claimed_once_per_decision(kv: MemoryKeyValue) -> None:
    answers = Answers(kv, KEY)
    assert await answers.claim("node-1", "dec-1", 100, "r:default/node-key")
    assert not await answers.claim("node-1", "dec-1", 100, "r:default/node-key")
    assert await answers.claim("node-1", "dec-1", 100, "r:node-1/extra")
    assert await answers.claim("node-2", "dec-9", 100, "r:default/node-key")
    # A restarted broker (a new object on the same bucket) remembers.
    assert not await Answers(kv, KEY).claim("node-1", "dec-1", 100, "r:node-1/extra")


async def test_a_new_decision_starts_afresh_and_an_old_one_cannot_return(
    kv: MemoryKeyValue,
) -> None:
    answers = Answers(kv, KEY)
    assert await answers.claim("node-1", "dec-1", 100, "r:default/node-key")
    assert await answers.claim("node-1", "dec-2", 200, "r:default/node-key")
    assert not await answers.claim("node-1", "dec-1", 100, "r:node-1/other")


async def test_replicas_racing_on_one_claim_release_once(kv: MemoryKeyValue) -> None:
    replicas = [Answers(kv, KEY) for _ in range(4)]
    won = await asyncio.gather(
        *(r.claim("node-1", "dec-1", 100, "r:default/node-key") for r in replicas * 5)
    )
    assert won.count(True) == 1


async def test_an_unclaimed_item_can_be_claimed_again_under_its_decision_only(
    kv: MemoryKeyValue,
) -> None:
    answers = Answers(kv, KEY)
    assert await answers.claim("node-1", "dec-1", 100, "r:default/node-key")
    assert await answers.claim("node-1", "dec-1", 100, "v:revoked")
    await answers.unclaim("node-1", "dec-1", "v:revoked")
    assert not await answers.claim("node-1", "dec-1", 100, "r:default/node-key")  # kept
    assert await answers.claim("node-1", "dec-1", 100, "v:revoked")
    # Taking back a claim of a decision the record has moved on from changes nothing.
    assert await answers.claim("node-1", "dec-2", 200, "v:revoked")
    await answers.unclaim("node-1", "dec-1", "v:revoked")
    await answers.unclaim("node-3", "dec-1", "v:revoked")
    assert not await answers.claim("node-1", "dec-2", 200, "v:revoked")


async def test_claims_are_sealed(kv: MemoryKeyValue) -> None:
    await Answers(kv, KEY).claim("node-1", "dec-secretive", 100, "r:default/node-key")
    blob = kv.raw("answered.node-1")
    assert b"dec-secretive" not in blob and b"default/node-key" not in blob
    kv.overwrite("answered.node-1", blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(SealingError, match="seal_tampered"):
        await Answers(kv, KEY).claim("node-1", "dec-secretive", 100, "r:default/node-key")


def test_refusal_counter_is_bounded() -> None:
    counter = RefusalCounter()
    for i in range(1000):
        counter.count(f"broker.reason_{i % 100}")
    counter.count("Not A Code\n")
    counts = counter.peek()
    assert len(counts) == MAX_REASONS
    assert counter.total == 1001
    assert counts[OTHER_REASON] == 1001 - sum(v for k, v in counts.items() if k != OTHER_REASON)
    drained = counter.drain()
    assert drained == counts and counter.total == 0
    counter.restore(drained)
    assert counter.peek() == counts
