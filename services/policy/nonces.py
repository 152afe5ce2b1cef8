"""Challenge nonces: issued per node, bound into evidence, accepted exactly once.

Each nonce is a KV entry (bucket TTL = nonce lifetime) recording the node it was issued to.
Consuming it is a compare-and-set that stamps the verdict id, so two policy replicas racing
on the same nonce cannot both accept it, while the *same* verdict redelivered after a crash
is recognised and accepted again (consumers must be idempotent).

The replica that issued a nonce remembers the record and the revision it created (bounded,
and never past the nonce's expiry), so consuming it is usually the compare-and-set alone: the
write succeeds only if the entry is still exactly the unused record it created, which is
what reading it first would have established. Anything else (another replica issued it, it
was used, the write conflicts) takes the full read-check-write path.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta

import msgspec

from services.mesh import events
from services.mesh.errors import Rejected
from services.mesh.kv import KeyValue, WriteConflictError

NONCE_BYTES = 32
MAX_REMEMBERED = 16_384


class _Record(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    node: str
    expires_at: datetime
    used_by: str | None = None


class NonceStore:
    def __init__(
        self,
        kv: KeyValue,
        *,
        ttl: float,
        clock: Callable[[], datetime] = events.utcnow,
    ) -> None:
        self._kv = kv
        self._ttl = ttl
        self._clock = clock
        self._issued: OrderedDict[str, tuple[_Record, int]] = OrderedDict()
        """Nonces this store created and has not seen consumed: record and revision."""

    async def issue(self, node: str) -> events.NonceChallenge:
        nonce = secrets.token_bytes(NONCE_BYTES)
        expires = self._clock() + timedelta(seconds=self._ttl)
        record = _Record(node, expires)
        revision = await self._kv.create(nonce.hex(), msgspec.json.encode(record))
        self._remember(nonce.hex(), record, revision)
        return events.NonceChallenge(node=node, nonce=nonce, expires_at=expires)

    def _remember(self, key: str, record: _Record, revision: int) -> None:
        self._issued[key] = (record, revision)
        now = self._clock()
        while self._issued and (
            len(self._issued) > MAX_REMEMBERED
            or next(iter(self._issued.values()))[0].expires_at < now
        ):
            self._issued.popitem(last=False)

    async def consume(self, nonce: bytes, node: str, verdict_id: str) -> None:
        """Accept ``nonce`` for ``verdict_id`` once; raise :class:`Rejected` otherwise."""
        key = nonce.hex()
        issued = self._issued.pop(key, None)
        if issued is not None:
            record, revision = issued
            if (
                record.node == node
                and record.used_by is None
                and record.expires_at >= self._clock()
            ):
                used = msgspec.structs.replace(record, used_by=verdict_id)
                try:
                    await self._kv.update(key, msgspec.json.encode(used), revision)
                    return
                except WriteConflictError:
                    pass  # changed since it was issued: read it and decide on what is there
        while True:
            entry = await self._kv.get(key)
            if entry is None:
                raise Rejected("policy.nonce_unknown", "nonce was never issued or has expired")
            raw, revision = entry
            record = msgspec.json.decode(raw, type=_Record)
            if record.node != node:
                raise Rejected("policy.nonce_wrong_node", f"nonce was issued to {record.node}")
            if record.used_by is not None:
                if record.used_by == verdict_id:
                    return
                raise Rejected("policy.nonce_replayed", "nonce was already used")
            if record.expires_at < self._clock():
                raise Rejected("policy.nonce_expired", "nonce has expired")
            used = msgspec.structs.replace(record, used_by=verdict_id)
            try:
                await self._kv.update(key, msgspec.json.encode(used), revision)
                return
            except WriteConflictError:
                continue
