"""Challenge nonces: issued per node, bound into evidence, accepted exactly once.

Each nonce is a KV entry (bucket TTL = nonce lifetime) recording the node it was issued to.
Consuming it is a compare-and-set that stamps the verdict id, so two policy replicas racing
on the same nonce cannot both accept it, while the *same* verdict redelivered after a crash
is recognised and accepted again (consumers must be idempotent).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import datetime, timedelta

import msgspec

from services.mesh import events
from services.mesh.errors import Rejected
from services.mesh.kv import KeyValue, WriteConflictError

NONCE_BYTES = 32


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

    async def issue(self, node: str) -> events.NonceChallenge:
        nonce = secrets.token_bytes(NONCE_BYTES)
        expires = self._clock() + timedelta(seconds=self._ttl)
        await self._kv.create(nonce.hex(), msgspec.json.encode(_Record(node, expires)))
        return events.NonceChallenge(node=node, nonce=nonce, expires_at=expires)

    async def consume(self, nonce: bytes, node: str, verdict_id: str) -> None:
        """Accept ``nonce`` for ``verdict_id`` once; raise :class:`Rejected` otherwise."""
        key = nonce.hex()
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
