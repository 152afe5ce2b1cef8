"""What the broker and an operator's command agree on to move a secret value between them.

The operator may not write sealed state (it could then rewrite the audit log or resurrect a
revoked node), so a new secret value goes to the broker, which seals and audits it. On the
way it is HPKE-wrapped to the broker's *intake key*: an X25519 key derived from the data key,
so every broker replica holds the same one and nothing new has to be stored or rotated. The
broker vouches for the public half with its signing key; the command checks that signature
before it wraps anything, so a party that merely answered on the operator subject cannot
collect the value.

The operator's own signature covers the action, the resource, the digest of the wrapped
value, the request id and the store generation the change is meant for.
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.broker.sealing import AeadKey
from services.mesh.errors import ReleaseError

INTAKE_LABEL = b"attestmesh/operator-intake/v1"
VALUE_LABEL = b"attestmesh/operator-secret/v1"
OPERATOR_SIGNER = "operator"
BROKER_SIGNER = "broker"
INTAKE_SUBJECT = "intake"
TOKEN_LIFETIME_S = 120
"""How long an operator's signed request stays usable: long enough for a slow link, short
enough that a captured token is worthless soon (the generation check already stops replays
of applied requests)."""
MAX_CLOCK_SKEW_S = 60


def intake_key(data_key: AeadKey) -> X25519PrivateKey:
    """The broker's intake key, derived (HKDF-SHA256) from the data key it protects."""
    material = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=INTAKE_LABEL).derive(
        data_key.export()
    )
    return X25519PrivateKey.from_private_bytes(material)


def value_info(resource: str) -> bytes:
    """The HPKE ``info`` for a value meant for ``resource`` (length-prefixed, injective)."""
    raw = resource.encode()
    if not 0 < len(raw) <= 253:
        raise ReleaseError("broker.release_context_invalid", "resource out of bounds")
    return VALUE_LABEL + struct.pack(">H", len(raw)) + raw


def value_digest(enc: bytes, ciphertext: bytes) -> str:
    """What the operator signs of the wrapped value (both parts, length-prefixed)."""
    return hashlib.sha256(
        struct.pack(">I", len(enc)) + enc + struct.pack(">I", len(ciphertext)) + ciphertext
    ).hexdigest()
