"""The Rego release policy as stored in KV: one operator-signed document under ``release``."""

from __future__ import annotations

from services.mesh import subjects
from services.mesh.errors import PolicyError
from services.mesh.keys import SigningKey
from services.mesh.kv import KeyValue
from services.policy import documents

POLICY_KEY = "release"
MAX_POLICY_BYTES = 512 * 1024


def validate(raw: bytes) -> str:
    """The policy source, if it is bounded UTF-8 text (whether it compiles is checked later)."""
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError("policy.too_large", f"{len(raw)} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("policy.invalid", "the policy is not UTF-8 text") from None


async def store(kv: KeyValue, source: str, *, operator: SigningKey) -> int:
    """Write ``source`` as the release policy signed by ``operator``; return its version."""
    raw = source.encode()
    validate(raw)
    return await documents.put_signed(
        kv, operator, bucket=subjects.BUCKET_POLICIES, key=POLICY_KEY, payload=raw
    )
