"""The broker's secret store: sealed blobs in a shared KV bucket, with rollback detection.

KV layout (bucket ``broker-state``)::

    keyring              the data key, sealed under the sealing key (created once)
    index                sealed version index: name -> (version, live); the commit point
    secret.<b64url name> one sealed secret; the AAD binds its name and version
    audit.<seq>          audit records (see :mod:`services.broker.audit`)

Every record version is strictly greater than any earlier blob of the same record (a write
reads the current blob's version first, and tombstones keep counting after a delete), and
the index remembers the version last committed. A blob older than the index says is
therefore a replay: ``broker.rollback_detected``. A blob *newer* than the index is accepted,
because a writer that crashed between its record write and its index commit leaves exactly
that, and only the holder of the data key can produce one.

Writes are compare-and-set on both the record and the index, so replicas sharing a bucket
retry instead of losing each other's updates.

**Reads and freshness.** Every read of a secret reads the index from the bucket, so a put or
delete that has returned, on any replica, is seen by every read that starts after it, on
every replica: nothing is served stale, whatever the bound. What a store keeps is what that
read lets it skip: the opened index while its sealed bytes are unchanged (no unseal or
decode), and the *sealed* blobs of records it has read, each used only while the index
names exactly its authenticated version (versions are never reused, so that blob is the
committed value). The plaintext is opened per read and never kept. A blob changed behind
an unchanged index (tampered, rolled back, removed) is noticed once the store reads the
record again, and is never served meanwhile. (A KV watch on the index could skip the index
read too, but would learn of a change only some time after it was made: a deleted secret
could still be released in that window.) Rolling back the *whole* bucket (index and
records together) to a consistent older state cannot be told from a restart without an
external monotonic counter; a running store does catch it, since it remembers the highest
index generation it has seen.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import re
import secrets
from collections import OrderedDict
from collections.abc import Sequence

import msgspec

from services.broker.recovery import RecoveryShare, make_recovery_shares
from services.broker.sealing import (
    AeadKey,
    Opened,
    SealingKeySource,
    open_sealed,
    seal,
    sealed_key_id,
)
from services.mesh.errors import SealingError
from services.mesh.kv import KeyValue, WriteConflictError

KEYRING_KEY = "keyring"
INDEX_KEY = "index"
RECORD_PREFIX = "secret."
MAX_SECRET_SIZE = 64 * 1024
MAX_NAME_LENGTH = 253
MAX_ENTRIES = 2048
MAX_CAS_RETRIES = 32
MAX_KEPT_BYTES = 4 * 1024 * 1024
"""The most sealed record bytes a store keeps in memory (least recently used first out)."""
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*){0,7}")
_KEYRING_VERSION = 1


class _Entry(msgspec.Struct, frozen=True, array_like=True):
    version: int
    live: bool


class _Index(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    entries: dict[str, _Entry] = {}


def validate_name(name: str) -> str:
    """Return ``name`` if it is a resource path like ``default/node-key``.

    Segments start with an alphanumeric, so ``..`` and empty segments cannot occur.
    """
    if len(name) > MAX_NAME_LENGTH or _NAME_RE.fullmatch(name) is None:
        raise SealingError("broker.invalid_name", f"not a resource path (length {len(name)})")
    return name


def record_key(name: str) -> str:
    """The KV key of secret ``name``: unpadded base64url, an injective NATS-safe encoding."""
    encoded = base64.urlsafe_b64encode(validate_name(name).encode()).rstrip(b"=")
    return RECORD_PREFIX + encoded.decode()


def _check_generation(current: int, expected: int | None) -> None:
    if expected is not None and current != expected:
        raise SealingError(
            "broker.generation_moved",
            f"the store is at generation {current}, the request was made at {expected}",
        )


async def _backoff(attempt: int) -> None:
    await asyncio.sleep(secrets.randbelow(1000 * (attempt + 1)) / 1_000_000)


async def load_keyring(kv: KeyValue, source: SealingKeySource) -> AeadKey:
    """Unwrap the data key, creating it on first use of an empty bucket.

    A bucket that holds state but no keyring is refused (``broker.keyring_missing``): making
    a fresh data key there would silently orphan every sealed record.
    """
    sealing_key = source.sealing_key()
    for attempt in range(MAX_CAS_RETRIES):
        found = await kv.get(KEYRING_KEY)
        if found is None:
            others = [key for key in await kv.keys() if key != KEYRING_KEY]
            found = await kv.get(KEYRING_KEY)
            if found is None and others:
                raise SealingError("broker.keyring_missing", "bucket has state but no keyring")
        if found is not None:
            opened = open_sealed(sealing_key, found[0], purpose="keyring", name=KEYRING_KEY)
            return AeadKey(opened.plaintext)
        data_key = AeadKey.generate()
        blob = seal(
            sealing_key,
            data_key.export(),
            purpose="keyring",
            name=KEYRING_KEY,
            version=_KEYRING_VERSION,
        )
        try:
            await kv.create(KEYRING_KEY, blob)
        except WriteConflictError:
            await _backoff(attempt)
            continue
        return data_key
    raise SealingError("broker.write_conflict", "keyring creation kept conflicting")


async def open_keyring(kv: KeyValue, source: SealingKeySource) -> AeadKey:
    """Unwrap the data key of a bucket that has one; never creates anything.

    For the operator's recovery commands: an empty bucket is ``broker.keyring_missing``.
    """
    sealing_key = source.sealing_key()
    found = await kv.get(KEYRING_KEY)
    if found is None:
        raise SealingError("broker.keyring_missing", "the bucket holds no keyring")
    opened = open_sealed(sealing_key, found[0], purpose="keyring", name=KEYRING_KEY)
    return AeadKey(opened.plaintext)


async def data_key_id(kv: KeyValue) -> bytes:
    """The id of the data key, read from the sealed index's header.

    What a recovery must rebuild when the sealing key is lost: the keyring is sealed under
    that lost key, but the index is sealed under the data key itself. Unauthenticated here;
    :func:`rewrap_keyring` opens the index before trusting a recovered key.
    """
    found = await kv.get(INDEX_KEY)
    if found is None:
        raise SealingError(
            "broker.index_missing", "no sealed index: the store was never opened by a broker"
        )
    return sealed_key_id(found[0])


async def rewrap_keyring(kv: KeyValue, data_key: AeadKey, source: SealingKeySource) -> None:
    """Seal ``data_key`` under ``source``'s key: sealing-key rotation, or recovery.

    The data key is first proven genuine by opening the index with it, so a wrong
    recovered key can never replace the real one.
    """
    found_index = await kv.get(INDEX_KEY)
    if found_index is not None:
        open_sealed(data_key, found_index[0], purpose="index", name=INDEX_KEY)
    blob = seal(
        source.sealing_key(),
        data_key.export(),
        purpose="keyring",
        name=KEYRING_KEY,
        version=_KEYRING_VERSION,
    )
    current = await kv.get(KEYRING_KEY)
    if current is None:
        await kv.create(KEYRING_KEY, blob)
    else:
        await kv.update(KEYRING_KEY, blob, current[1])


class SecretStore:
    """Named secrets sealed under the data key; see the module docstring for the design."""

    def __init__(self, kv: KeyValue, data_key: AeadKey) -> None:
        self._kv = kv
        self._key = data_key
        self._index_floor = 0
        self._opened: tuple[bytes, _Index, int] | None = None
        """The sealed index last opened, what it holds, and its generation."""
        self._kept = _KeptBlobs(MAX_KEPT_BYTES)

    @classmethod
    async def open(cls, kv: KeyValue, source: SealingKeySource) -> SecretStore:
        """Open (or initialise) the store in ``kv`` with the sealing key from ``source``."""
        store = cls(kv, await load_keyring(kv, source))
        await store._ensure_index()
        return store

    def __repr__(self) -> str:
        return f"SecretStore(data_key={self._key!r})"

    async def _ensure_index(self) -> None:
        if await self._kv.get(INDEX_KEY) is not None:
            return
        if any(key.startswith(RECORD_PREFIX) for key in await self._kv.keys()):
            raise SealingError("broker.index_missing", "secrets exist but the index is gone")
        blob = seal(
            self._key, msgspec.msgpack.encode(_Index()), purpose="index", name=INDEX_KEY, version=1
        )
        with contextlib.suppress(WriteConflictError):
            await self._kv.create(INDEX_KEY, blob)  # a peer initialised it first

    async def _load_index(self) -> tuple[_Index, int, int]:
        found = await self._kv.get(INDEX_KEY)
        if found is None:
            raise SealingError("broker.index_missing", "the version index is gone")
        opened = self._opened
        if opened is not None and opened[0] == found[0] and opened[2] >= self._index_floor:
            return opened[1], opened[2], found[1]
        sealed = open_sealed(
            self._key, found[0], purpose="index", name=INDEX_KEY, min_version=self._index_floor
        )
        try:
            index = msgspec.msgpack.decode(sealed.plaintext, type=_Index)
        except msgspec.DecodeError as exc:
            raise SealingError("broker.seal_malformed", "index does not decode") from exc
        self._index_floor = sealed.version
        self._opened = (found[0], index, sealed.version)
        return index, sealed.version, found[1]

    async def _commit_index(self, index: _Index, generation: int, revision: int) -> None:
        blob = seal(
            self._key,
            msgspec.msgpack.encode(index),
            purpose="index",
            name=INDEX_KEY,
            version=generation + 1,
        )
        await self._kv.update(INDEX_KEY, blob, revision)
        self._index_floor = max(self._index_floor, generation + 1)

    def _blob_version(self, name: str, found: tuple[bytes, int] | None) -> int:
        """The authenticated version of the current blob, or 0 if absent or unreadable."""
        if found is None:
            return 0
        try:
            return open_sealed(self._key, found[0], purpose="secret", name=name).version
        except SealingError:
            return 0

    async def generation(self) -> int:
        """The index generation: it advances with every put and delete."""
        _, generation, _ = await self._load_index()
        return generation

    async def put(self, name: str, value: bytes, *, at_generation: int | None = None) -> int:
        """Seal and store ``value`` as ``name``; return its new version.

        With ``at_generation``, only if the store is still at that generation (an operator's
        signed request names it, so a replayed request finds it moved on)."""
        key = record_key(name)
        if not 0 < len(value) <= MAX_SECRET_SIZE:
            raise SealingError(
                "broker.secret_too_large", f"secret must be 1..{MAX_SECRET_SIZE} bytes"
            )
        for attempt in range(MAX_CAS_RETRIES):
            index, generation, index_revision = await self._load_index()
            _check_generation(generation, at_generation)
            entry = index.entries.get(name)
            if entry is None and len(index.entries) >= MAX_ENTRIES:
                raise SealingError("broker.store_full", f"at most {MAX_ENTRIES} names")
            current = await self._kv.get(key)
            floor = entry.version if entry is not None else 0
            version = max(floor, self._blob_version(name, current)) + 1
            blob = seal(self._key, value, purpose="secret", name=name, version=version)
            entries = dict(index.entries)
            entries[name] = _Entry(version, live=True)
            try:
                if current is None:
                    await self._kv.create(key, blob)
                else:
                    await self._kv.update(key, blob, current[1])
                await self._commit_index(_Index(entries), generation, index_revision)
            except WriteConflictError:
                await _backoff(attempt)
                continue
            return version
        raise SealingError("broker.write_conflict", f"put {name!r} kept conflicting")

    async def get(self, name: str) -> bytes:
        """The secret ``name``; rollback, tampering or a missing blob raise.

        One KV read (the index) when the record's sealed blob is kept, else two."""
        key = record_key(name)
        for _ in range(2):
            index, _, _ = await self._load_index()
            entry = index.entries.get(name)
            if entry is None or not entry.live:
                self._kept.drop(name)
                raise SealingError("broker.secret_not_found", repr(name))
            blob = self._kept.get(name, entry.version)
            if blob is not None:
                return self._open_record(name, blob, entry.version).plaintext
            found = await self._kv.get(key)
            if found is not None:
                opened = self._open_record(name, found[0], entry.version)
                if opened.version == entry.version:
                    self._kept.put(name, found[0], opened.version)
                return opened.plaintext
        # Still live in the index after a re-read (a concurrent delete would have shown
        # as a tombstone), yet no blob: someone removed it behind the broker's back.
        raise SealingError("broker.record_missing", f"{name!r} is indexed but has no blob")

    def _open_record(self, name: str, blob: bytes, version: int) -> Opened:
        return open_sealed(self._key, blob, purpose="secret", name=name, min_version=version)

    async def list(self) -> list[str]:
        """Names of all live secrets, sorted."""
        index, _, _ = await self._load_index()
        return sorted(name for name, entry in index.entries.items() if entry.live)

    async def delete(self, name: str, *, at_generation: int | None = None) -> None:
        """Remove ``name``, leaving a tombstone so an old blob cannot be resurrected
        (``at_generation`` as for :meth:`put`)."""
        key = record_key(name)
        for attempt in range(MAX_CAS_RETRIES):
            index, generation, index_revision = await self._load_index()
            _check_generation(generation, at_generation)
            entry = index.entries.get(name)
            if entry is None or not entry.live:
                raise SealingError("broker.secret_not_found", repr(name))
            current = await self._kv.get(key)
            version = max(entry.version, self._blob_version(name, current)) + 1
            entries = dict(index.entries)
            entries[name] = _Entry(version, live=False)
            try:
                await self._commit_index(_Index(entries), generation, index_revision)
            except WriteConflictError:
                await _backoff(attempt)
                continue
            self._kept.drop(name)
            if current is not None:
                with contextlib.suppress(WriteConflictError):  # a later put owns the key now
                    await self._kv.delete(key, last_revision=current[1])
            return
        raise SealingError("broker.write_conflict", f"delete {name!r} kept conflicting")

    def recovery_shares(
        self, officer_public_keys: Sequence[bytes], threshold: int
    ) -> builtins.list[RecoveryShare]:
        """Shamir shares of the data key, each HPKE-encrypted to one recovery officer."""
        return make_recovery_shares(self._key, officer_public_keys, threshold)


class _KeptBlobs:
    """Sealed record blobs by name, each with its authenticated version, bounded in bytes."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._blobs: OrderedDict[str, tuple[bytes, int]] = OrderedDict()
        self._size = 0

    def get(self, name: str, version: int) -> bytes | None:
        """The kept blob of ``name`` if it is exactly ``version``."""
        kept = self._blobs.get(name)
        if kept is None or kept[1] != version:
            return None
        self._blobs.move_to_end(name)
        return kept[0]

    def put(self, name: str, blob: bytes, version: int) -> None:
        self.drop(name)
        if len(blob) > self._limit:
            return
        self._blobs[name] = (blob, version)
        self._size += len(blob)
        while self._size > self._limit:
            _, (evicted, _) = self._blobs.popitem(last=False)
            self._size -= len(evicted)

    def drop(self, name: str) -> None:
        kept = self._blobs.pop(name, None)
        if kept is not None:
            self._size -= len(kept[0])
