"""HPKE wrapping of a released secret to the attested node's key (RFC 9180, base mode).

The node proves in its evidence that an ephemeral X25519 key lives inside its TEE
(REPORT_DATA binds the key's hash); the broker encrypts the secret to exactly that key, so
only the attested TEE can open it, even though the reply crosses the bus.

Suite: DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM. The HPKE ``info`` is bound
into the key schedule: build it with :func:`release_info` so a wrapped secret opens only for
the node and resource it was released for and cannot be replayed to another. ``aad`` binds
the surrounding request (decision id, request id) to the ciphertext.

Every input is bounded and every pyhpke or cryptography failure is mapped to
:class:`~services.mesh.errors.ReleaseError`; messages never carry key or secret bytes.
"""

from __future__ import annotations

import struct

import msgspec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKey, PyHPKEError

from services.mesh.errors import ReleaseError

PUBLIC_KEY_SIZE = 32
ENC_SIZE = 32
TAG_SIZE = 16
MAX_SECRET_SIZE = 64 * 1024
MAX_INFO_SIZE = 1024
MAX_AAD_SIZE = 1024
MAX_ID_SIZE = 253
RELEASE_LABEL = b"attestmesh/secret-release/v1"

_SUITE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES256_GCM)


class Wrapped(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An HPKE ciphertext: the encapsulated key and the AEAD output (nothing secret)."""

    enc: bytes
    ciphertext: bytes


def release_info(node_id: str, resource: str) -> bytes:
    """The HPKE ``info`` for releasing ``resource`` to ``node_id``.

    Length-prefixed fields make the encoding injective, so no (node, resource) pair can be
    confused with another by shifting a separator.
    """
    node = node_id.encode()
    res = resource.encode()
    if not 0 < len(node) <= MAX_ID_SIZE or not 0 < len(res) <= MAX_ID_SIZE:
        raise ReleaseError("broker.release_context_invalid", "node id or resource out of bounds")
    return b"".join(
        (RELEASE_LABEL, struct.pack(">H", len(node)), node, struct.pack(">H", len(res)), res)
    )


def _check_context(info: bytes, aad: bytes) -> None:
    if not info or len(info) > MAX_INFO_SIZE or len(aad) > MAX_AAD_SIZE:
        raise ReleaseError(
            "broker.release_context_invalid",
            f"info must be 1..{MAX_INFO_SIZE} bytes and aad at most {MAX_AAD_SIZE}",
        )


def wrap(secret: bytes, recipient_public_key_raw: bytes, *, info: bytes, aad: bytes) -> Wrapped:
    """Encrypt ``secret`` to the raw X25519 public key of the attested TEE."""
    _check_context(info, aad)
    if not 0 < len(secret) <= MAX_SECRET_SIZE:
        raise ReleaseError("broker.secret_too_large", f"secret must be 1..{MAX_SECRET_SIZE} bytes")
    if len(recipient_public_key_raw) != PUBLIC_KEY_SIZE:
        raise ReleaseError(
            "broker.public_key_invalid",
            f"X25519 public key must be {PUBLIC_KEY_SIZE} bytes, "
            f"got {len(recipient_public_key_raw)}",
        )
    try:
        public = X25519PublicKey.from_public_bytes(recipient_public_key_raw)
        enc, context = _SUITE.create_sender_context(
            KEMKey.from_pyca_cryptography_key(public), info=info
        )
    except (ValueError, PyHPKEError) as exc:
        # A low-order point makes the X25519 shared secret all-zero, which cryptography
        # refuses; nothing safe can be derived from such a key.
        raise ReleaseError("broker.public_key_invalid", "X25519 key agreement failed") from exc
    try:
        ciphertext = context.seal(secret, aad)
    except (ValueError, PyHPKEError) as exc:
        raise ReleaseError("broker.wrap_failed", "HPKE seal failed") from exc
    return Wrapped(enc=enc, ciphertext=ciphertext)


def unwrap(wrapped: Wrapped, private_key: X25519PrivateKey, *, info: bytes, aad: bytes) -> bytes:
    """Open a :class:`Wrapped` secret with the TEE's private key (the node side).

    Any mismatch of key, ``info`` or ``aad``, or any modified byte, fails as
    ``broker.unwrap_failed``; callers cannot tell which, by design.
    """
    _check_context(info, aad)
    if len(wrapped.enc) != ENC_SIZE:
        raise ReleaseError("broker.unwrap_failed", f"enc must be {ENC_SIZE} bytes")
    if not TAG_SIZE < len(wrapped.ciphertext) <= MAX_SECRET_SIZE + TAG_SIZE:
        raise ReleaseError("broker.unwrap_failed", "ciphertext length out of bounds")
    try:
        context = _SUITE.create_recipient_context(
            wrapped.enc, KEMKey.from_pyca_cryptography_key(private_key), info=info
        )
        return context.open(wrapped.ciphertext, aad)
    except (ValueError, PyHPKEError) as exc:
        raise ReleaseError("broker.unwrap_failed", "HPKE open failed") from exc
