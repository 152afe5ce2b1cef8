"""Nonces: issued without a write, single use on a real JetStream KV bucket, per node,
idempotent per verdict, and unforgeable without the policy's key."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.errors import Rejected
from services.mesh.keys import SigningKey
from services.mesh.natskv import NatsKeyValue
from services.policy.nonces import (
    MAC_PURPOSE,
    NONCE_BYTES,
    RANDOM_BYTES,
    SKEW_S,
    NonceStore,
    lifetime_for,
)
from services.testing.memkv import CountingKeyValue, MemoryKeyValue

POLICY = SigningKey.generate("policy")
KEY = POLICY.derive(MAC_PURPOSE)


async def _store(bus: Bus, **kwargs: object) -> NonceStore:
    kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_NONCES))
    return NonceStore(kv, KEY, ttl=60.0, **kwargs)  # type: ignore[arg-type]


async def test_a_nonce_is_accepted_once(bus: Bus) -> None:
    store = await _store(bus)
    challenge = await store.issue("n1")
    await store.consume(challenge.nonce, "n1", "verdict-1")
    await store.consume(challenge.nonce, "n1", "verdict-1")  # redelivery of the same verdict
    with pytest.raises(Rejected) as err:
        await store.consume(challenge.nonce, "n1", "verdict-2")
    assert err.value.reason == "policy.nonce_replayed"


async def test_racing_replicas_accept_a_nonce_exactly_once(bus: Bus) -> None:
    issuer, other = await _store(bus), await _store(bus)
    challenge = await issuer.issue("n1")
    results = await asyncio.gather(
        *(
            (issuer if i % 2 else other).consume(challenge.nonce, "n1", f"verdict-{i}")
            for i in range(8)
        ),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, Rejected) for r in results if r is not None)


async def test_unknown_foreign_and_expired_nonces_are_rejected(bus: Bus) -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    store = await _store(bus, clock=lambda: now[0])
    with pytest.raises(Rejected, match="policy.nonce_unknown"):
        await store.consume(b"x" * 32, "n1", "v")
    challenge = await store.issue("n1")
    with pytest.raises(Rejected, match="policy.nonce_wrong_node"):
        await store.consume(challenge.nonce, "n2", "v")
    now[0] += timedelta(seconds=61)
    with pytest.raises(Rejected, match="policy.nonce_expired"):
        await store.consume(challenge.nonce, "n1", "v")


async def test_issuing_writes_nothing_and_using_writes_once() -> None:
    kv = CountingKeyValue()
    store = NonceStore(kv, KEY, ttl=60.0)
    challenge = await store.issue("n1")
    assert (kv.reads, kv.writes) == (0, 0)
    await store.consume(challenge.nonce, "n1", "verdict-1")
    assert (kv.reads, kv.writes) == (0, 1)
    await store.consume(challenge.nonce, "n1", "verdict-1")  # redelivery: read, accepted
    with pytest.raises(Rejected, match="policy.nonce_replayed"):
        await store.consume(challenge.nonce, "n1", "verdict-2")
    assert kv.writes == 1


async def test_a_forged_or_altered_nonce_is_unknown() -> None:
    store = NonceStore(MemoryKeyValue(), KEY, ttl=60.0)
    outsider = NonceStore(
        MemoryKeyValue(), SigningKey.generate("policy").derive(MAC_PURPOSE), ttl=60.0
    )
    forged = await outsider.issue("n1")  # the right shape under another key
    with pytest.raises(Rejected, match="policy.nonce_unknown"):
        await store.consume(forged.nonce, "n1", "v")
    genuine = (await store.issue("n1")).nonce
    later = (int.from_bytes(genuine[RANDOM_BYTES : RANDOM_BYTES + 8], "big") + 3_600_000).to_bytes(
        8, "big"
    )
    extended = genuine[:RANDOM_BYTES] + later + genuine[RANDOM_BYTES + 8 :]
    flipped = genuine[:-1] + bytes([genuine[-1] ^ 1])
    for altered, reason in (
        (extended, "policy.nonce_unknown"),  # a longer life is not one the policy gave
        (flipped, "policy.nonce_wrong_node"),  # the node tag no longer matches
        (genuine[:-1], "policy.nonce_unknown"),
        (genuine + b"\0", "policy.nonce_unknown"),
    ):
        with pytest.raises(Rejected) as err:
            await store.consume(altered, "n1", "v")
        assert err.value.reason == reason
    await store.consume(genuine, "n1", "v")  # none of those used it up
    assert len(genuine) == NONCE_BYTES


async def test_an_unreadable_use_record_is_a_replay_not_an_accept() -> None:
    kv = MemoryKeyValue()
    store = NonceStore(kv, KEY, ttl=60.0)
    challenge = await store.issue("n1")
    await kv.create(challenge.nonce[:RANDOM_BYTES].hex(), b"not json")
    with pytest.raises(Rejected, match="policy.nonce_replayed"):
        await store.consume(challenge.nonce, "n1", "v")


def test_the_nonce_key_is_short_and_bound_to_its_purpose() -> None:
    with pytest.raises(ValueError):
        NonceStore(MemoryKeyValue(), b"k" * 16, ttl=60.0)
    assert POLICY.derive(MAC_PURPOSE) == KEY
    assert POLICY.derive("another purpose") != KEY
    assert SigningKey.generate("policy").derive(MAC_PURPOSE) != KEY


async def test_a_nonce_that_would_outlive_the_record_of_its_use_is_refused() -> None:
    """An issuer whose clock runs ahead (or a bucket keeping entries too briefly) would give
    nonces that stay valid after their use is forgotten, so they could be used again."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    ahead = NonceStore(MemoryKeyValue(), KEY, ttl=60.0, clock=lambda: now + timedelta(seconds=30))
    consumer = NonceStore(MemoryKeyValue(), KEY, ttl=60.0, clock=lambda: now)
    with pytest.raises(Rejected, match="policy.nonce_lifetime"):
        await consumer.consume((await ahead.issue("n1")).nonce, "n1", "v")
    slightly = NonceStore(MemoryKeyValue(), KEY, ttl=60.0, clock=lambda: now + timedelta(seconds=5))
    await consumer.consume((await slightly.issue("n1")).nonce, "n1", "v")  # within the skew
    brief = NonceStore(MemoryKeyValue(), KEY, ttl=60.0, clock=lambda: now, entry_ttl=30.0)
    with pytest.raises(Rejected, match="policy.nonce_lifetime"):
        await brief.consume((await consumer.issue("n1")).nonce, "n1", "v")


def test_the_issued_lifetime_fits_the_bucket() -> None:
    assert lifetime_for(120.0, None) == 120.0
    assert lifetime_for(120.0, 150.0) == 120.0
    assert lifetime_for(120.0, 60.0) == 60.0 - 2 * SKEW_S
    with pytest.raises(ValueError):
        lifetime_for(120.0, 2 * SKEW_S)


async def test_the_bucket_keeps_a_use_longer_than_the_nonce_lives(bus: Bus) -> None:
    status = await (await bus.key_value(subjects.BUCKET_NONCES)).status()
    assert status.ttl is not None and status.ttl >= 60.0 + 2 * SKEW_S
    assert lifetime_for(60.0, status.ttl) == 60.0
