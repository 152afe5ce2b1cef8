"""Shamir recovery of the data key: n-of-m shares over GF(2^8), each HPKE-sealed to an officer.

If the sealing key is lost (a node gone, a TEE-derived key unreproducible), a quorum of
recovery officers can rebuild the data key and re-wrap it under a new sealing key
(:func:`services.broker.store.rewrap_keyring`). Arithmetic is in GF(2^8) with the AES
polynomial x^8 + x^4 + x^3 + x + 1, done branch-free so no table is indexed by secret bytes.
"""

from __future__ import annotations

import hmac
import secrets
import struct
from collections.abc import Sequence

import msgspec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from services.broker import release
from services.broker.sealing import KEY_ID_SIZE, KEY_SIZE, AeadKey
from services.mesh.errors import ReleaseError, SealingError

_SHARE_LABEL = b"attestmesh/recovery-share/v1"


def _gf_mul(a: int, b: int) -> int:
    """Branch-free shift-and-add multiply, avoiding secret-indexed log/exp tables."""
    product = 0
    for _ in range(8):
        product ^= -(b & 1) & a
        a = ((a << 1) ^ (-(a >> 7) & 0x11B)) & 0xFF
        b >>= 1
    return product


def _gf_inv(a: int) -> int:
    """a^254 = a^-1 in GF(2^8), by a fixed square-and-multiply chain."""
    result, power = 1, a
    for bit in range(8):
        if (254 >> bit) & 1:
            result = _gf_mul(result, power)
        power = _gf_mul(power, power)
    return result


class Share:
    """One plaintext Shamir share (x, y); y is secret and never reaches a repr."""

    __slots__ = ("x", "y")

    def __init__(self, x: int, y: bytes) -> None:
        if not 1 <= x <= 255 or len(y) != KEY_SIZE:
            raise SealingError("broker.recovery_share_invalid", "malformed share")
        self.x = x
        self.y = y

    def __repr__(self) -> str:
        return f"Share(x={self.x})"


class RecoveryShare(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A share HPKE-encrypted to one officer; safe to store or send anywhere."""

    key_id: bytes
    threshold: int
    x: int
    enc: bytes
    ciphertext: bytes


def split_key(key: AeadKey, threshold: int, count: int) -> list[Share]:
    """Split ``key`` into ``count`` shares of which any ``threshold`` recover it."""
    if not 1 <= threshold <= count <= 255:
        raise SealingError("broker.recovery_params_invalid", "need 1 <= threshold <= count <= 255")
    secret = key.export()
    coefficients = [secrets.token_bytes(KEY_SIZE) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, count + 1):
        y = bytearray(KEY_SIZE)
        for i in range(KEY_SIZE):
            acc = 0
            for coefficient in reversed(coefficients):
                acc = _gf_mul(acc, x) ^ coefficient[i]
            y[i] = _gf_mul(acc, x) ^ secret[i]
        shares.append(Share(x, bytes(y)))
    return shares


def combine_shares(shares: Sequence[Share], expected_key_id: bytes) -> AeadKey:
    """Interpolate the key at x = 0 and check it against ``expected_key_id``.

    Too few or foreign shares interpolate to some other key; the id check turns that into
    ``broker.recovery_failed`` instead of a silently wrong key.
    """
    xs = [share.x for share in shares]
    if not shares or len(set(xs)) != len(xs):
        raise SealingError("broker.recovery_failed", "need distinct shares")
    secret = bytearray(KEY_SIZE)
    for share in shares:
        weight = 1
        for other in xs:
            if other != share.x:
                weight = _gf_mul(weight, _gf_mul(other, _gf_inv(other ^ share.x)))
        for i in range(KEY_SIZE):
            secret[i] ^= _gf_mul(weight, share.y[i])
    key = AeadKey(bytes(secret))
    if not hmac.compare_digest(key.key_id, expected_key_id):
        raise SealingError("broker.recovery_failed", "shares do not recover the expected key")
    return key


def _share_context(key_id: bytes, threshold: int, x: int) -> tuple[bytes, bytes]:
    info = _SHARE_LABEL + key_id + struct.pack(">BB", threshold, x)
    return info, key_id


def make_recovery_shares(
    key: AeadKey, officer_public_keys: Sequence[bytes], threshold: int
) -> list[RecoveryShare]:
    """Split ``key`` and encrypt one share to each officer's raw X25519 public key.

    The HPKE ``info`` binds the key id, threshold and share index, so a share cannot be
    relabelled or presented as belonging to another key.
    """
    shares = split_key(key, threshold, len(officer_public_keys))
    out = []
    for share, public_key in zip(shares, officer_public_keys, strict=True):
        info, aad = _share_context(key.key_id, threshold, share.x)
        try:
            wrapped = release.wrap(share.y, public_key, info=info, aad=aad)
        except ReleaseError as exc:
            raise SealingError("broker.recovery_params_invalid", exc.reason) from exc
        out.append(
            RecoveryShare(
                key_id=key.key_id,
                threshold=threshold,
                x=share.x,
                enc=wrapped.enc,
                ciphertext=wrapped.ciphertext,
            )
        )
    return out


def decrypt_share(share: RecoveryShare, officer_private_key: X25519PrivateKey) -> Share:
    """An officer opens their share with their private key."""
    if len(share.key_id) != KEY_ID_SIZE or not 1 <= share.threshold <= 255:
        raise SealingError("broker.recovery_share_invalid", "malformed share header")
    if not 1 <= share.x <= 255:
        raise SealingError("broker.recovery_share_invalid", "malformed share header")
    info, aad = _share_context(share.key_id, share.threshold, share.x)
    wrapped = release.Wrapped(enc=share.enc, ciphertext=share.ciphertext)
    try:
        y = release.unwrap(wrapped, officer_private_key, info=info, aad=aad)
    except ReleaseError as exc:
        raise SealingError("broker.recovery_share_invalid", "share does not open") from exc
    return Share(share.x, y)
