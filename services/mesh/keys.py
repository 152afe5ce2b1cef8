"""Service identities for signed messages: each verifier and the policy service sign with an
ES256 key of their own, and consumers accept only tokens from keys they were given.

Why not trust the bus alone: NATS permissions stop a compromised collector from publishing a
verdict, but a signature also survives replay into logs, audits and other meshes, and lets
the broker check a decision without trusting every hop in between.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.mesh.errors import ConfigError, VerificationError

ALGORITHM = "ES256"
MAX_TOKEN_BYTES = 256 * 1024


def _kid(public_key: ec.EllipticCurvePublicKey) -> str:
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.urlsafe_b64encode(hashlib.sha256(spki).digest()[:16]).rstrip(b"=").decode()


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (never briefly world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class SigningKey:
    """A service's ES256 private key; ``name`` is the identity consumers see (``iss``)."""

    def __init__(self, name: str, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ConfigError("keys.wrong_curve", f"{name}: ES256 needs a P-256 key")
        self.name = name
        self._private = private_key
        self.kid = _kid(private_key.public_key())

    def __repr__(self) -> str:
        return f"SigningKey(name={self.name!r}, kid={self.kid!r})"

    @classmethod
    def generate(cls, name: str) -> SigningKey:
        return cls(name, ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def load(cls, name: str, path: Path) -> SigningKey:
        """Load an existing private key file; never creates one (an operator key that appears
        out of nowhere would be trusted by nobody, so a missing file is an error)."""
        if not path.is_file():
            raise ConfigError("keys.missing", f"{path} does not exist")
        if path.stat().st_mode & 0o077:
            raise ConfigError("keys.permissions", f"{path} must not be group/world readable")
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError:
            raise ConfigError("keys.unreadable", f"{path} is not a PEM private key") from None
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ConfigError("keys.wrong_type", f"{path} is not an EC private key")
        return cls(name, loaded)

    @classmethod
    def load_or_create(cls, name: str, keys_dir: Path) -> SigningKey:
        """Load ``keys_dir/<name>.key``, creating it (0600) on first use."""
        path = keys_dir / f"{name}.key"
        if path.exists():
            return cls.load(name, path)
        key = cls.generate(name)
        pem = key._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private(path, pem)
        return key

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._private.public_key()

    def public_pem(self) -> bytes:
        return self._private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def publish_to(self, trusted_dir: Path) -> None:
        """Make this key's public half known to consumers reading ``trusted_dir``."""
        trusted_dir.mkdir(parents=True, exist_ok=True)
        (trusted_dir / f"{self.name}.pem").write_bytes(self.public_pem())

    def sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(
            {**claims, "iss": self.name},
            self._private,
            algorithm=ALGORITHM,
            headers={"kid": self.kid},
        )

    def sign_bytes(self, data: bytes) -> bytes:
        """ECDSA P-256/SHA-256 (DER) over exactly ``data``: for documents that are stored
        as bytes and must be verified as those same bytes, not re-serialised claims."""
        return self._private.sign(data, ec.ECDSA(hashes.SHA256()))


@dataclass(frozen=True)
class _Trusted:
    name: str
    key: ec.EllipticCurvePublicKey


class TrustedKeys:
    """The public keys a consumer accepts, by key id; tokens from anyone else are rejected."""

    def __init__(self, keys: Mapping[str, ec.EllipticCurvePublicKey]) -> None:
        self._by_kid = {_kid(key): _Trusted(name, key) for name, key in keys.items()}

    @classmethod
    def from_pem(cls, name: str, pem: bytes) -> TrustedKeys:
        """Trust exactly one public key (e.g. the policy's, handed to a collector)."""
        try:
            loaded = serialization.load_pem_public_key(pem)
        except ValueError:
            raise ConfigError("keys.unreadable", f"{name}: not a PEM public key") from None
        if not isinstance(loaded, ec.EllipticCurvePublicKey):
            raise ConfigError("keys.wrong_type", f"{name}: not an EC public key")
        return cls({name: loaded})

    @classmethod
    def load(cls, trusted_dir: Path) -> TrustedKeys:
        keys: dict[str, ec.EllipticCurvePublicKey] = {}
        if trusted_dir.is_dir():
            for path in sorted(trusted_dir.glob("*.pem")):
                loaded = serialization.load_pem_public_key(path.read_bytes())
                if isinstance(loaded, ec.EllipticCurvePublicKey):
                    keys[path.stem] = loaded
        return cls(keys)

    def including(self, name: str, key: ec.EllipticCurvePublicKey) -> TrustedKeys:
        """These keys plus ``key`` as ``name`` (a service trusting its own signatures)."""
        merged = TrustedKeys({})
        merged._by_kid = {**self._by_kid, _kid(key): _Trusted(name, key)}
        return merged

    def names(self) -> list[str]:
        return sorted(t.name for t in self._by_kid.values())

    def verify_bytes(
        self, kid: str, data: bytes, signature: bytes, *, accept: Callable[[str], bool]
    ) -> str:
        """Check a :meth:`SigningKey.sign_bytes` signature by the key ``kid``; return the
        signer's name. ``accept`` restricts which signer names may sign this kind of data."""
        trusted = self._by_kid.get(kid)
        if trusted is None:
            raise VerificationError("token.unknown_signer", f"no trusted key with kid {kid!r}")
        if not accept(trusted.name):
            raise VerificationError("token.wrong_signer", f"{trusted.name} may not sign this")
        try:
            trusted.key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise VerificationError("token.invalid", "the signature does not verify") from None
        return trusted.name

    def verify(
        self,
        token: str,
        *,
        accept: Callable[[str], bool],
        now: datetime | None = None,
    ) -> dict[str, Any]:
        """Check ``token``'s signature, issuer and expiry; return its claims.

        ``accept`` decides which signer names may issue this kind of token (a verdict only
        from ``verifier-*``, a decision only from ``policy``). Expiry is checked against the
        injected ``now`` rather than PyJWT's own clock.
        """
        if len(token) > MAX_TOKEN_BYTES:
            raise VerificationError("token.too_large", f"{len(token)} bytes")
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise VerificationError("token.malformed", str(exc)) from None
        trusted = self._by_kid.get(kid) if isinstance(kid, str) else None
        if trusted is None:
            raise VerificationError("token.unknown_signer", f"no trusted key with kid {kid!r}")
        if not accept(trusted.name):
            raise VerificationError("token.wrong_signer", f"{trusted.name} may not sign this")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                trusted.key,
                algorithms=[ALGORITHM],
                options={"verify_exp": False, "verify_iat": False, "require": ["exp", "iat"]},
            )
        except jwt.PyJWTError as exc:
            raise VerificationError("token.invalid", str(exc)) from None
        if claims.get("iss") != trusted.name:
            raise VerificationError("token.wrong_issuer", "iss does not match the signing key")
        moment = (now or datetime.now(UTC)).timestamp()
        if not isinstance(claims["exp"], int | float) or claims["exp"] < moment:
            raise VerificationError("token.expired", "the token has expired")
        return claims
