"""Recovery officers' key files and the share files made for them.

Formats (README: recovery):

- An officer's key pair is X25519 in PEM: ``<name>.pub`` (SubjectPublicKeyInfo) and
  ``<name>.key`` (unencrypted PKCS#8, ``0600``). ``attestmesh recovery officer-key`` makes
  one, and so does ``openssl genpkey -algorithm X25519`` (then ``openssl pkey -pubout``), so
  an officer can make theirs on their own machine and hand over only the ``.pub``. A
  directory of ``*.pub`` files is the list of officers, each named by its file's stem.
- A share file, ``<name>.share``, is JSON: the officer's name and public-key fingerprint,
  how many shares were made, and the :class:`~services.broker.recovery.RecoveryShare`
  (HPKE-sealed to that officer; nothing in the file is secret). Only the HPKE ``info``
  (key id, threshold, share index) is authenticated; the name, fingerprint and count are
  labels that help pick the right key and give clear errors.

Every file read is bounded in size and number; every file written is created exclusively
(an existing file is never overwritten).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from services.broker.recovery import RecoveryShare
from services.mesh.boundedfile import read_bounded
from services.mesh.boundedjson import MAX_DEPTH, depth
from services.mesh.errors import ConfigError, ParseError, SealingError

PUBLIC_SUFFIX = ".pub"
PRIVATE_SUFFIX = ".key"
SHARE_SUFFIX = ".share"
SHARE_FORMAT: Literal["attestmesh-recovery-share/v1"] = "attestmesh-recovery-share/v1"
MAX_OFFICERS = 255
MAX_KEY_FILE = 4096
MAX_SHARE_FILE = 16 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class ShareFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One officer's share, as written to ``<officer>.share``."""

    format: Literal["attestmesh-recovery-share/v1"]
    officer: str
    officer_key: str
    """``sha256:<hex>`` of the officer's raw X25519 public key."""
    shares: int
    share: RecoveryShare


@dataclass(frozen=True)
class Officer:
    name: str
    public_key: bytes
    """The raw 32-byte X25519 public key."""

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


def officer_name(text: str) -> str:
    """``text`` if it can name an officer (and a file): letters, digits, ``._-``."""
    if _NAME.fullmatch(text) is None:
        raise ConfigError("recovery.bad_officer_name", "letters, digits and ._- (at most 63)")
    return text


def fingerprint(public_key: bytes) -> str:
    return "sha256:" + hashlib.sha256(public_key).hexdigest()


def raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate(directory: Path, name: str) -> tuple[Path, Path, Officer]:
    """A new key pair for officer ``name`` in ``directory``: (private, public, officer)."""
    name = officer_name(name)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_path = directory / f"{name}{PRIVATE_SUFFIX}"
    public_path = directory / f"{name}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise ConfigError("recovery.file_exists", f"{path} exists; nothing was written")
    key = X25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_new(private_path, private_pem, 0o600)
    write_new(public_path, public_pem, 0o644)
    return private_path, public_path, Officer(name, raw_public(key.public_key()))


def load_officers(directory: Path) -> list[Officer]:
    """Every ``*.pub`` in ``directory``, sorted by name; duplicate keys are refused."""
    try:
        paths = sorted(p for p in directory.iterdir() if p.name.endswith(PUBLIC_SUFFIX))
    except OSError as exc:
        raise ConfigError("cli.unreadable", f"{directory}: {exc.strerror}") from None
    if len(paths) > MAX_OFFICERS:
        raise ConfigError("recovery.too_many_officers", f"more than {MAX_OFFICERS} in {directory}")
    officers = []
    seen: dict[bytes, str] = {}
    for path in paths:
        name = officer_name(path.name[: -len(PUBLIC_SUFFIX)])
        public = _public_from_pem(read_bounded(path, MAX_KEY_FILE), path)
        if public in seen:
            raise ConfigError(
                "recovery.duplicate_officer_key", f"{seen[public]} and {name} share one key"
            )
        seen[public] = name
        officers.append(Officer(name, public))
    return officers


def load_private_key(path: Path) -> X25519PrivateKey:
    """An officer's private key; one that others may read or write is refused."""
    data = read_bounded(path, MAX_KEY_FILE)
    if path.stat().st_mode & 0o077:
        raise ConfigError(
            "recovery.officer_key_insecure", f"{path} must not be group/world accessible"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            "recovery.officer_key_invalid", f"{path} is not an unencrypted PKCS#8 PEM key"
        ) from None
    if not isinstance(key, X25519PrivateKey):
        raise ConfigError("recovery.officer_key_invalid", f"{path} is not an X25519 key")
    return key


def _public_from_pem(data: bytes, path: Path) -> bytes:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ConfigError(
            "recovery.officer_key_invalid", f"{path} is not a PEM public key"
        ) from None
    if not isinstance(key, X25519PublicKey):
        raise ConfigError("recovery.officer_key_invalid", f"{path} is not an X25519 key")
    return raw_public(key)


def encode_share(share: ShareFile) -> bytes:
    return msgspec.json.format(msgspec.json.encode(share)) + b"\n"


def read_share(path: Path) -> ShareFile:
    """A share file, its shape checked (not its cryptography: that is the officer's key's)."""
    data = read_bounded(path, MAX_SHARE_FILE)
    try:
        if depth(data) > MAX_DEPTH:
            raise ParseError("recovery.share_file_invalid", "nested too deep")
        share = msgspec.json.decode(data, type=ShareFile)
    except (msgspec.DecodeError, ParseError):
        raise SealingError("recovery.share_file_invalid", f"{path} is not a share file") from None
    inner = share.share
    if not (
        _NAME.fullmatch(share.officer)
        and 1 <= inner.x <= share.shares <= 255
        and 2 <= inner.threshold <= share.shares
        and len(inner.key_id) == 8
    ):
        raise SealingError("recovery.share_file_invalid", f"{path} has out-of-range fields")
    return share


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``data`` and ``mode``; an existing file is an error, not replaced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise ConfigError("recovery.file_exists", f"{path} exists; it was not replaced") from None
    except OSError as exc:
        raise ConfigError("cli.unwritable", f"{path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, stat.S_IMODE(mode))
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
