"""What a verifier read from the collateral bucket it keeps for a few seconds, and forgets
the moment the re-appraisal watch sees the bucket change."""

from __future__ import annotations

import pytest

from services.testing.memkv import CountingKeyValue, MemoryKeyValue
from services.verifier import collateral
from services.verifier.collateral import CollateralCache, CollateralRequest, store

CRL = CollateralRequest("crl.der", "https://kds.example/vcek/v1/Milan/crl", max_age=3600.0)
VCEK = CollateralRequest("vcek.der", "https://kds.example/vcek/v1/Milan/abc")


def _cache(kv: MemoryKeyValue, now: list[float]) -> CollateralCache:
    return CollateralCache(kv, offline=True, clock=lambda: 1000.0, memo_clock=lambda: now[0])


async def test_the_bucket_is_read_once_per_interval_for_entries_and_for_absence() -> None:
    kv, now = CountingKeyValue(), [0.0]
    await store(kv, VCEK, b"vcek", at=1000.0)
    kv.reads = 0
    cache = _cache(kv, now)
    for _ in range(5):
        assert await cache.resolve([VCEK, CRL]) == {"vcek.der": b"vcek"}
    assert kv.reads == 2
    now[0] += collateral.MEMO_SECONDS
    assert await cache.resolve([VCEK, CRL]) == {"vcek.der": b"vcek"}
    assert kv.reads == 4


async def test_a_change_is_seen_at_once_after_forget() -> None:
    kv, now = MemoryKeyValue(), [0.0]
    cache = _cache(kv, now)
    assert await cache.resolve([CRL]) == {}
    await store(kv, CRL, b"crl-1", at=1000.0)  # imported, or fetched by another replica
    assert await cache.resolve([CRL]) == {}  # within the interval: not yet
    cache.forget()
    assert await cache.resolve([CRL]) == {"crl.der": b"crl-1"}
    await store(kv, CRL, b"crl-2", at=1000.0)
    cache.forget()
    assert await cache.resolve([CRL]) == {"crl.der": b"crl-2"}


async def test_what_is_kept_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collateral, "MEMO_ENTRIES", 2)
    cache = _cache(MemoryKeyValue(), [0.0])
    requests = [CollateralRequest(f"f{i}", f"https://kds.example/{i}") for i in range(4)]
    await cache.resolve(requests)
    assert len(cache._memo) == 2
