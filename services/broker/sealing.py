"""Sealed envelopes and the sealing-key sources (Shamir recovery lives in ``recovery``).

Key hierarchy (DESIGN.md §4)::

    sealing key (32 B)  ── from a SealingKeySource (``keysources``): key file, environment,
      │                    Kubernetes Secret or SEV-SNP derived key
      └─ wraps ─► data key (32 B, random) ── split into n-of-m Shamir shares, each HPKE-
                    │                        encrypted to a recovery officer (``recovery``)
                    └─ seals ─► secrets, the version index, audit records

Envelope (all integers big-endian)::

    magic "AMSL" | format 0x01 | key id (8) | version (u64) | nonce (12) | AES-256-GCM ct+tag

The associated data is the whole header plus a length-prefixed purpose and record name, so a
flipped header byte, a blob moved to another record or purpose, or a different key all fail
authentication. The version sits in the authenticated header: a reader that knows the
version it expects (from the sealed index) recognises an older blob replayed in place as a
rollback, not merely as damage. Key ids are a domain-separated hash prefix of the key, so
``broker.wrong_key`` can be told apart from ``broker.seal_tampered`` without revealing keys.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import os
import secrets
import stat
import struct
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.mesh.errors import SealingError

MAGIC = b"AMSL"
FORMAT_VERSION = 1
KEY_SIZE = 32
KEY_ID_SIZE = 8
NONCE_SIZE = 12
TAG_SIZE = 16
MAX_PLAINTEXT = 1024 * 1024
MAX_LABEL = 512
KEY_FILE_NAME = "broker-sealing.key"
_HEADER = struct.Struct(">4sB8sQ12s")
HEADER_SIZE = _HEADER.size
MAX_BLOB = HEADER_SIZE + MAX_PLAINTEXT + TAG_SIZE
_AAD_LABEL = b"attestmesh/sealed/v1"
_KEY_ID_LABEL = b"attestmesh/key-id/v1"


class AeadKey:
    """A 32-byte AES-256-GCM key and its public id; the bytes never reach a repr."""

    __slots__ = ("_aead", "_material", "key_id")

    def __init__(self, material: bytes) -> None:
        if len(material) != KEY_SIZE:
            raise SealingError("broker.sealing_key_invalid", f"a key must be {KEY_SIZE} bytes")
        self._material = bytes(material)
        self._aead = AESGCM(self._material)
        self.key_id = hashlib.sha256(_KEY_ID_LABEL + self._material).digest()[:KEY_ID_SIZE]

    @classmethod
    def generate(cls) -> AeadKey:
        """A fresh random key from the OS CSPRNG."""
        return cls(secrets.token_bytes(KEY_SIZE))

    def export(self) -> bytes:
        """The raw key, only for wrapping it under another key or splitting it."""
        return self._material

    def __repr__(self) -> str:
        return f"AeadKey(id={self.key_id.hex()})"


class Opened:
    """A successfully opened envelope: plaintext and its authenticated version."""

    __slots__ = ("plaintext", "version")

    def __init__(self, plaintext: bytes, version: int) -> None:
        self.plaintext = plaintext
        self.version = version

    def __repr__(self) -> str:
        return f"Opened(version={self.version}, plaintext=<{len(self.plaintext)} bytes>)"


def _label(value: str) -> bytes:
    raw = value.encode()
    if not 0 < len(raw) <= MAX_LABEL:
        raise SealingError("broker.invalid_name", f"label must be 1..{MAX_LABEL} bytes")
    return struct.pack(">H", len(raw)) + raw


def _aad(header: bytes, purpose: str, name: str) -> bytes:
    return b"".join((_AAD_LABEL, header, _label(purpose), _label(name)))


def seal(key: AeadKey, plaintext: bytes, *, purpose: str, name: str, version: int) -> bytes:
    """Encrypt ``plaintext`` for record ``name`` at ``version`` (a fresh random nonce)."""
    if len(plaintext) > MAX_PLAINTEXT:
        raise SealingError("broker.secret_too_large", f"plaintext exceeds {MAX_PLAINTEXT} bytes")
    if not 0 <= version < 2**64:
        raise SealingError("broker.version_invalid", "version must fit in 64 bits")
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, key.key_id, version, os.urandom(NONCE_SIZE))
    nonce = header[-NONCE_SIZE:]
    return header + key._aead.encrypt(nonce, plaintext, _aad(header, purpose, name))


def open_sealed(
    key: AeadKey, blob: bytes, *, purpose: str, name: str, min_version: int = 0
) -> Opened:
    """Authenticate and decrypt ``blob`` as record ``name``.

    A version below ``min_version`` (the lowest the caller's trusted index allows) is
    reported as ``broker.rollback_detected``; it is checked only after authentication, so
    the version it reports is genuine.
    """
    if not HEADER_SIZE + TAG_SIZE <= len(blob) <= MAX_BLOB:
        raise SealingError("broker.seal_malformed", f"sealed blob of {len(blob)} bytes")
    header = blob[:HEADER_SIZE]
    magic, fmt, key_id, version, nonce = _HEADER.unpack(header)
    if magic != MAGIC:
        raise SealingError("broker.seal_malformed", "not a sealed envelope")
    if fmt != FORMAT_VERSION:
        raise SealingError("broker.seal_unsupported_version", f"format {fmt}")
    if not hmac.compare_digest(key_id, key.key_id):
        raise SealingError("broker.wrong_key", f"sealed under key {key_id.hex()}")
    try:
        plaintext = key._aead.decrypt(nonce, blob[HEADER_SIZE:], _aad(header, purpose, name))
    except InvalidTag as exc:
        raise SealingError("broker.seal_tampered", f"{purpose} {name!r} fails to open") from exc
    if version < min_version:
        raise SealingError(
            "broker.rollback_detected",
            f"{purpose} {name!r} is version {version}, expected at least {min_version}",
        )
    return Opened(plaintext, version)


def sealed_key_id(blob: bytes) -> bytes:
    """The id of the key ``blob`` claims to be sealed under, read without opening it.

    Unauthenticated until the blob opens: good for choosing or naming a key, never for
    trusting one.
    """
    if not HEADER_SIZE + TAG_SIZE <= len(blob) <= MAX_BLOB or blob[:4] != MAGIC:
        raise SealingError("broker.seal_malformed", "not a sealed envelope")
    return bytes(_HEADER.unpack_from(blob)[2])


class SealingKeySource(Protocol):
    """Where the sealing key comes from; the store never learns which kind it is
    (:mod:`services.broker.keysources` lists them and picks one from configuration).

    Implementations must fail closed (raise :class:`SealingError`) rather than hand out a
    key whose secrecy they cannot vouch for.
    """

    def sealing_key(self) -> AeadKey:
        """Load the sealing key (only ``attestmesh up``'s key file creates one)."""
        ...


class StaticKeySource:
    """A sealing key already in memory: a TEE-derived key, or a fixed key in tests."""

    def __init__(self, key: bytes) -> None:
        self._key = AeadKey(key)

    def sealing_key(self) -> AeadKey:
        """The key given at construction."""
        return self._key

    def __repr__(self) -> str:
        return f"StaticKeySource(id={self._key.key_id.hex()})"


class KeyFileSource:
    """A raw 32-byte key file, created ``0600`` on first use if ``create``; insecure files
    are refused.

    Only ``attestmesh up`` (in its own data directory) and test harnesses create keys.
    Everything else, the broker service and the operator's commands included, is given
    ``create=False``: a key invented next to a mistyped path would seal secrets nobody else
    can open, or orphan the real ones, so a missing key is ``broker.sealing_key_missing``
    naming where it was looked for.

    The file must be a regular file (not a symlink) owned by this user, with no group or
    other permission bits, in a directory nobody else can write. Creation writes a
    temporary file, fsyncs it and hard-links it into place, so a crash never leaves a torn
    key and two processes racing to create it both end up with the same key.
    """

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = path
        self.create = create

    @classmethod
    def in_data_dir(cls, data_dir: Path, *, create: bool = True) -> KeyFileSource:
        """The conventional key file inside the broker's data directory."""
        return cls(data_dir / KEY_FILE_NAME, create=create)

    def __repr__(self) -> str:
        return f"KeyFileSource({str(self.path)!r})"

    def sealing_key(self) -> AeadKey:
        """Read the key file, creating it if absent (and allowed to)."""
        try:
            return self._read()
        except FileNotFoundError:
            if not self.create:
                raise SealingError(
                    "broker.sealing_key_missing",
                    f"no sealing key at {self.path} (only `attestmesh up` creates one, in "
                    "its own data directory; point --data-dir or data_dir at the broker's)",
                ) from None
            self._create()
        try:
            return self._read()
        except FileNotFoundError as exc:
            raise SealingError("broker.sealing_key_unavailable", "key file vanished") from exc

    def _read(self) -> AeadKey:
        self._check_directory()
        try:
            # O_NONBLOCK: a FIFO planted at the path must not hang the broker.
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SealingError(
                    "broker.sealing_key_insecure", f"{self.path} is a symlink"
                ) from exc
            raise SealingError("broker.sealing_key_unavailable", str(self.path)) from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SealingError("broker.sealing_key_insecure", f"{self.path} not a file")
            if info.st_mode & 0o077 or info.st_uid != os.geteuid():
                raise SealingError(
                    "broker.sealing_key_insecure",
                    f"{self.path} has mode {stat.S_IMODE(info.st_mode):o} and owner "
                    f"{info.st_uid}; need 600 and owner {os.geteuid()}",
                )
            if info.st_size != KEY_SIZE:
                raise SealingError(
                    "broker.sealing_key_invalid", f"{self.path} must hold exactly {KEY_SIZE} bytes"
                )
            material = os.read(fd, KEY_SIZE + 1)
        finally:
            os.close(fd)
        if len(material) != KEY_SIZE:
            raise SealingError("broker.sealing_key_invalid", f"{self.path} changed while read")
        return AeadKey(material)

    def _check_directory(self) -> None:
        try:
            info = os.stat(self.path.parent)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise SealingError("broker.sealing_key_unavailable", str(self.path.parent)) from exc
        if info.st_mode & 0o022:
            raise SealingError(
                "broker.sealing_key_insecure", f"{self.path.parent} is writable by others"
            )

    def _create(self) -> None:
        directory = self.path.parent
        tmp = directory / f".{self.path.name}.{secrets.token_hex(8)}.tmp"
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._check_directory()
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o600)
            try:
                os.fchmod(fd, 0o600)
                data = memoryview(secrets.token_bytes(KEY_SIZE))
                while data:
                    data = data[os.write(fd, data) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):  # a concurrent creator won: keep theirs
                os.link(tmp, self.path)
            dir_fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise SealingError(
                "broker.sealing_key_unavailable", f"cannot create {self.path}"
            ) from exc
        finally:
            tmp.unlink(missing_ok=True)
