"""The Rego policies as stored in KV: operator-signed documents in the ``policies`` bucket.

Two keys, one kind each (:data:`~services.policy.engine.KINDS`): ``release``, the appraisal
policy the policy service runs over every verdict, and ``resources``, the resource policy the
broker runs over every secret request. Both are stored, bounded and signed the same way.
"""

from __future__ import annotations

from services.mesh import subjects
from services.mesh.errors import PolicyError
from services.mesh.keys import SigningKey
from services.mesh.kv import KeyValue
from services.policy import documents
from services.policy.engine import RELEASE, RESOURCE, PolicyKind

POLICY_KEY = RELEASE.key
RESOURCE_KEY = RESOURCE.key
MAX_POLICY_BYTES = 512 * 1024


def validate(raw: bytes, kind: PolicyKind = RELEASE) -> str:
    """The policy source, if it is bounded UTF-8 text (whether it compiles is checked later)."""
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(f"{kind.reason}.too_large", f"{len(raw)} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"{kind.reason}.invalid", "the policy is not UTF-8 text") from None


def validate_resource(raw: bytes) -> str:
    """:func:`validate` for the resource policy (the broker's ledger takes a one-argument check)."""
    return validate(raw, RESOURCE)


async def store(
    kv: KeyValue, source: str, *, operator: SigningKey, kind: PolicyKind = RELEASE
) -> int:
    """Write ``source`` as the ``kind`` policy signed by ``operator``; return its version."""
    raw = source.encode()
    validate(raw, kind)
    return await documents.put_signed(
        kv, operator, bucket=subjects.BUCKET_POLICIES, key=kind.key, payload=raw
    )
