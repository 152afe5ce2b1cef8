"""Reference values: per family, the claim values a node must present to get secrets.

Stored in the ``refvalues`` KV bucket under the family name as a JSON object mapping a claim
name to its allowed values (``{"measurement": ["ab12..."], "host_data": [...]}``), wrapped in an
operator-signed document (:mod:`services.policy.documents`), provisioned with ``attestmesh
refvalues FAMILY FILE`` and handed to Rego as ``data.refvalues``.
"""

from __future__ import annotations

import msgspec

from services.mesh import subjects
from services.mesh.errors import PolicyError
from services.mesh.keys import SigningKey
from services.mesh.kv import KeyValue
from services.policy import documents

MAX_VALUES_PER_CLAIM = 10_000

RefValues = dict[str, list[str | int]]


def validate(raw: bytes) -> RefValues:
    """Decode and bound one family's reference values."""
    try:
        values = msgspec.json.decode(raw, type=RefValues)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise PolicyError("refvalues.invalid", str(exc)) from None
    for claim, allowed in values.items():
        if len(allowed) > MAX_VALUES_PER_CLAIM:
            raise PolicyError("refvalues.too_many", f"{claim}: {len(allowed)} values")
    return values


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


async def store(kv: KeyValue, family: str, values: RefValues, *, operator: SigningKey) -> int:
    """Write ``family``'s values signed by ``operator``; return the new version."""
    raw = msgspec.json.encode(values)
    validate(raw)
    return await documents.put_signed(
        kv, operator, bucket=subjects.BUCKET_REFVALUES, key=family, payload=raw
    )
