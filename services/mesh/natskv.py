"""The :class:`~services.mesh.kv.KeyValue` seam implemented on a NATS JetStream KV bucket."""

from __future__ import annotations

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue as JsKeyValue

from services.mesh.errors import BusError
from services.mesh.kv import (
    KEY_EXISTS,
    REVISION_CONFLICT,
    WriteConflictError,
    validate_key,
    validate_prefix,
)

_UNAVAILABLE = (
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
)


class NatsKeyValue:
    """Revisioned reads and conditional writes on one JetStream KV bucket."""

    def __init__(self, kv: JsKeyValue) -> None:
        self._kv = kv

    async def get(self, key: str) -> tuple[bytes, int] | None:
        try:
            entry = await self._kv.get(validate_key(key))
        except nats.js.errors.KeyNotFoundError:
            return None
        except _UNAVAILABLE as exc:
            raise BusError("kv.unavailable", type(exc).__name__) from None
        if entry.value is None or entry.revision is None:
            return None
        return entry.value, entry.revision

    async def create(self, key: str, value: bytes) -> int:
        try:
            return await self._kv.create(validate_key(key), value)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise WriteConflictError(KEY_EXISTS, "key exists") from None
        except nats.js.errors.APIError as exc:
            if exc.err_code == 10071:
                raise WriteConflictError(KEY_EXISTS, "key exists") from None
            raise BusError("kv.api_error", f"{exc.code}") from None
        except _UNAVAILABLE as exc:
            raise BusError("kv.unavailable", type(exc).__name__) from None

    async def update(self, key: str, value: bytes, last_revision: int) -> int:
        try:
            return await self._kv.update(validate_key(key), value, last=last_revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise WriteConflictError(REVISION_CONFLICT, "stale revision") from None
        except nats.js.errors.APIError as exc:
            if exc.err_code == 10071:
                raise WriteConflictError(REVISION_CONFLICT, "stale revision") from None
            raise BusError("kv.api_error", f"{exc.code}") from None
        except _UNAVAILABLE as exc:
            raise BusError("kv.unavailable", type(exc).__name__) from None

    async def delete(self, key: str, last_revision: int | None = None) -> None:
        try:
            await self._kv.delete(validate_key(key), last=last_revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise WriteConflictError(REVISION_CONFLICT, "stale revision") from None
        except nats.js.errors.APIError as exc:
            if exc.err_code == 10071:
                raise WriteConflictError(REVISION_CONFLICT, "stale revision") from None
            raise BusError("kv.api_error", f"{exc.code}") from None
        except _UNAVAILABLE as exc:
            raise BusError("kv.unavailable", type(exc).__name__) from None

    async def purge_before(self, prefix: str, revision: int) -> None:
        # A filtered stream purge up to a sequence: KV revisions are stream sequences.
        subject = f"{self._kv._pre}{validate_prefix(prefix)}>"
        try:
            await self._kv._js.purge_stream(self._kv._stream, seq=revision, subject=subject)
        except nats.js.errors.APIError as exc:
            raise BusError("kv.api_error", f"{exc.code}") from None
        except _UNAVAILABLE as exc:
            raise BusError("kv.unavailable", type(exc).__name__) from None

    async def keys(self) -> list[str]:
        try:
            return list(await self._kv.keys())
        except nats.js.errors.NoKeysError:
            return []
        except _UNAVAILABLE as exc:
            raise BusError("kv.unavailable", type(exc).__name__) from None
