"""The :class:`~services.mesh.kv.KeyValue` seam implemented on a NATS JetStream KV bucket.

Listing does not use nats-py's ``KeyValue.keys()``. That method reads the bucket through an
ordered push consumer and decides the listing is complete from pending counts: if the
consumer-info reply it asks for right after subscribing says nothing is pending and nothing
has been received yet, the bucket is taken to be empty. On a busy server that reply can
arrive before the deliveries the server has already counted as sent, so the listing ends
with no keys and raises ``NoKeysError``, which reads exactly like an empty bucket. (Seen on a
local server with sixteen writers putting and deleting other keys: about one listing in a
hundred of a five-key bucket came back empty, every time through that path; under heavier
machine load some listings also came back short.)

Here a listing is a stream-info request for the bucket's subjects, answered from one view of
the stream, followed by a read of the last message on each subject to drop those whose last
operation was a delete or purge. Every failure or inconsistency on the way raises
:class:`BusError` (``kv.list_failed``); an empty list only ever means an empty bucket (or,
for a listing under a prefix, no key under it: an empty filtered answer is confirmed by
reading the stream for a message under the prefix).

Reads (``get``) are one stream-message request of our own too, the one nats-py's ``get``
makes, decoded with msgspec: nats-py ran the stored message's headers through the standard
library's e-mail parser and built its message objects (dates parsed) on every read, about
half of a read's client CPU, and the services read KV several times per attestation. The
request goes to the stream leader (never a direct get, which a replica may answer from an
older state), and a value whose last operation is a delete, a purge or a server marker reads
as absent, as does an empty value (as nats-py had it). ``next_write`` is the same request
asking for the first message at or after a stream sequence under a wildcard subject.

Conditional writes (``update``, and ``create`` of a key that never held a value) are one
publish to the key's subject with the revision it must still be at
(``Nats-Expected-Last-Subject-Sequence``, 0 for none), as nats-py makes it, with the
acknowledgement decoded by msgspec rather than through nats-py's JSON and dataclass layers
(about 50 µs of client CPU per write). A ``create`` that finds the key present takes
nats-py's own path, which tells a live value from a deleted one (a key deleted or purged may
be created again).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Mapping
from typing import TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue as JsKeyValue

from services.mesh import outage
from services.mesh.errors import BusError, Unavailable
from services.mesh.kv import (
    KEY_EXISTS,
    LIST_FAILED,
    REVISION_CONFLICT,
    WriteConflictError,
    validate_key,
    validate_prefix,
)
from services.mesh.pace import Pace

MAX_LISTED_KEYS = 100_000
"""The most subjects one stream-info reply carries; a bigger bucket fails to list, loudly."""
_LIST_CONCURRENCY = 16
_NO_MESSAGE_FOUND = 10037  # as opposed to 10059, the whole stream is gone
_WRONG_LAST_SEQUENCE = 10071
_KEY_IN_FLIGHT = 10164
"""A clustered stream's leader refuses a conditional write to a key while an earlier write
to it is proposed but not yet applied: not a conflict with what a read shows (that write is
not visible yet), so the same write is asked again once it lands."""
IN_FLIGHT_WAIT_S = 2.0
"""How long a write waits for an earlier one to the same key to land: past that, the stream
cannot commit (no quorum), which is an outage, not a conflict."""
_IN_FLIGHT_PAUSES = (0.002, 0.005, 0.01, 0.02, 0.05)
_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_KV_OPERATION = "KV-Operation"
_MARKER_REASON = "Nats-Marker-Reason"


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0


class _StreamState(msgspec.Struct):
    messages: int = 0
    subjects: dict[str, int] | None = None


class _StreamInfoReply(msgspec.Struct):
    error: _ApiError | None = None
    total: int | None = None
    state: _StreamState | None = None


class _StoredMessage(msgspec.Struct):
    subject: str = ""
    seq: int = 0
    data: str = ""
    hdrs: str = ""


class _MessageReply(msgspec.Struct):
    error: _ApiError | None = None
    message: _StoredMessage | None = None


class _PubAck(msgspec.Struct):
    error: _ApiError | None = None
    seq: int = 0


_Reply = TypeVar("_Reply", _MessageReply, _PubAck)


def _answer_error(error: _ApiError) -> BusError:
    """A server's error answer: a failover to wait out, or the server's refusal."""
    if outage.outage_answer(error.code, error.err_code):
        return Unavailable("kv.unavailable", f"{error.code}/{error.err_code}")
    return BusError("kv.api_error", f"{error.err_code}")


def _list_failure(exc: Exception, step: str) -> BusError:
    """A listing that failed at ``step`` (a client error, or one already the mesh's own), as
    ``kv.list_failed``: still an outage if nobody answered, so that waiting can help."""
    if isinstance(exc, BusError):
        failure = Unavailable if isinstance(exc, Unavailable) else BusError
        return failure(LIST_FAILED, f"{step}: {exc.detail or exc.reason}")
    return outage.mapped(exc, unavailable=LIST_FAILED, refused=LIST_FAILED, step=step)


def _headers(block: bytes) -> dict[str, str]:
    """The ``Name: value`` lines of a NATS header block (after its ``NATS/1.0`` line)."""
    found: dict[str, str] = {}
    for line in block.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            found[name.strip().decode("utf-8", "replace")] = value.strip().decode(
                "utf-8", "replace"
            )
    return found


def _is_marker(headers: Mapping[str, str] | None) -> bool:
    """A delete or purge by a client (``KV-Operation``) or by the server (a TTL marker)."""
    if not headers:
        return False
    return headers.get(_KV_OPERATION) in ("DEL", "PURGE") or _MARKER_REASON in headers


class NatsKeyValue:
    """Revisioned reads and conditional writes on one JetStream KV bucket.

    Listing reads the bucket's stream name, subject prefix and JetStream API prefix from the
    nats-py bucket object's private attributes, as nats-py offers no public accessor; they
    are what its own ``get`` and ``keys`` use.
    """

    def __init__(self, kv: JsKeyValue) -> None:
        self._kv = kv

    async def get(self, key: str) -> tuple[bytes, int] | None:
        subject = self._kv._pre + validate_key(key)
        found = await self._stored({"last_by_subj": subject})
        if found is None or found.subject != subject:
            return None
        value = self._value(found)
        return (value, found.seq) if value is not None else None

    async def next_write(self, prefix: str, after: int) -> tuple[str, bytes | None, int] | None:
        # The first message at or after a stream sequence on a wildcard subject: KV
        # revisions are stream sequences, and history 1 keeps only each key's last write.
        wanted = self._kv._pre + validate_prefix(prefix)
        found = await self._stored({"seq": max(after, 0) + 1, "next_by_subj": f"{wanted}>"})
        if found is None:
            return None
        if not found.subject.startswith(wanted) or found.seq <= after:
            raise BusError("kv.api_error", "the server answered outside the request")
        return found.subject[len(self._kv._pre) :], self._value(found), found.seq

    async def _ask(
        self,
        subject: str,
        payload: bytes,
        reply_type: type[_Reply],
        what: str,
        *,
        headers: dict[str, str] | None = None,
    ) -> _Reply:
        """One request to the server, its reply decoded with msgspec: an unreachable
        server is ``kv.unavailable``, a reply that does not decode ``kv.api_error``."""
        js = self._kv._js
        try:
            reply = await js._nc.request(subject, payload, timeout=js._timeout, headers=headers)
            return msgspec.json.decode(reply.data, type=reply_type)
        except outage.UNANSWERED as exc:
            raise Unavailable("kv.unavailable", type(exc).__name__) from None
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise BusError("kv.api_error", f"{what} is malformed") from None

    async def _stored(self, request: dict[str, object]) -> _StoredMessage | None:
        """One stream-message request to the stream leader; ``None`` if no message matches."""
        js = self._kv._js
        answer = await self._ask(
            f"{js._prefix}.STREAM.MSG.GET.{self._kv._stream}",
            msgspec.json.encode(request),
            _MessageReply,
            "the stored-message reply",
        )
        if answer.error is not None:
            if answer.error.err_code == _NO_MESSAGE_FOUND:
                return None
            raise _answer_error(answer.error)
        found = answer.message
        return found if found is not None and found.seq > 0 else None

    @staticmethod
    def _value(found: _StoredMessage) -> bytes | None:
        """The stored value; ``None`` for a delete, purge or server marker, or an empty one."""
        try:
            value = base64.b64decode(found.data, validate=True)
            if found.hdrs and _is_marker(_headers(base64.b64decode(found.hdrs, validate=True))):
                return None
        except binascii.Error:
            raise BusError("kv.api_error", "the stored-message reply is malformed") from None
        return value or None

    async def _write(
        self, key: str, value: bytes, last: int | None, conflict: str, *, delete: bool = False
    ) -> int:
        """Write ``value`` if ``key``'s last revision is ``last`` (0: it never held one;
        ``None``: whatever it holds), or with ``delete`` a delete marker instead.

        Why wait out a write in flight: a compare-and-set loop reads, writes and on conflict
        reads again. Refused because an earlier write is still being replicated, it reads
        the old value again, and a busy cluster's commits (a server lost, a replica catching
        up) outlast any number of quick retries; seen as 16 refusals in 35 ms and a node's
        round failed with ``broker.write_conflict``. Asked again once that write has landed,
        it is decided against it: written, or a real conflict that a read then shows."""
        headers = {} if last is None else {_EXPECTED_LAST: str(last)}
        if delete:
            headers[_KV_OPERATION] = "DEL"
        loop = asyncio.get_running_loop()
        gives_up = loop.time() + IN_FLIGHT_WAIT_S
        waits = 0
        while True:
            answer = await self._ask(
                self._kv._pre + key, value, _PubAck, "the publish acknowledgement", headers=headers
            )
            if answer.error is None or answer.error.err_code != _KEY_IN_FLIGHT:
                break
            if loop.time() >= gives_up:
                raise Unavailable("kv.unavailable", f"a write to {key} stayed in flight")
            await asyncio.sleep(_IN_FLIGHT_PAUSES[min(waits, len(_IN_FLIGHT_PAUSES) - 1)])
            waits += 1
        if answer.error is not None:
            if answer.error.err_code == _WRONG_LAST_SEQUENCE:
                raise WriteConflictError(conflict, "the key is not at the expected revision")
            raise _answer_error(answer.error)
        if answer.seq <= 0:
            raise BusError("kv.api_error", "the publish acknowledgement names no revision")
        return answer.seq

    async def create(self, key: str, value: bytes) -> int:
        """Write ``value`` if ``key`` holds none: never written, or its last write a delete
        (whose marker is then the revision the write is conditional on)."""
        subject = self._kv._pre + validate_key(key)
        try:
            return await self._write(key, value, 0, KEY_EXISTS)
        except WriteConflictError:
            found = await self._stored({"last_by_subj": subject})
        if found is not None and found.subject == subject and self._value(found) is None:
            return await self._write(key, value, found.seq, KEY_EXISTS)
        raise WriteConflictError(KEY_EXISTS, "key exists")

    async def update(self, key: str, value: bytes, last_revision: int) -> int:
        return await self._write(validate_key(key), value, last_revision, REVISION_CONFLICT)

    async def delete(self, key: str, last_revision: int | None = None) -> None:
        last = last_revision if last_revision else None  # 0 or none: unconditional
        await self._write(validate_key(key), b"", last, REVISION_CONFLICT, delete=True)

    async def purge_before(self, prefix: str, revision: int) -> None:
        # A filtered stream purge up to a sequence: KV revisions are stream sequences.
        subject = f"{self._kv._pre}{validate_prefix(prefix)}>"
        try:
            await self._kv._js.purge_stream(self._kv._stream, seq=revision, subject=subject)
        except (nats.errors.Error, TimeoutError) as exc:
            raise outage.mapped(exc, unavailable="kv.unavailable", refused="kv.api_error") from None

    async def keys(self, prefix: str = "", *, pause_s: float = 0.0) -> list[str]:
        """Every live key (under ``prefix``, a key and a dot, if given: the server then
        lists only those subjects); raises ``kv.list_failed`` rather than ever returning a
        short list. With ``pause_s``, one task checks the keys and pauses that long every few
        (:mod:`services.mesh.pace`: a listing sharing an event loop with requests).

        Keys written while the listing runs may or may not appear; a key that exists
        throughout always does.

        At most ``_LIST_CONCURRENCY`` tasks check the keys, each taking the next in turn. A
        task per key held about 1.8 KB each until the listing ended, and the broker lists its
        whole audit log (up to 20,000 records) at every checkpoint: its resident set rose
        with the log, step by step, for as long as the log grew.
        """
        wanted = self._kv._pre + (validate_prefix(prefix) if prefix else "")
        subjects = await self._subjects(wanted)
        keys = [subject[len(self._kv._pre) :] for subject in subjects]
        if any(not subject.startswith(wanted) for subject in subjects):
            raise BusError(LIST_FAILED, "the server listed a subject outside the request")
        flags = [False] * len(subjects)
        turns = iter(enumerate(subjects))

        pace = Pace(pause_s)

        async def check() -> None:
            for i, subject in turns:
                flags[i] = await self._live(subject)
                await pace.step()

        checkers = 1 if pace.paced else _LIST_CONCURRENCY
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(checkers, len(subjects))):
                    group.create_task(check())
        except ExceptionGroup as failed:  # the first failure, as the listing's own
            raise failed.exceptions[0] from None
        return [key for key, present in zip(keys, flags, strict=True) if present]

    async def _subjects(self, wanted: str) -> list[str]:
        """Every subject of the bucket's stream under ``wanted`` that still holds a message."""
        js = self._kv._js
        request = msgspec.json.encode({"subjects_filter": f"{wanted}>"})
        try:
            reply = await js._nc.request(
                f"{js._prefix}.STREAM.INFO.{self._kv._stream}", request, timeout=js._timeout
            )
            info = msgspec.json.decode(reply.data, type=_StreamInfoReply)
        except (nats.errors.Error, TimeoutError) as exc:
            raise _list_failure(exc, "stream info") from None
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise BusError(LIST_FAILED, "stream info reply is malformed") from None
        if info.error is not None:
            raise _list_failure(_answer_error(info.error), "stream info")
        if info.state is None:
            raise BusError(LIST_FAILED, "stream info carries no state")
        found = info.state.subjects or {}
        total = len(found) if info.total is None else info.total
        if total != len(found) or len(found) >= MAX_LISTED_KEYS:
            raise BusError(LIST_FAILED, f"{len(found)} of {total} subjects returned")
        if not found and info.state.messages > 0 and not await self._none_under(wanted):
            raise BusError(LIST_FAILED, "the stream holds messages but reports no subjects")
        return list(found)

    async def _none_under(self, wanted: str) -> bool:
        """Whether no message is stored under ``wanted`` (asked directly, so that an empty
        filtered listing is confirmed rather than trusted)."""
        if wanted == self._kv._pre:
            return False
        try:
            return await self._stored({"seq": 1, "next_by_subj": f"{wanted}>"}) is None
        except (BusError, nats.errors.Error, TimeoutError) as exc:
            raise _list_failure(exc, "stored message") from None

    async def _live(self, subject: str) -> bool:
        """Whether the last message on ``subject`` is a value, not a delete or purge marker."""
        try:
            msg = await self._kv._js.get_msg(
                self._kv._stream, subject=subject, direct=self._kv._direct
            )
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code not in (None, _NO_MESSAGE_FOUND):
                raise BusError(LIST_FAILED, f"last message: error {exc.err_code}") from None
            return False  # removed by age or a stream purge since the stream info
        except (nats.errors.Error, TimeoutError) as exc:
            raise _list_failure(exc, "last message") from None
        if msg.subject != subject:
            raise BusError(LIST_FAILED, "the server answered for another subject")
        return not _is_marker(msg.headers)
