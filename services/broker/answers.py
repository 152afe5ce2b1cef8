"""Answer each release once: per-decision claims shared by replicas, and refusal counting.

**Repeats are refused, not re-answered.** A repeated request for a (decision, resource)
already released gets ``broker.already_released`` and adds no audit record. Returning a
cached copy of the first answer was the alternative; it was rejected because the wrapped
secret is bound (HPKE associated data) to the *first request's id*, so a repeat (which
carries a new id) could not open it anyway: caching would store wrapped secrets in the
bucket (up to 64 KiB each, per decision and resource) for an answer no honest client can
use. The collector is unaffected: it retries only while the broker says
``broker.no_decision`` or ``broker.decision_pending``, and nothing is claimed then. A node
whose reply was lost re-attests, which its next round does anyway.

**Claims.** ``answered.<node>`` holds, sealed, the node's current decision id and what has
been answered under it (``r:<resource>`` for a release, ``x:<reason>`` for a refusal to the
decision's holder). A release first *claims* its resource with compare-and-set, and only the
winner wraps, audits and answers; so the "once" holds across replicas sharing the bucket and
across restarts. A claim made just before a crash is never answered: that fails closed (the
node re-attests). A new decision for the node replaces the record, which keeps it to one
small key per node. A deny decision's ``revoked`` audit record is claimed the same way
(``v:revoked``), so a redelivered decision, or two replicas handling it, add one record; if
appending it then fails, the claim is taken back (:meth:`Answers.unclaim`) so the
redelivery that follows writes it. A broker remembers the record it wrote last for each node
and tries the next claim's compare-and-set against it before reading the record back: the
write succeeds only if nothing changed since, and every refusal is decided on a fresh read.

**Counting.** Requests from anyone not holding the node's current decision (no decision,
expired, unknown id, malformed, wrong subject) and repeats are counted per reason in memory
(:class:`RefusalCounter`, bounded) and written as one periodic sealed summary record, so a
flood of them cannot grow the audit log.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import msgspec

from services.broker.sealing import AeadKey, open_sealed, seal
from services.mesh.errors import SealingError
from services.mesh.kv import KeyValue, WriteConflictError

ANSWERED_PREFIX = "answered."
MAX_ITEMS = 4096
MAX_CAS_RETRIES = 32
MAX_REASONS = 32
MAX_REMEMBERED = 65_536
OTHER_REASON = "broker.other"
_REASON = re.compile(r"[a-z0-9_]+(?:\.[a-z0-9_]+){0,7}")


class _Answered(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    decision_id: str
    issued_at: int
    items: list[str] = []


def answered_key(node: str) -> str:
    return ANSWERED_PREFIX + node


class Answers:
    """Claims on (decision, item) pairs in the broker bucket, sealed with the data key."""

    def __init__(self, kv: KeyValue, data_key: AeadKey) -> None:
        self._kv = kv
        self._key = data_key
        self._written: OrderedDict[str, tuple[_Answered, int, int]] = OrderedDict()
        """Per node, the record this broker last wrote, its sealed version and its KV
        revision (bounded): the next claim is tried against it without reading it back."""

    def __repr__(self) -> str:
        return "Answers()"

    def _read(self, key: str, blob: bytes) -> tuple[_Answered, int]:
        opened = open_sealed(self._key, blob, purpose="answered", name=key)
        try:
            return msgspec.msgpack.decode(opened.plaintext, type=_Answered), opened.version
        except msgspec.DecodeError as exc:
            raise SealingError("broker.seal_malformed", f"{key} does not decode") from exc

    async def claim(self, node: str, decision_id: str, issued_at: int, item: str) -> bool:
        """Claim ``item`` under ``decision_id``; ``False`` if it was already claimed.

        Also ``False`` if the node's record names a newer decision: the request's decision
        has been superseded, so it must not be answered again either.
        """
        key = answered_key(node)
        if await self._claim_remembered(key, decision_id, issued_at, item):
            return True
        for _ in range(MAX_CAS_RETRIES):
            found = await self._kv.get(key)
            version = 0
            items: list[str] = []
            if found is not None:
                current, version = self._read(key, found[0])
                if current.decision_id == decision_id:
                    if item in current.items:
                        return False
                    items = list(current.items)
                elif current.issued_at > issued_at:
                    return False
            record = _Answered(decision_id, issued_at, [*items, item])
            try:
                await self._write(key, record, version + 1, found[1] if found else None)
            except WriteConflictError:
                continue
            return True
        raise SealingError("broker.write_conflict", f"claim on {key} kept conflicting")

    async def _claim_remembered(
        self, key: str, decision_id: str, issued_at: int, item: str
    ) -> bool:
        """Claim against the record this broker wrote last, without reading it back.

        Only a claim the remembered record allows is tried, and the compare-and-set
        succeeds only if that record is still the stored one; every refusal, and any change
        made elsewhere, is left to a fresh read (``False``: go and read)."""
        remembered = self._written.pop(key, None)
        if remembered is None:
            return False
        current, version, revision = remembered
        if current.decision_id == decision_id:
            if item in current.items:
                return False
            items = list(current.items)
        elif current.issued_at > issued_at:
            return False
        else:
            items = []
        try:
            await self._write(
                key, _Answered(decision_id, issued_at, [*items, item]), version + 1, revision
            )
        except WriteConflictError:
            return False
        return True

    async def _write(self, key: str, record: _Answered, version: int, revision: int | None) -> None:
        """Seal and write ``record`` (create if ``revision`` is ``None``, else
        compare-and-set), and remember it."""
        if len(record.items) > MAX_ITEMS:
            raise SealingError("broker.answers_full", f"at most {MAX_ITEMS} per decision")
        blob = seal(
            self._key,
            msgspec.msgpack.encode(record),
            purpose="answered",
            name=key,
            version=version,
        )
        if revision is None:
            written = await self._kv.create(key, blob)
        else:
            written = await self._kv.update(key, blob, revision)
        self._written[key] = (record, version, written)
        while len(self._written) > MAX_REMEMBERED:
            self._written.popitem(last=False)

    async def unclaim(self, node: str, decision_id: str, item: str) -> None:
        """Take back a claim whose work failed, so a retry may claim it again; a record that
        has moved on to another decision is left alone."""
        key = answered_key(node)
        self._written.pop(key, None)
        for _ in range(MAX_CAS_RETRIES):
            found = await self._kv.get(key)
            if found is None:
                return
            current, version = self._read(key, found[0])
            if current.decision_id != decision_id or item not in current.items:
                return
            kept = [claimed for claimed in current.items if claimed != item]
            try:
                await self._write(
                    key, _Answered(decision_id, current.issued_at, kept), version + 1, found[1]
                )
            except WriteConflictError:
                continue
            return
        raise SealingError("broker.write_conflict", f"unclaim on {key} kept conflicting")


class RefusalCounter:
    """Refusals per reason since the last summary; at most :data:`MAX_REASONS` distinct
    reasons are kept (anything beyond, or not a dotted code, counts as ``broker.other``)."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def count(self, reason: str, number: int = 1) -> None:
        if _REASON.fullmatch(reason) is None or (
            reason not in self._counts and len(self._counts) >= MAX_REASONS - 1
        ):
            reason = OTHER_REASON
        self._counts[reason] = self._counts.get(reason, 0) + number

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def peek(self) -> dict[str, int]:
        return dict(self._counts)

    def drain(self) -> dict[str, int]:
        """The counts so far, resetting them (the caller seals them as one summary)."""
        counts, self._counts = self._counts, {}
        return counts

    def restore(self, counts: dict[str, int]) -> None:
        """Put back counts whose summary could not be written, so none are lost."""
        for reason, number in counts.items():
            self.count(reason, number)
