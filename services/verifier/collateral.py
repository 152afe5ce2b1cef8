"""Collateral fetched from vendors, shared by every verifier replica through KV.

Verification is pure, so the worker resolves what a piece of evidence needs *before* verifying:
the family's planner names the files it lacks (a VCEK, Intel's TCB info...) and where they are
published; this cache answers from the ``collateral`` bucket, else fetches once and stores the
answer there for the other replicas. Entries with a ``max_age`` (documents that Intel reissues)
are fetched again once older than that, which keeps them fresh well before their nextUpdate;
if the refresh fails the older copy is still used, and verification judges its validity. In
offline mode nothing is fetched: missing collateral stays missing and the verdict says so.

``attestmesh collateral import`` fills the same keys from a directory, so an air-gapped site
(or one with a PCCS) serves every replica without any of them reaching the vendor. A poisoned
entry can only make verification fail: everything is still checked against the pinned roots.

What a replica read from the bucket (an entry, or its absence) it keeps for
:data:`MEMO_SECONDS` (bounded in entries), instead of reading the bucket again for every piece
of evidence: SNP evidence asks for the product's CRL each time, one KV round trip per
attestation for an answer that changes a few times a day. The verifier's re-appraisal watch
forgets everything the moment the bucket changes (:meth:`CollateralCache.forget`), before it
re-checks anything, so a new CRL or TCB info is never judged against the old one there; a
replica's fresh verifications see a change within :data:`MEMO_SECONDS` at the latest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import msgspec

from services.mesh import telemetry
from services.mesh.errors import CollateralError
from services.mesh.kv import KeyValue, WriteConflictError
from services.verifier.fetch import Fetcher, Response, http_fetch

log = telemetry.logger("collateral")

MEMO_SECONDS = 10.0
MEMO_ENTRIES = 4096


@dataclass(frozen=True)
class CollateralRequest:
    """One collateral file a verification needs, and where it is published.

    ``header`` names a response header holding the file (URL-encoded, as Intel sends issuer
    chains) instead of the body; ``max_age`` (seconds) makes the cached copy refresh.
    """

    name: str
    url: str
    max_bytes: int = 64 * 1024
    header: str | None = None
    max_age: float | None = None


Planner = Callable[[bytes, Mapping[str, bytes]], Sequence[CollateralRequest]]


class _Entry(msgspec.Struct, frozen=True):
    data: bytes
    fetched_at: float


def cache_key(request: CollateralRequest) -> str:
    part = f"header:{request.header.lower()}" if request.header else "body"
    return "url." + hashlib.sha256(f"{request.url}\n{part}".encode()).hexdigest()[:48]


def extract(request: CollateralRequest, response: Response) -> bytes:
    if request.header is None:
        return response.body
    value = response.header(request.header)
    if value is None:
        raise CollateralError("fetch.header_missing", f"{request.url}: no {request.header}")
    return urllib.parse.unquote(value).encode()


async def store(kv: KeyValue, request: CollateralRequest, data: bytes, *, at: float) -> None:
    """Put ``data`` under ``request``'s key, replacing an older copy."""
    raw = msgspec.msgpack.encode(_Entry(data, at))
    key = cache_key(request)
    current = await kv.get(key)
    with contextlib.suppress(WriteConflictError):  # a replica stored it first
        if current is None:
            await kv.create(key, raw)
        else:
            await kv.update(key, raw, current[1])


class CollateralCache:
    """KV-backed, fetch-once collateral; ``fetches`` counts network round trips."""

    def __init__(
        self,
        kv: KeyValue | None,
        *,
        offline: bool,
        fetcher: Fetcher = http_fetch,
        clock: Callable[[], float] = time.time,
        memo_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kv = kv
        self._offline = offline
        self._fetcher = fetcher
        self._clock = clock
        self._memo_clock = memo_clock
        self._memo: OrderedDict[str, tuple[float, _Entry | None]] = OrderedDict()
        self.fetches = 0

    def forget(self) -> None:
        """Drop what was read from the bucket: it changed (see the module docstring)."""
        self._memo.clear()

    def _remember(self, key: str, entry: _Entry | None) -> None:
        self._memo[key] = (self._memo_clock(), entry)
        self._memo.move_to_end(key)
        while len(self._memo) > MEMO_ENTRIES:
            self._memo.popitem(last=False)

    async def resolve(self, requests: Sequence[CollateralRequest]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        responses: dict[str, Response | None] = {}
        for request in requests:
            data = await self._get(request, responses)
            if data is not None:
                found[request.name] = data
        return found

    async def _get(
        self, request: CollateralRequest, responses: dict[str, Response | None]
    ) -> bytes | None:
        cached = await self._cached(request)
        fresh = cached is not None and (
            request.max_age is None or self._clock() - cached.fetched_at < request.max_age
        )
        if fresh or self._offline:
            return cached.data if cached is not None else None
        if request.url not in responses:
            responses[request.url] = await self._fetch(request)
        response = responses[request.url]
        try:
            data = extract(request, response) if response is not None else None
        except CollateralError as exc:
            log.warning("collateral.fetch_failed", name=request.name, reason=exc.reason)
            data = None
        if data is None:
            return cached.data if cached is not None else None
        if self._kv is not None:
            at = self._clock()
            await store(self._kv, request, data, at=at)
            self._remember(cache_key(request), _Entry(data, at))
        return data

    async def _cached(self, request: CollateralRequest) -> _Entry | None:
        if self._kv is None:
            return None
        key = cache_key(request)
        memo = self._memo.get(key)
        if memo is not None and self._memo_clock() - memo[0] < MEMO_SECONDS:
            return memo[1]
        found = await self._kv.get(key)
        entry = None
        if found is not None:
            with contextlib.suppress(msgspec.DecodeError):
                entry = msgspec.msgpack.decode(found[0], type=_Entry)
        self._remember(key, entry)
        return entry

    async def _fetch(self, request: CollateralRequest) -> Response | None:
        self.fetches += 1
        try:
            return await asyncio.to_thread(self._fetcher, request.url, max_bytes=request.max_bytes)
        except CollateralError as exc:
            log.warning("collateral.fetch_failed", name=request.name, reason=exc.reason)
            return None
