"""Nonces on a real JetStream KV bucket: single use, per node, idempotent per verdict."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.errors import Rejected
from services.mesh.natskv import NatsKeyValue
from services.policy import nonces
from services.policy.nonces import NonceStore
from services.testing.memkv import CountingKeyValue, MemoryKeyValue


async def _store(bus: Bus, **kwargs: object) -> NonceStore:
    kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_NONCES))
    return NonceStore(kv, ttl=60.0, **kwargs)  # type: ignore[arg-type]


async def test_a_nonce_is_accepted_once(bus: Bus) -> None:
    store = await _store(bus)
    challenge = await store.issue("n1")
    await store.consume(challenge.nonce, "n1", "verdict-1")
    await store.consume(challenge.nonce, "n1", "verdict-1")  # redelivery of the same verdict
    with pytest.raises(Rejected) as err:
        await store.consume(challenge.nonce, "n1", "verdict-2")
    assert err.value.reason == "policy.nonce_replayed"


async def test_racing_replicas_accept_a_nonce_exactly_once(bus: Bus) -> None:
    store = await _store(bus)
    challenge = await store.issue("n1")
    results = await asyncio.gather(
        *(store.consume(challenge.nonce, "n1", f"verdict-{i}") for i in range(8)),
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


async def test_the_issuing_store_consumes_with_its_compare_and_set_alone() -> None:
    kv = CountingKeyValue()
    store = NonceStore(kv, ttl=60.0)
    challenge = await store.issue("n1")
    await store.consume(challenge.nonce, "n1", "verdict-1")
    assert (kv.reads, kv.writes) == (0, 2)
    await store.consume(challenge.nonce, "n1", "verdict-1")  # redelivery: read, accepted
    with pytest.raises(Rejected, match="policy.nonce_replayed"):
        await store.consume(challenge.nonce, "n1", "verdict-2")
    assert kv.writes == 2


async def test_a_nonce_used_elsewhere_since_it_was_issued_is_judged_on_what_is_stored() -> None:
    kv = MemoryKeyValue()
    issuer, other_replica = NonceStore(kv, ttl=60.0), NonceStore(kv, ttl=60.0)
    challenge = await issuer.issue("n1")
    await other_replica.consume(challenge.nonce, "n1", "verdict-b")
    with pytest.raises(Rejected, match="policy.nonce_replayed"):
        await issuer.consume(challenge.nonce, "n1", "verdict-a")
    fresh = await issuer.issue("n1")
    with pytest.raises(Rejected, match="policy.nonce_wrong_node"):
        await issuer.consume(fresh.nonce, "n2", "verdict-c")


async def test_a_remembered_nonce_still_expires() -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    store = NonceStore(MemoryKeyValue(), ttl=60.0, clock=lambda: now[0])
    challenge = await store.issue("n1")
    now[0] += timedelta(seconds=61)
    with pytest.raises(Rejected, match="policy.nonce_expired"):
        await store.consume(challenge.nonce, "n1", "v")


async def test_what_the_store_remembers_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nonces, "MAX_REMEMBERED", 3)
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    store = NonceStore(MemoryKeyValue(), ttl=60.0, clock=lambda: now[0])
    issued = [await store.issue("n1") for _ in range(5)]
    assert list(store._issued) == [c.nonce.hex() for c in issued[2:]]
    now[0] += timedelta(seconds=61)
    await store.issue("n1")  # the expired ones are forgotten as new ones are issued
    assert len(store._issued) == 1
