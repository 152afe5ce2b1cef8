"""Reference values: per family, the claim values a node must present to get secrets.

Stored in the ``refvalues`` KV bucket under the family name as a JSON object mapping a claim
name to its allowed values (``{"measurement": ["ab12..."], "host_data": [...]}``), provisioned
with ``attestmesh refvalues set`` and handed to Rego as ``data.refvalues``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from services.mesh.errors import PolicyError
from services.mesh.kv import KeyValue

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


async def load_all(kv: KeyValue) -> dict[str, Any]:
    """Every family's reference values, as Rego's ``data.refvalues``."""
    result: dict[str, Any] = {}
    for family in await kv.keys():
        entry = await kv.get(family)
        if entry is not None:
            result[family] = validate(entry[0])
    return result


async def store(kv: KeyValue, family: str, values: RefValues) -> None:
    raw = msgspec.json.encode(values)
    validate(raw)
    entry = await kv.get(family)
    if entry is None:
        await kv.create(family, raw)
    else:
        await kv.update(family, raw, entry[1])
