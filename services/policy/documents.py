"""Operator-signed documents: how the release policy and reference values sit in KV.

Anyone who can write to the ``policies`` or ``refvalues`` bucket could otherwise rewrite what
the mesh releases secrets for, so each entry is an envelope whose signature, by an operator
key the policy service was given, covers the exact body bytes. The body names the bucket and
key it was written for (a signed document cannot be replayed under another key) and carries a
version that only grows (a writer cannot put back an older signed document unnoticed: see
:mod:`services.policy.ledger`). Signatures are over bytes, not re-encoded claims, so what is
verified is byte for byte what is used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from services.mesh import events
from services.mesh.errors import PolicyError, VerificationError
from services.mesh.keys import SigningKey, TrustedKeys
from services.mesh.kv import KeyValue, WriteConflictError

FORMAT: Literal["attestmesh.signed-document.v1"] = "attestmesh.signed-document.v1"
DOMAIN = b"attestmesh operator document v1\x00"
"""Prefixed to the body before signing, so these signatures mean nothing anywhere else."""
OPERATOR = "operator"
MAX_DOCUMENT_BYTES = 1024 * 1024
MAX_VERSION = 2**53
MAX_CLOCK_AHEAD_US = 24 * 3600 * 1_000_000

_SIGNER_REASONS = {
    "token.unknown_signer": "unknown_signer",
    "token.wrong_signer": "wrong_signer",
    "token.invalid": "bad_signature",
}


def is_operator(name: str) -> bool:
    """Operator keys are named ``operator`` or ``operator-<label>`` (two during a rotation)."""
    return name == OPERATOR or name.startswith(OPERATOR + "-")


class _Body(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    bucket: Annotated[str, msgspec.Meta(max_length=64)]
    key: Annotated[str, msgspec.Meta(max_length=512)]
    version: Annotated[int, msgspec.Meta(ge=1, le=MAX_VERSION)]
    issued_at: datetime
    payload: bytes


class _Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: Literal["attestmesh.signed-document.v1"]
    kid: Annotated[str, msgspec.Meta(max_length=64)]
    body: bytes
    signature: Annotated[bytes, msgspec.Meta(max_length=256)]


@dataclass(frozen=True)
class Document:
    """A verified document: what it says, where it belongs, who signed which version."""

    bucket: str
    key: str
    version: int
    issued_at: datetime
    payload: bytes
    signer: str
    digest: str


def seal(
    signer: SigningKey,
    *,
    bucket: str,
    key: str,
    payload: bytes,
    version: int,
    issued_at: datetime,
) -> bytes:
    """The KV value for ``payload`` under ``bucket``/``key``, signed by ``signer``."""
    body = msgspec.json.encode(
        _Body(bucket=bucket, key=key, version=version, issued_at=issued_at, payload=payload)
    )
    envelope = _Envelope(
        format=FORMAT, kid=signer.kid, body=body, signature=signer.sign_bytes(DOMAIN + body)
    )
    raw = msgspec.json.encode(envelope)
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise PolicyError("document.too_large", f"{len(raw)} bytes")
    return raw


def open_signed(raw: bytes, trusted: TrustedKeys, *, bucket: str, key: str, kind: str) -> Document:
    """Verify ``raw`` as read from ``bucket``/``key``; refusals are ``<kind>.<why>``."""
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise PolicyError(f"{kind}.too_large", f"{len(raw)} bytes")
    try:
        envelope = msgspec.json.decode(raw, type=_Envelope)
    except (msgspec.ValidationError, msgspec.DecodeError):
        raise PolicyError(f"{kind}.unsigned", "not an operator-signed document") from None
    try:
        signer = trusted.verify_bytes(
            envelope.kid, DOMAIN + envelope.body, envelope.signature, accept=is_operator
        )
    except VerificationError as exc:
        why = _SIGNER_REASONS.get(exc.reason, "bad_signature")
        raise PolicyError(f"{kind}.{why}", exc.detail) from None
    try:
        body = msgspec.json.decode(envelope.body, type=_Body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise PolicyError(f"{kind}.malformed", str(exc)[:200]) from None
    if body.bucket != bucket or body.key != key:
        raise PolicyError(
            f"{kind}.wrong_key", f"signed for {body.bucket}/{body.key}, found at {bucket}/{key}"
        )
    return Document(
        bucket=bucket,
        key=key,
        version=body.version,
        issued_at=body.issued_at,
        payload=body.payload,
        signer=signer,
        digest=hashlib.sha256(envelope.body).hexdigest(),
    )


def next_version(
    current: bytes | None, signer: SigningKey, issued_at: datetime, *, bucket: str, key: str
) -> int:
    """The version for a new document: the issue time in microseconds, unless the document
    in KV claims a higher one (another operator's clock running ahead, or this one set
    back), in which case one more than that.

    Versions come from the clock rather than from counting what is in KV, because what is
    in KV may be an older signed document a writer put back: counting from it would give
    the operator's next document a version readers have already seen, and they would
    refuse it as a rollback. A claim is followed unverified (the writer may not hold the
    other operators' keys), but only up to :data:`MAX_CLOCK_AHEAD_US` ahead of the clock
    unless this signer made it, so junk with a huge version cannot exhaust the range.
    """
    now = int(issued_at.timestamp() * 1_000_000)
    previous = 0
    if current is not None:
        claimed = _claimed(current)
        if claimed is not None:
            version, kid = claimed
            if kid == signer.kid or version <= now + MAX_CLOCK_AHEAD_US:
                previous = version
    return max(previous + 1, now)


def _claimed(raw: bytes) -> tuple[int, str] | None:
    """The version and key id a stored document claims, unverified."""
    try:
        envelope = msgspec.json.decode(raw, type=_Envelope)
        return msgspec.json.decode(envelope.body, type=_Body).version, envelope.kid
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


async def put_signed(
    kv: KeyValue,
    signer: SigningKey,
    *,
    bucket: str,
    key: str,
    payload: bytes,
) -> int:
    """Write ``payload`` signed, with a version above any this signer wrote; return it.

    Compare-and-set, so two operators writing at once cannot both take the same version.
    """
    while True:
        current = await kv.get(key)
        issued_at = events.utcnow()
        version = next_version(
            current[0] if current else None, signer, issued_at, bucket=bucket, key=key
        )
        if version > MAX_VERSION:
            raise PolicyError("document.version_exhausted", f"{bucket}/{key}")
        raw = seal(
            signer,
            bucket=bucket,
            key=key,
            payload=payload,
            version=version,
            issued_at=issued_at,
        )
        try:
            if current is None:
                await kv.create(key, raw)
            else:
                await kv.update(key, raw, current[1])
            return version
        except WriteConflictError:
            continue
