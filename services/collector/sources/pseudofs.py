"""Safe, bounded access to kernel pseudo-filesystems (configfs-tsm, Gramine's /dev/attestation).

Attributes are opened relative to a directory descriptor with ``O_NOFOLLOW`` and must be
regular files, so nothing planted in the directory can redirect a read or write elsewhere;
every read is bounded. The syscalls go through :class:`FileOps`, a seam the tests fill with a
fake kernel (:mod:`services.testing.fakes`) on an ordinary directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from typing import Protocol

from services.mesh.errors import AttestmeshError, ConfigError, ParseError

MAX_TEXT = 64
SAFE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_COUNT = re.compile(rb"(\d{1,20})\n?")
_NAME = re.compile(rb"([a-z0-9_-]{1,32})\n?")


class FileOps(Protocol):
    """The syscalls the pseudo-filesystem sources make, so a test can stand in for the kernel."""

    def open(self, path: str, flags: int, *, dir_fd: int | None = None) -> int: ...

    def read(self, fd: int, size: int) -> bytes: ...

    def write(self, fd: int, data: bytes) -> int: ...

    def fstat(self, fd: int) -> os.stat_result: ...

    def close(self, fd: int) -> None: ...

    def mkdir(self, path: str, *, dir_fd: int) -> None: ...

    def rmdir(self, path: str, *, dir_fd: int) -> None: ...


class OsFileOps:
    """:class:`FileOps` on the real kernel."""

    def open(self, path: str, flags: int, *, dir_fd: int | None = None) -> int:
        return os.open(path, flags, 0o600, dir_fd=dir_fd)

    def read(self, fd: int, size: int) -> bytes:
        return os.read(fd, size)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def mkdir(self, path: str, *, dir_fd: int) -> None:
        os.mkdir(path, 0o700, dir_fd=dir_fd)

    def rmdir(self, path: str, *, dir_fd: int) -> None:
        os.rmdir(path, dir_fd=dir_fd)


OS_FILES = OsFileOps()


def os_failure(exc: OSError, what: str, reason: str = "collector.device_error") -> AttestmeshError:
    """An ``OSError`` from the kernel as our error, naming the errno symbolically."""
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return AttestmeshError(reason, f"{what}: {code} ({exc.strerror})")


class AttributeDir:
    """An open directory of kernel attribute files, used without following links."""

    def __init__(self, files: FileOps, fd: int, label: str) -> None:
        self.files = files
        self.fd = fd
        self.label = label

    def read(self, name: str, limit: int) -> bytes:
        """The whole attribute (at most ``limit`` bytes); a missing one is a ``ConfigError``."""
        data = self.read_optional(name, limit)
        if data is None:
            raise self._missing(name)
        return data

    def read_optional(self, name: str, limit: int) -> bytes | None:
        """The attribute's content, or ``None`` when the kernel does not offer it."""
        fd = self._open(name, os.O_RDONLY)
        if fd is None:
            return None
        try:
            chunks: list[bytes] = []
            total = 0
            while chunk := self._read(fd, name, min(limit + 1 - total, 1 << 16)):
                total += len(chunk)
                if total > limit:
                    raise ParseError(
                        "collector.blob_too_large", f"{self.label}/{name} exceeds {limit} bytes"
                    )
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            self.files.close(fd)

    def write(self, name: str, data: bytes) -> None:
        """Write ``data`` in one call and close: configfs commits binary attributes on close."""
        fd = self._open(name, os.O_WRONLY)
        if fd is None:
            raise self._missing(name)
        try:
            written = self.files.write(fd, data)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.files.close(fd)
            raise os_failure(exc, f"write {self.label}/{name}") from None
        try:
            self.files.close(fd)
        except OSError as exc:
            raise os_failure(exc, f"close {self.label}/{name}") from None
        if written != len(data):
            raise AttestmeshError(
                "collector.device_error",
                f"short write to {self.label}/{name}: {written} of {len(data)} bytes",
            )

    def _read(self, fd: int, name: str, size: int) -> bytes:
        try:
            return self.files.read(fd, size)
        except OSError as exc:
            raise os_failure(exc, f"read {self.label}/{name}") from None

    def _open(self, name: str, flags: int) -> int | None:
        try:
            fd = self.files.open(name, flags | SAFE_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise AttestmeshError(
                    "collector.unsafe_path",
                    f"{self.label}/{name} is a symbolic link; not following",
                ) from None
            raise os_failure(exc, f"open {self.label}/{name}") from None
        try:
            mode = self.files.fstat(fd).st_mode
        except OSError as exc:
            self.files.close(fd)
            raise os_failure(exc, f"stat {self.label}/{name}") from None
        if not stat.S_ISREG(mode):
            self.files.close(fd)
            raise AttestmeshError(
                "collector.unsafe_path", f"{self.label}/{name} is not a regular file"
            )
        return fd

    def _missing(self, name: str) -> ConfigError:
        return ConfigError(
            "collector.missing_attribute", f"{self.label}/{name} does not exist on this kernel"
        )


def parse_count(raw: bytes, what: str) -> int:
    """A decimal attribute such as ``generation`` ("17\\n"), strictly."""
    match = _COUNT.fullmatch(raw)
    if match is None:
        raise ParseError("collector.bad_attribute", f"{what} is not a decimal count: {raw[:32]!r}")
    return int(match.group(1))


def parse_name(raw: bytes, what: str) -> str:
    """A short identifier attribute such as ``provider`` ("sev_guest\\n"), strictly."""
    match = _NAME.fullmatch(raw)
    if match is None:
        raise ParseError("collector.bad_attribute", f"{what} is not an identifier: {raw[:32]!r}")
    return match.group(1).decode("ascii")
