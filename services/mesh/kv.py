"""The key-value seam for state kept in NATS KV buckets (sealed secrets, nonces, collateral).

The broker keeps all of its state in one bucket (NATS JetStream KV in production,
:class:`services.testing.memkv.MemoryKeyValue` in unit tests), so this module draws the
smallest interface both can honour: revisioned reads plus create-if-absent and
compare-and-set writes. Those two conditional writes are what let several broker replicas
share one bucket without clobbering each other; nothing here knows about sealing.

Keys use only ``[A-Za-z0-9_=.-]`` with dots as separators, the subset NATS KV accepts
without escaping, so a key that works in memory also works on the bus.
"""

from __future__ import annotations

import re
from typing import Protocol

from services.mesh.errors import BusError

MAX_KEY_LENGTH = 512
_KEY_RE = re.compile(r"[A-Za-z0-9_=-]+(?:\.[A-Za-z0-9_=-]+)*")

KEY_EXISTS = "kv.key_exists"
REVISION_CONFLICT = "kv.revision_conflict"
INVALID_KEY = "kv.invalid_key"
LIST_FAILED = "kv.list_failed"


class WriteConflictError(BusError):
    """A conditional write lost a race; callers re-read and retry.

    ``reason`` is :data:`KEY_EXISTS` for a ``create`` of a present key and
    :data:`REVISION_CONFLICT` for an ``update``/``delete`` whose revision is stale. It is a
    separate type because retrying is the one decision callers must make on it.
    """


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a valid key followed by one dot (``audit.``)."""
    if not prefix.endswith(".") or len(prefix) < 2:
        raise BusError(INVALID_KEY, "a key prefix ends in a dot")
    validate_key(prefix[:-1])
    return prefix


def validate_key(key: str) -> str:
    """Return ``key`` if NATS KV can store it verbatim, else raise ``kv.invalid_key``.

    Validating at the seam means a bad key fails identically in tests and in production,
    instead of only when the JetStream client rejects it.
    """
    if len(key) > MAX_KEY_LENGTH or _KEY_RE.fullmatch(key) is None:
        raise BusError(INVALID_KEY, f"key of length {len(key)} is not NATS-KV safe")
    return key


class KeyValue(Protocol):
    """A revisioned key-value bucket with conditional writes.

    Revisions are positive and increase with every write to the bucket, as JetStream
    stream sequences do. A deleted key reads as absent and may be created again.
    """

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """The value and revision of ``key``, or ``None`` if absent or deleted."""
        ...

    async def create(self, key: str, value: bytes) -> int:
        """Write ``key`` only if absent; return the new revision.

        Raises :class:`WriteConflictError` (``kv.key_exists``) if the key is present.
        """
        ...

    async def update(self, key: str, value: bytes, last_revision: int) -> int:
        """Write ``key`` only if its current revision is ``last_revision``.

        Raises :class:`WriteConflictError` (``kv.revision_conflict``) otherwise, including
        when the key is absent.
        """
        ...

    async def delete(self, key: str, last_revision: int | None = None) -> None:
        """Delete ``key``; with ``last_revision``, only if that is still its revision.

        Deleting an absent key without ``last_revision`` is not an error. A stale
        ``last_revision`` raises :class:`WriteConflictError` (``kv.revision_conflict``).
        """
        ...

    async def keys(self, prefix: str = "", *, pause_s: float = 0.0) -> list[str]:
        """All present keys (those under ``prefix``, a key and a dot, if given), in no
        particular order; ``pause_s`` asks a long listing to pause now and then, so that
        requests sharing its event loop are not held up.

        A listing that cannot be completed raises :class:`BusError` (:data:`LIST_FAILED`)
        and never returns a partial or empty list instead: callers derive security
        decisions from absence (no reference values, no audit records), so an error read as
        "empty" would loosen them.
        """
        ...

    async def next_write(self, prefix: str, after: int) -> tuple[str, bytes | None, int] | None:
        """The oldest write still held under ``prefix`` (which ends in a dot) whose revision
        is above ``after``: its key, its value (``None`` for a delete or purge marker, or an
        empty value) and its revision; ``None`` if there is none.

        A bucket keeping one revision per key holds only each key's latest write, so reading
        on from each answer's revision visits every key written since ``after`` once, in
        the order of their last writes, markers included. The audit checkpoint reads its
        new records this way: it sees every write to the log since its last, a rewrite or a
        delete as well as an append, without listing the bucket.
        """
        ...

    async def purge_before(self, prefix: str, revision: int) -> None:
        """Remove, without leaving delete markers, every key under ``prefix`` (which ends
        in a dot) last written before ``revision``.

        Retention uses this rather than :meth:`delete`: on JetStream a delete leaves a
        marker per key, which would grow without bound as old records are pruned.
        """
        ...
