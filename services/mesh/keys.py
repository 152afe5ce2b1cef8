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
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.mesh import jws
from services.mesh.errors import ConfigError, VerificationError

ALGORITHM = jws.ALGORITHM
MAX_TOKEN_BYTES = 256 * 1024
MAX_CACHED_TOKENS = 4096
MAX_CACHED_CHARS = 16 * 1024 * 1024
MAX_CACHED_TOKEN_CHARS = 64 * 1024


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
        return jws.sign({**claims, "iss": self.name}, self._private, self.kid)

    def derive(self, purpose: str) -> bytes:
        """A 32-byte secret for ``purpose`` (HKDF-SHA256 over the private scalar), shared by
        every replica holding this key, and independent of the signatures it makes: e.g. the
        key the policy authenticates its nonces with (:mod:`services.policy.nonces`)."""
        scalar = self._private.private_numbers().private_value.to_bytes(32, "big")
        return HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.encode()
        ).derive(scalar)

    def sign_bytes(self, data: bytes) -> bytes:
        """ECDSA P-256/SHA-256 (DER) over exactly ``data``: for documents that are stored
        as bytes and must be verified as those same bytes, not re-serialised claims."""
        return self._private.sign(data, ec.ECDSA(hashes.SHA256()))


@dataclass(frozen=True)
class _Trusted:
    name: str
    key: ec.EllipticCurvePublicKey


class _VerifiedTokens:
    """Tokens whose signature has been checked, and the key that signed them: a bounded LRU.

    Why: a token is immutable, and the broker reads the same decision token when it records
    it, when it compares the next decision with it, and on every secret request under it;
    an ES256 check each time was most of the cost of those reads. Only the *signature* is
    remembered, keyed by the whole token text (an exact match, not a digest, so nothing but
    the very same bytes can hit): the signer's role, the issuer and the expiry are checked
    again on every use, and the claims are parsed afresh each time. A token that fails is
    never remembered. Bounded in entries and in characters; tokens larger than
    :data:`MAX_CACHED_TOKEN_CHARS` are checked every time.
    """

    def __init__(self) -> None:
        self._entries: OrderedDict[str, _Trusted] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def chars(self) -> int:
        return self._chars

    def get(self, token: str) -> _Trusted | None:
        with self._lock:
            found = self._entries.get(token)
            if found is not None:
                self._entries.move_to_end(token)
            return found

    def put(self, token: str, signer: _Trusted) -> None:
        if len(token) > MAX_CACHED_TOKEN_CHARS:
            return
        with self._lock:
            if token in self._entries:
                return
            self._entries[token] = signer
            self._chars += len(token)
            while len(self._entries) > MAX_CACHED_TOKENS or self._chars > MAX_CACHED_CHARS:
                evicted, _ = self._entries.popitem(last=False)
                self._chars -= len(evicted)


class TrustedKeys:
    """The public keys a consumer accepts, by key id; tokens from anyone else are rejected."""

    def __init__(self, keys: Mapping[str, ec.EllipticCurvePublicKey]) -> None:
        self._by_kid = {_kid(key): _Trusted(name, key) for name, key in keys.items()}
        self._verified = _VerifiedTokens()

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
        injected ``now``, on every call: a token whose signature was checked before (see
        :class:`_VerifiedTokens`) skips only that check.
        """
        if len(token) > MAX_TOKEN_BYTES:
            raise VerificationError("token.too_large", f"{len(token)} bytes")
        trusted = self._verified.get(token)
        if trusted is None:
            parts = jws.split(token)
            trusted = self._by_kid.get(parts.kid) if parts.kid is not None else None
            if trusted is None:
                kid = parts.header.get("kid")
                raise VerificationError("token.unknown_signer", f"no trusted key with kid {kid!r}")
            if not accept(trusted.name):
                raise VerificationError("token.wrong_signer", f"{trusted.name} may not sign this")
            jws.check(parts, trusted.key)
            payload_segment = parts.payload_segment
        else:
            if not accept(trusted.name):
                raise VerificationError("token.wrong_signer", f"{trusted.name} may not sign this")
            payload_segment = token.split(".", 2)[1]
        claims = jws.payload(payload_segment)
        if claims.get("iss") != trusted.name:
            raise VerificationError("token.wrong_issuer", "iss does not match the signing key")
        if "exp" not in claims or not _is_time(claims.get("iat")):
            raise VerificationError("token.invalid", "exp and a numeric iat are required")
        if "aud" in claims:
            raise VerificationError("token.invalid", "no mesh token names an audience")
        self._verified.put(token, trusted)
        moment = (now or datetime.now(UTC)).timestamp()
        nbf = claims.get("nbf")
        if nbf is not None and (not _is_time(nbf) or nbf > moment):
            raise VerificationError("token.invalid", "the token is not yet valid")
        exp = claims["exp"]
        if not _is_time(exp) or exp < moment:
            raise VerificationError("token.expired", "the token has expired")
        return claims


def _is_time(value: object) -> bool:
    """A JWT NumericDate: a number, not a boolean (which Python counts as an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool)
