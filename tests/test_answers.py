"""Release-once claims and refusal counting (the broker's defence against replays and floods)."""

from __future__ import annotations

import asyncio

import pytest

from services.broker import answers as answers_module
from services.broker.answers import MAX_REASONS, OTHER_REASON, Answers, RefusalCounter
from services.broker.sealing import AeadKey
from services.mesh.errors import SealingError
from services.testing.memkv import CountingKeyValue, MemoryKeyValue

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


async def test_a_broker_claims_against_what_it_wrote_without_reading_it_back() -> None:
    kv = CountingKeyValue()
    answers = Answers(kv, KEY)
    assert await answers.claim("node-1", "dec-1", 100, "r:default/node-key")
    reads = kv.reads
    assert await answers.claim("node-1", "dec-2", 200, "r:default/node-key")
    assert await answers.claim("node-1", "dec-2", 200, "v:revoked")
    assert kv.reads == reads
    assert not await answers.claim("node-1", "dec-2", 200, "v:revoked")  # read, then refused
    assert not await Answers(kv, KEY).claim("node-1", "dec-2", 200, "r:default/node-key")


async def test_a_record_changed_elsewhere_is_read_before_anything_is_claimed(
    kv: MemoryKeyValue,
) -> None:
    mine, other = Answers(kv, KEY), Answers(kv, KEY)
    assert await mine.claim("node-1", "dec-1", 100, "r:default/node-key")
    assert await other.claim("node-1", "dec-1", 100, "r:node-1/extra")
    assert not await mine.claim("node-1", "dec-1", 100, "r:node-1/extra")
    assert await other.claim("node-1", "dec-2", 200, "r:default/node-key")
    assert not await mine.claim("node-1", "dec-1", 100, "r:node-1/other")  # superseded
    assert await mine.claim("node-1", "dec-2", 200, "r:node-1/other")


async def test_a_tampered_record_is_noticed_by_the_broker_that_wrote_it(
    kv: MemoryKeyValue,
) -> None:
    answers = Answers(kv, KEY)
    assert await answers.claim("node-1", "dec-1", 100, "r:default/node-key")
    blob = kv.raw("answered.node-1")
    kv.overwrite("answered.node-1", blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(SealingError, match="seal_tampered"):
        await answers.claim("node-1", "dec-2", 200, "r:default/node-key")


async def test_what_a_broker_remembers_is_bounded(
    kv: MemoryKeyValue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(answers_module, "MAX_REMEMBERED", 2)
    answers = Answers(kv, KEY)
    for i in range(4):
        assert await answers.claim(f"node-{i}", "dec-1", 100, "r:default/node-key")
    assert list(answers._written) == ["answered.node-2", "answered.node-3"]


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
