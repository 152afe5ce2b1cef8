"""Collateral fetched from vendors, shared by every verifier replica through KV.

Verification is pure, so the worker resolves what a piece of evidence needs *before* verifying:
the family's planner names the files it lacks (a VCEK, say) and where they live; this cache
answers from the ``collateral`` bucket, else fetches once and stores the answer there for the
other replicas. In offline mode nothing is fetched: missing collateral simply stays missing and
the verdict says so. A poisoned cache entry can only make verification fail: everything
fetched is still checked against the pinned roots.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from services.broker.kv import KeyValue, WriteConflictError
from services.mesh import telemetry
from services.mesh.errors import CollateralError
from services.verifier.fetch import Fetcher, http_get

log = telemetry.logger("collateral")


@dataclass(frozen=True)
class CollateralRequest:
    """One collateral file a verification needs, and the URL it is published at."""

    name: str
    url: str
    max_bytes: int = 64 * 1024


Planner = Callable[[bytes, Mapping[str, bytes]], Sequence[CollateralRequest]]


def cache_key(url: str) -> str:
    return "url." + hashlib.sha256(url.encode()).hexdigest()[:48]


class CollateralCache:
    """KV-backed, fetch-once collateral; ``fetches`` counts network round trips."""

    def __init__(self, kv: KeyValue | None, *, offline: bool, fetcher: Fetcher = http_get) -> None:
        self._kv = kv
        self._offline = offline
        self._fetcher = fetcher
        self.fetches = 0

    async def resolve(self, requests: Sequence[CollateralRequest]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for request in requests:
            data = await self._get(request)
            if data is not None:
                found[request.name] = data
        return found

    async def _get(self, request: CollateralRequest) -> bytes | None:
        key = cache_key(request.url)
        if self._kv is not None:
            cached = await self._kv.get(key)
            if cached is not None:
                return cached[0]
        if self._offline:
            return None
        try:
            self.fetches += 1
            data = await asyncio.to_thread(self._fetcher, request.url, max_bytes=request.max_bytes)
        except CollateralError as exc:
            log.warning("collateral.fetch_failed", name=request.name, reason=exc.reason)
            return None
        if self._kv is not None:
            with contextlib.suppress(WriteConflictError):  # a replica stored it first
                await self._kv.create(key, data)
        return data
