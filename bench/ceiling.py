"""The crypto ceiling: raw signature verifications per second on one core, measured in the
same run as the figures compared against it, so a ratio never mixes two machines' numbers."""

from __future__ import annotations

import time
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa


def rate(operation: Callable[[], object], seconds: float = 1.0) -> float:
    """Operations per second of ``operation``, run back to back for about ``seconds``."""
    operation()
    count = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(16):
            operation()
        count += 16
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - started)


def ecdsa_verify_rate(
    curve: ec.EllipticCurve, digest: hashes.HashAlgorithm, seconds: float
) -> float:
    key = ec.generate_private_key(curve)
    message = b"\x5a" * 0x2A0
    signature = key.sign(message, ec.ECDSA(digest))
    public = key.public_key()
    return rate(lambda: public.verify(signature, message, ec.ECDSA(digest)), seconds)


def p384(seconds: float = 1.0) -> float:
    return ecdsa_verify_rate(ec.SECP384R1(), hashes.SHA384(), seconds)


def p256(seconds: float = 1.0) -> float:
    return ecdsa_verify_rate(ec.SECP256R1(), hashes.SHA256(), seconds)


def rsa2048(seconds: float = 1.0) -> float:
    """RSASSA-PKCS1-v1_5 with SHA-256, the usual TPM attestation-key signature."""
    key = rsa.generate_private_key(65537, 2048)
    message = b"\x5a" * 0x91
    signature = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    public = key.public_key()
    return rate(
        lambda: public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256()), seconds
    )


MEASURES = {
    "ecdsa_p384_verify": p384,
    "ecdsa_p256_verify": p256,
    "rsa2048_pkcs1_verify": rsa2048,
}
