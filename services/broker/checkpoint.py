"""Signed audit checkpoints: the anchor that lets old audit records be pruned.

A checkpoint says "record ``seq`` of the audit chain is the sealed blob whose SHA-256 is
``head``; ``count`` records existed up to it; this was signed at ``time``", as an ES256 token
from the broker's own signing key. Because the chain links every record to the hash of its
predecessor, a valid checkpoint vouches for everything before ``seq`` without those records
being kept: verification starts at the checkpoint's head and follows the chain forward.

The token is stored in the clear under :data:`CHECKPOINT_KEY`: it holds only a sequence
number, a hash and a time, and its signature (not secrecy) is what protects it. Only a newer
checkpoint (higher ``seq``) may replace the stored one, by compare-and-set, so broker
replicas racing to checkpoint cannot move the anchor backwards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from services.mesh.errors import SealingError, VerificationError
from services.mesh.keys import SigningKey, TrustedKeys
from services.mesh.kv import KeyValue, WriteConflictError

CHECKPOINT_KEY = "audit-checkpoint"
CHECKPOINT_TYPE = "attestmesh.audit_checkpoint"
BROKER_SIGNER = "broker"
MAX_CAS_RETRIES = 32
# Checkpoints do not expire; the token format requires an ``exp``, so it is set far ahead.
_VALIDITY_S = 100 * 365 * 24 * 3600
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Checkpoint:
    """The signed claim that record ``seq`` is the sealed blob hashing to ``head``."""

    seq: int
    head: bytes
    count: int
    time: datetime


def sign(signer: SigningKey, checkpoint: Checkpoint) -> str:
    """The checkpoint as a token signed by the broker key."""
    issued = int(checkpoint.time.timestamp())
    return signer.sign(
        {
            "typ": CHECKPOINT_TYPE,
            "seq": checkpoint.seq,
            "head": checkpoint.head.hex(),
            "count": checkpoint.count,
            "iat": issued,
            "exp": issued + _VALIDITY_S,
        }
    )


def read(token: str, trusted: TrustedKeys) -> Checkpoint:
    """Verify ``token`` against the broker's trusted public key and return its claims."""
    try:
        claims = trusted.verify(token, accept=lambda name: name == BROKER_SIGNER)
    except VerificationError as exc:
        raise SealingError("broker.checkpoint_invalid", exc.reason) from None
    seq, count, head, issued = (
        claims.get("seq"),
        claims.get("count"),
        claims.get("head"),
        claims.get("iat"),
    )
    if (
        claims.get("typ") != CHECKPOINT_TYPE
        or not isinstance(seq, int)
        or not isinstance(count, int)
        or not isinstance(issued, int)
        or not isinstance(head, str)
        or _HEX64.fullmatch(head) is None
        or seq < 0
        or count != seq + 1
    ):
        raise SealingError("broker.checkpoint_invalid", "claims do not describe a checkpoint")
    return Checkpoint(
        seq=seq, head=bytes.fromhex(head), count=count, time=datetime.fromtimestamp(issued, UTC)
    )


async def load(kv: KeyValue, trusted: TrustedKeys | None) -> Checkpoint | None:
    """The stored checkpoint, verified; ``None`` only if there is none.

    A checkpoint that is present but cannot be verified (no trusted broker key, bad
    signature) is an error, never read as "no checkpoint": that would let a pruned log pass.
    """
    found = await kv.get(CHECKPOINT_KEY)
    if found is None:
        return None
    if trusted is None:
        raise SealingError("broker.checkpoint_untrusted", "no trusted broker key to check it")
    try:
        token = found[0].decode("ascii")
    except UnicodeDecodeError:
        raise SealingError("broker.checkpoint_invalid", "not a token") from None
    return read(token, trusted)


async def store(kv: KeyValue, token: str, checkpoint: Checkpoint, trusted: TrustedKeys) -> None:
    """Store ``token`` unless an equal or newer checkpoint is already there."""
    for _ in range(MAX_CAS_RETRIES):
        found = await kv.get(CHECKPOINT_KEY)
        try:
            if found is None:
                await kv.create(CHECKPOINT_KEY, token.encode("ascii"))
                return
            current = read(found[0].decode("ascii", errors="replace"), trusted)
            if current.seq >= checkpoint.seq:
                return
            await kv.update(CHECKPOINT_KEY, token.encode("ascii"), found[1])
            return
        except WriteConflictError:
            continue
    raise SealingError("broker.write_conflict", "checkpoint store kept conflicting")
