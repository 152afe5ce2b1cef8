"""Reference values: per family, the claim values a node must present to get secrets.

Stored in the ``refvalues`` KV bucket under the family name as a JSON object mapping a claim
name to its allowed values, wrapped in an operator-signed document
(:mod:`services.policy.documents`). A value is either bare (``"ab12..."``, ``7``) or an entry
``{"value": ..., "expires": "<RFC 3339>", "note": "..."}``. Managed with ``attestmesh
refvalues add|list|remove`` and handed to Rego as ``data.refvalues`` with the expired entries
left out (:func:`effective`), so a value stops counting at its expiry without anyone
re-signing anything; the same values also go as ``data.refindex``, arranged for lookups
(:mod:`services.policy.appraisal_input`).

A claim whose every value has expired keeps one placeholder no claim can equal: dropping
the claim instead would make the policy stop checking it, letting any value through.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Annotated, Any

import msgspec
import nats.errors
import nats.js.errors

from services.mesh import events, outage, subjects
from services.mesh.errors import PolicyError
from services.mesh.keys import SigningKey, TrustedKeys
from services.mesh.kv import KeyValue, WriteConflictError
from services.policy import documents

MAX_VALUES_PER_CLAIM = 10_000
MAX_CLAIMS = 256
MAX_NOTE = 256
ALL_EXPIRED = {"attestmesh": "every reference value of this claim has expired"}
"""Stands in for a claim's values once all of them expired; an object, which no verifier
emits where reference values are compared, so it matches nothing."""


class Entry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One reference value with an optional expiry and a note for the operator."""

    value: str | int
    expires: datetime | None = None
    note: Annotated[str, msgspec.Meta(max_length=MAX_NOTE)] = ""


Value = str | int | Entry
RefValues = dict[str, list[Value]]


def validate(raw: bytes) -> RefValues:
    """Decode and bound one family's reference values."""
    try:
        values = msgspec.json.decode(raw, type=RefValues)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise PolicyError("refvalues.invalid", str(exc)) from None
    if len(values) > MAX_CLAIMS:
        raise PolicyError("refvalues.too_many", f"{len(values)} claims")
    for claim, allowed in values.items():
        if len(allowed) > MAX_VALUES_PER_CLAIM:
            raise PolicyError("refvalues.too_many", f"{claim}: {len(allowed)} values")
        for item in allowed:
            if isinstance(item, Entry) and item.expires is not None and item.expires.tzinfo is None:
                raise PolicyError("refvalues.invalid", f"{claim}: expiry without a time zone")
    return values


def value_of(item: Value) -> str | int:
    return item.value if isinstance(item, Entry) else item


def expires_of(item: Value) -> datetime | None:
    return item.expires if isinstance(item, Entry) else None


def effective(values: RefValues, now: datetime) -> dict[str, list[Any]]:
    """What the policy compares with at ``now``: bare values, expired entries left out."""
    out: dict[str, list[Any]] = {}
    for claim, allowed in values.items():
        live = [value_of(v) for v in allowed if (e := expires_of(v)) is None or e > now]
        out[claim] = live if live or not allowed else [ALL_EXPIRED]
    return out


def next_expiry(values: RefValues, now: datetime) -> datetime | None:
    """The earliest expiry after ``now`` (when :func:`effective` next changes), if any."""
    pending = [
        e for allowed in values.values() for v in allowed if (e := expires_of(v)) and e > now
    ]
    return min(pending, default=None)


async def read_all(kv: KeyValue) -> dict[str, bytes]:
    """Every family's stored (signed) entry, unverified: the ledger judges them.

    A failed listing or read raises (``BusError``); it is never taken for "no reference
    values", which would let every measurement through.
    """
    result: dict[str, bytes] = {}
    for family in await kv.keys():
        entry = await kv.get(family)
        if entry is not None:
            result[family] = entry[0]
    return result


def encode(values: RefValues) -> bytes:
    return msgspec.json.encode(values)


async def store(kv: KeyValue, family: str, values: RefValues, *, operator: SigningKey) -> int:
    """Write ``family``'s values signed by ``operator``; return the new version."""
    raw = encode(values)
    validate(raw)
    return await documents.put_signed(
        kv, operator, bucket=subjects.BUCKET_REFVALUES, key=family, payload=raw
    )


async def modify(
    kv: KeyValue,
    family: str,
    change: Callable[[RefValues], RefValues],
    *,
    operator: SigningKey,
    trusted: TrustedKeys,
    history: Sequence[bytes] = (),
) -> tuple[int, RefValues]:
    """Apply ``change`` to ``family``'s stored values and store the result signed.

    What is stored must verify under ``trusted`` first: re-signing an entry nobody trusted
    would launder whatever a writer of the bucket put there. It must also be the newest
    signed version among ``history`` (the key's retained values): a writer who put back an
    older signed document (one still allowing a withdrawn measurement) must not have the
    operator's next change sign it anew. Compare-and-set on the revision read, so two
    operators changing one family at once both land (one retries).
    """
    newest = _newest_version(history, trusted, family)
    while True:
        found = await kv.get(family)
        current: RefValues = {}
        if found is not None:
            document = documents.open_signed(
                found[0], trusted, bucket=subjects.BUCKET_REFVALUES, key=family, kind="refvalues"
            )
            if document.version < newest:
                raise PolicyError(
                    "refvalues.rollback",
                    f"the stored {family} values (version {document.version}) are older than "
                    f"version {newest} in the bucket's history: sign the intended values "
                    "with `refvalues set`",
                )
            current = validate(document.payload)
        values = change({claim: list(allowed) for claim, allowed in current.items()})
        raw = encode(values)
        validate(raw)
        issued_at = events.utcnow()
        version = documents.next_version(
            found[0] if found else None,
            operator,
            issued_at,
            bucket=subjects.BUCKET_REFVALUES,
            key=family,
        )
        sealed = documents.seal(
            operator,
            bucket=subjects.BUCKET_REFVALUES,
            key=family,
            payload=raw,
            version=version,
            issued_at=issued_at,
        )
        try:
            if found is None:
                await kv.create(family, sealed)
            else:
                await kv.update(family, sealed, found[1])
        except WriteConflictError:
            continue
        return version, values


def _newest_version(history: Sequence[bytes], trusted: TrustedKeys, family: str) -> int:
    """The highest version among the retained values that verify (0 if none does)."""
    newest = 0
    for raw in history:
        try:
            document = documents.open_signed(
                raw, trusted, bucket=subjects.BUCKET_REFVALUES, key=family, kind="refvalues"
            )
        except PolicyError:
            continue
        newest = max(newest, document.version)
    return newest


async def key_history(bucket: Any, family: str) -> list[bytes]:
    """The values the bucket retains for ``family`` (deletions left out). A failure to read
    them raises: the rollback check must not pass for want of history."""
    try:
        entries = await bucket.history(family)
    except nats.js.errors.NoKeysError:
        return []
    except (nats.errors.Error, TimeoutError) as exc:
        raise outage.mapped(exc, unavailable="kv.unavailable", refused="kv.api_error") from None
    return [entry.value for entry in entries if entry.value]
