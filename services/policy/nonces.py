"""Challenge nonces: issued per node without a write, bound into evidence, accepted once.

Why no write at issue: a nonce used to be a KV entry created when it was issued and
updated when it was used, two stored writes and two round trips per attestation, the first
of them on the node's critical path. Now a nonce carries its own proof of issue::

    random (16) ‖ expiry, ms since the epoch (8) ‖ tag (16) ‖ node tag (16)

``tag`` is an HMAC-SHA256 (cut to 16 bytes) over the random part and the expiry, and
``node tag`` one over those and the node's name, both under a key derived from the policy's
signing key (:meth:`services.mesh.keys.SigningKey.derive`), which every policy replica
holds. Nobody else can make a nonce the policy accepts, nor move one to another node or
extend its life; a bad ``tag`` is ``policy.nonce_unknown``, a good one with a bad ``node
tag`` ``policy.nonce_wrong_node``, a past expiry ``policy.nonce_expired``.

Single use is the one write left: consuming a nonce *creates* its KV entry, stamped with
the verdict id, so two replicas racing on it cannot both accept it, while the same verdict
redelivered finds its own stamp and is accepted again (consumers must be idempotent). That
holds only while the entry outlives the nonce: once the bucket's TTL removed it, the same
nonce could be created, and so used, again. So the bucket keeps entries
:data:`TTL_MARGIN_S` longer than a nonce lives (:meth:`services.mesh.bus.Bus.setup`), the
policy reads the bucket's real TTL at start and issues nonces for no longer than it allows
(:func:`lifetime_for`), and ``consume`` refuses a nonce that claims more remaining life than
an entry made now would outlast by :data:`SKEW_S` (an issuer whose clock runs ahead, or an
older bucket): all on the consuming replica's own clock. A new policy key turns every
outstanding nonce into an unknown one: those rounds fail and the nodes attest again.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import msgspec

from services.mesh import events
from services.mesh.bus import NONCE_TTL_MARGIN_S
from services.mesh.errors import Rejected
from services.mesh.kv import KeyValue, WriteConflictError

RANDOM_BYTES = 16
TAG_BYTES = 16
NONCE_BYTES = RANDOM_BYTES + 8 + 2 * TAG_BYTES
MAC_PURPOSE = "attestmesh nonce mac v1"
TTL_MARGIN_S = NONCE_TTL_MARGIN_S
"""How much longer the ``nonces`` bucket keeps an entry than a nonce lives."""
SKEW_S = 10.0
"""The clock difference between policy replicas (and the server) that is tolerated."""


def lifetime_for(configured: float, bucket_ttl: float | None) -> float:
    """The nonce lifetime to issue: ``configured``, shortened so a used nonce's entry
    outlives it by ``SKEW_S`` in a bucket keeping entries ``bucket_ttl`` seconds (``None``:
    for ever). Raises ``ValueError`` if the bucket keeps entries too briefly for any."""
    if bucket_ttl is None:
        return configured
    allowed = bucket_ttl - 2 * SKEW_S
    if allowed < 1.0:
        raise ValueError(f"the nonces bucket keeps entries {bucket_ttl:.0f} s: too short")
    return min(configured, allowed)


class _Used(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    node: str
    used_by: str


class NonceStore:
    def __init__(
        self,
        kv: KeyValue,
        mac_key: bytes,
        *,
        ttl: float,
        clock: Callable[[], datetime] = events.utcnow,
        entry_ttl: float | None = None,
    ) -> None:
        """``entry_ttl``: how long the bucket keeps a used nonce's entry (``None``: for ever;
        by default ``ttl`` plus :data:`TTL_MARGIN_S`, as :meth:`Bus.setup` creates it)."""
        if len(mac_key) < 32:
            raise ValueError("a nonce key needs at least 32 bytes")
        self._kv = kv
        self._mac_key = mac_key
        self._ttl = ttl
        self._clock = clock
        self._entry_ttl = ttl + TTL_MARGIN_S if entry_ttl is None else entry_ttl

    def __repr__(self) -> str:
        return f"NonceStore(ttl={self._ttl})"

    def _tags(self, head: bytes, node: str) -> tuple[bytes, bytes]:
        issued = hmac.new(self._mac_key, b"issued\0" + head, hashlib.sha256).digest()
        bound = hmac.new(self._mac_key, b"node\0" + head + node.encode(), hashlib.sha256).digest()
        return issued[:TAG_BYTES], bound[:TAG_BYTES]

    async def issue(self, node: str) -> events.NonceChallenge:
        expires = self._clock() + timedelta(seconds=self._ttl)
        milliseconds = int(expires.timestamp() * 1000)
        head = secrets.token_bytes(RANDOM_BYTES) + milliseconds.to_bytes(8, "big")
        issued, bound = self._tags(head, node)
        expires_at = datetime.fromtimestamp(milliseconds / 1000, UTC)
        return events.NonceChallenge(node=node, nonce=head + issued + bound, expires_at=expires_at)

    def check(self, nonce: bytes, node: str) -> None:
        """That the policy issued ``nonce`` to ``node`` and it has not expired."""
        if len(nonce) != NONCE_BYTES:
            raise Rejected("policy.nonce_unknown", "not a nonce this policy issued")
        head, tags = nonce[: RANDOM_BYTES + 8], nonce[RANDOM_BYTES + 8 :]
        issued, bound = self._tags(head, node)
        if not hmac.compare_digest(tags[:TAG_BYTES], issued):
            raise Rejected("policy.nonce_unknown", "not a nonce this policy issued")
        if not hmac.compare_digest(tags[TAG_BYTES:], bound):
            raise Rejected("policy.nonce_wrong_node", "the nonce was issued to another node")
        expires = int.from_bytes(head[RANDOM_BYTES:], "big")
        now_ms = self._clock().timestamp() * 1000
        if expires < now_ms:
            raise Rejected("policy.nonce_expired", "nonce has expired")
        if expires - now_ms > (self._entry_ttl - SKEW_S) * 1000:
            # Its use could be forgotten before it expires: refused rather than risk a reuse.
            raise Rejected("policy.nonce_lifetime", "the nonce outlives what its use is kept")

    async def consume(self, nonce: bytes, node: str, verdict_id: str) -> None:
        """Accept ``nonce`` for ``verdict_id`` once; raise :class:`Rejected` otherwise."""
        self.check(nonce, node)
        key = nonce[:RANDOM_BYTES].hex()
        try:
            await self._kv.create(key, msgspec.json.encode(_Used(node, verdict_id)))
            return
        except WriteConflictError:
            pass
        entry = await self._kv.get(key)
        if entry is None:  # created and gone already: only past the bucket's TTL
            raise Rejected("policy.nonce_expired", "nonce has expired")
        try:
            used = msgspec.json.decode(entry[0], type=_Used)
        except msgspec.DecodeError:
            raise Rejected("policy.nonce_replayed", "the nonce's use is unreadable") from None
        if used.used_by != verdict_id:
            raise Rejected("policy.nonce_replayed", "nonce was already used")
