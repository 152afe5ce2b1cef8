"""The sealing key from a Kubernetes Secret mounted into the broker's pod.

kubelet writes a Secret volume with its atomic writer: each visible file is a symlink into
``..data``, itself a symlink to a timestamped directory holding the real files, so an update
swaps one link atomically::

    <mount>/broker-sealing.key -> ..data/broker-sealing.key
    <mount>/..data             -> ..2026_03_01_12_00_00.123456789
    <mount>/..2026_03_01_12_00_00.123456789/broker-sealing.key     (the key)

What is accepted, and why:

- **Links only within the mount.** The path is resolved one component at a time from the
  mount directory, with every directory opened ``O_NOFOLLOW`` and every link read and
  checked: an absolute target or a ``..`` component is refused (``broker.sealing_key_insecure``),
  so the key can only come from inside the mount, at most :data:`MAX_LINKS` links deep.
- **Owners: root or this user.** kubelet (root) owns what it writes; anything else owned by
  another user is refused.
- **No write bits for group or other** on the key file, the links' directories and the
  timestamped directory. The mount directory itself is a tmpfs kubelet makes world-writable
  and sticky, and mounts read-only into the container: a group- or other-writable mount
  directory is accepted only if it is sticky (nobody may replace root's entries) or its file
  system is read-only; otherwise refused.
- **Read bits are allowed** (``0400``, ``0440`` and ``0444``; kubelet's default ``0644``
  too). A pod's volume is visible only to the containers that mount it, and kubelet adds
  group-read for the pod's ``fsGroup`` whatever ``defaultMode`` says; the chart mounts this
  Secret in the broker container alone, ``defaultMode: 0400``. The key file source
  (``0600``, owned by the broker) is the stricter choice outside Kubernetes.
- **Exactly 32 raw bytes.** A Secret's ``data`` is base64 in the API and kubelet writes the
  decoded bytes, so the file holds the key itself (the chart's ``broker-sealing.key``).
  Base64 text in the file (44 bytes, from ``stringData``) is refused with that hint, never
  decoded: one encoding, no guessing.

A missing mount or file is ``broker.sealing_key_missing`` naming the path; nothing is ever
created. A kubelet update racing the read is retried a few times.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from services.broker.sealing import KEY_FILE_NAME, KEY_SIZE, AeadKey
from services.mesh.errors import SealingError

MAX_LINKS = 8
ATTEMPTS = 3
_BASE64_KEY = re.compile(rb"[A-Za-z0-9+/]{43}=\s*")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class _Raced(Exception):
    """An entry changed between reading and opening it (a kubelet update)."""


class KubernetesSecretSource:
    """``broker-sealing.key`` (or ``name``) in a Secret volume mounted at ``mount``."""

    def __init__(self, mount: Path | str, name: str = KEY_FILE_NAME) -> None:
        if "/" in name or name in ("", ".", ".."):
            raise SealingError("broker.sealing_params_invalid", f"{name!r} is not a file name")
        self.mount = Path(mount)
        self.name = name

    def __repr__(self) -> str:
        return f"KubernetesSecretSource({str(self.mount / self.name)!r})"

    def sealing_key(self) -> AeadKey:
        for _ in range(ATTEMPTS):
            try:
                return AeadKey(self._read())
            except _Raced:
                continue
        raise SealingError(
            "broker.sealing_key_unavailable", f"{self.mount} kept changing while read"
        )

    def _read(self) -> bytes:
        with self._mount_fd() as root, _opened_within(root, self.name, self.mount) as fd:
            return self._key_from(fd)

    @contextlib.contextmanager
    def _mount_fd(self) -> Iterator[int]:
        try:
            fd = os.open(self.mount, _DIR_FLAGS)
        except FileNotFoundError:
            raise _missing(self.mount, self.name) from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR) and self.mount.is_symlink():
                raise SealingError(
                    "broker.sealing_key_insecure", f"{self.mount} is a symlink"
                ) from None
            raise SealingError(
                "broker.sealing_key_unavailable", f"{self.mount}: {exc.strerror}"
            ) from None
        try:
            info = os.fstat(fd)
            _check_owner(info, self.mount)
            writable = info.st_mode & 0o022
            if writable and not (info.st_mode & stat.S_ISVTX or _read_only(fd)):
                raise SealingError(
                    "broker.sealing_key_insecure",
                    f"{self.mount} is writable by others, not sticky and not read-only",
                )
            yield fd
        finally:
            os.close(fd)

    def _key_from(self, fd: int) -> bytes:
        path = self.mount / self.name
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SealingError("broker.sealing_key_insecure", f"{path} is not a regular file")
        _check_owner(info, path)
        if info.st_mode & 0o022:
            raise SealingError(
                "broker.sealing_key_insecure",
                f"{path} has mode {stat.S_IMODE(info.st_mode):o}: writable by group or other",
            )
        data = os.read(fd, KEY_SIZE * 2)
        if len(data) == KEY_SIZE == info.st_size:
            return data
        hint = ""
        if _BASE64_KEY.fullmatch(data):
            hint = ": it looks like base64 text; put the key in the Secret's data, not stringData"
        raise SealingError(
            "broker.sealing_key_invalid",
            f"{path} holds {info.st_size} bytes, not the {KEY_SIZE} raw bytes of a key{hint}",
        )


@contextlib.contextmanager
def _opened_within(root: int, name: str, mount: Path) -> Iterator[int]:
    """``name`` under the directory ``root``, following links only inside it."""
    pending = [name]
    directories: list[int] = []
    current = root
    links = 0
    try:
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                raise SealingError(
                    "broker.sealing_key_insecure", f"a link under {mount} leads out of it"
                )
            info = _lstat(part, current, mount, name)
            _check_owner(info, mount / part)
            if stat.S_ISLNK(info.st_mode):
                links += 1
                if links > MAX_LINKS:
                    raise SealingError(
                        "broker.sealing_key_insecure", f"more than {MAX_LINKS} links under {mount}"
                    )
                target = os.readlink(part, dir_fd=current)
                if target.startswith("/"):
                    raise SealingError(
                        "broker.sealing_key_insecure", f"{mount / part} points outside {mount}"
                    )
                pending = target.split("/") + pending
                continue
            if any(p not in ("", ".") for p in pending):
                current = _open_directory(part, current, mount)
                directories.append(current)
                continue
            try:
                fd = os.open(part, _FILE_FLAGS, dir_fd=current)
            except OSError as exc:
                raise _raced_or_unavailable(exc, mount) from None
            try:
                yield fd
            finally:
                os.close(fd)
            return
        raise SealingError("broker.sealing_key_insecure", f"{mount / name} names a directory")
    finally:
        for fd in reversed(directories):
            os.close(fd)


def _lstat(part: str, directory: int, mount: Path, name: str) -> os.stat_result:
    try:
        return os.stat(part, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        raise _missing(mount, name) from None
    except OSError as exc:
        raise SealingError("broker.sealing_key_unavailable", f"{mount}: {exc.strerror}") from None


def _missing(mount: Path, name: str) -> SealingError:
    return SealingError(
        "broker.sealing_key_missing",
        f"no Kubernetes Secret at {mount / name} (sealing_secret_dir is where the Secret "
        f"holding {name} is mounted)",
    )


def _open_directory(part: str, parent: int, mount: Path) -> int:
    try:
        fd = os.open(part, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        raise _raced_or_unavailable(exc, mount) from None
    info = os.fstat(fd)
    try:
        _check_owner(info, mount / part)
        if info.st_mode & 0o022:
            raise SealingError(
                "broker.sealing_key_insecure", f"{mount / part} is writable by group or other"
            )
    except SealingError:
        os.close(fd)
        raise
    return fd


def _raced_or_unavailable(exc: OSError, mount: Path) -> Exception:
    if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENOTDIR):
        return _Raced()
    return SealingError("broker.sealing_key_unavailable", f"{mount}: {exc.strerror}")


def _check_owner(info: os.stat_result, path: Path) -> None:
    if info.st_uid not in (0, os.geteuid()):
        raise SealingError(
            "broker.sealing_key_insecure",
            f"{path} is owned by uid {info.st_uid}, neither root (kubelet) nor this user",
        )


def _read_only(fd: int) -> bool:
    return bool(os.fstatvfs(fd).f_flag & os.ST_RDONLY)
