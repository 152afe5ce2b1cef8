"""Choosing the sealing-key source from configuration, the environment-variable source, and
the one explicit way to create a new key file.

``sealing_source`` (``Config``; ``--sealing-source``, ``ATTESTMESH_SEALING_SOURCE``):

==============  ===============================================  ============================
source          the key                                          module
==============  ===============================================  ============================
``file``        32 raw bytes, ``0600``, owned by the broker      :mod:`~.sealing`
``env``         ``ATTESTMESH_SEALING_KEY``: base64 of 32 bytes   here
``k8s-secret``  ``broker-sealing.key`` in a mounted Secret       :mod:`~.k8ssecret`
``snp``         derived by the SEV-SNP firmware                  :mod:`~.snpkey`
==============  ===============================================  ============================

No source creates a key (only ``attestmesh up`` does, in its own data directory, and
``attestmesh recovery recover --new-key PATH`` at a path named on its command line):
a missing key is ``broker.sealing_key_missing`` saying where it was looked for.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from services.broker.k8ssecret import KubernetesSecretSource
from services.broker.sealing import KEY_SIZE, AeadKey, KeyFileSource, SealingKeySource
from services.broker.snpkey import KeyRequest, SnpDerivedKeySource
from services.mesh.config import Config
from services.mesh.errors import SealingError

ENV_KEY = "ATTESTMESH_SEALING_KEY"
_ENCODED_SIZE = 44
_MAX_ENV_SIZE = 256
_WHITESPACE = " \t\r\n"


class EnvKeySource:
    """The key as standard base64 (with padding) of exactly 32 bytes in an environment variable.

    Surrounding whitespace is ignored (a Secret created from a file often ends in a newline);
    anything else that is not the canonical encoding of 32 bytes is refused. Refusals give
    the variable's name and the value's length, never the value.
    """

    def __init__(self, environ: Mapping[str, str], name: str = ENV_KEY) -> None:
        self._environ = environ
        self.name = name

    def __repr__(self) -> str:
        return f"EnvKeySource({self.name!r})"

    def sealing_key(self) -> AeadKey:
        value = self._environ.get(self.name, "")
        if not value:
            raise SealingError(
                "broker.sealing_key_missing",
                f"{self.name} is not set (sealing_source is env: base64 of {KEY_SIZE} bytes)",
            )
        text = value[:_MAX_ENV_SIZE].strip(_WHITESPACE)
        if len(value) <= _MAX_ENV_SIZE and len(text) == _ENCODED_SIZE:
            try:
                raw = base64.b64decode(text.encode("ascii"), validate=True)
            except (UnicodeEncodeError, binascii.Error, ValueError):
                raw = b""
            if len(raw) == KEY_SIZE and base64.b64encode(raw).decode() == text:
                return AeadKey(raw)
        raise SealingError(
            "broker.sealing_key_invalid",
            f"{self.name} ({len(value)} characters) is not standard base64 of exactly "
            f"{KEY_SIZE} bytes",
        )


def from_config(config: Config, environ: Mapping[str, str]) -> SealingKeySource:
    """The source ``config`` names; ``environ`` is read only by the ``env`` source."""
    source = config.sealing_source
    if source == "file":
        if config.sealing_key_file:
            return KeyFileSource(Path(config.sealing_key_file), create=False)
        return KeyFileSource.in_data_dir(Path(config.data_dir), create=False)
    if source == "env":
        return EnvKeySource(environ)
    if source == "k8s-secret":
        if not config.sealing_secret_dir:
            raise SealingError(
                "broker.sealing_key_missing",
                "sealing_source is k8s-secret but sealing_secret_dir (where the Secret is "
                "mounted) is not set",
            )
        return KubernetesSecretSource(config.sealing_secret_dir)
    return SnpDerivedKeySource(
        KeyRequest.from_settings(config.sealing_snp), device=config.sealing_snp.device
    )


def new_key_file(path: Path) -> AeadKey:
    """Create a fresh random key at ``path`` (``0600``); refuse if anything is there already.

    For a path an operator named on the command line. The directory must exist and be
    writable by nobody else; the file is written whole and fsynced before this returns.
    """
    directory = path.parent
    try:
        info = os.stat(directory)
    except OSError as exc:
        raise SealingError(
            "broker.sealing_key_unavailable", f"{directory}: {exc.strerror}"
        ) from None
    if not stat.S_ISDIR(info.st_mode) or info.st_mode & 0o022:
        raise SealingError(
            "broker.sealing_key_insecure", f"{directory} is not a directory only its owner writes"
        )
    key = AeadKey.generate()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise SealingError(
            "broker.sealing_key_exists", f"{path} exists; name a path that does not"
        ) from None
    except OSError as exc:
        raise SealingError("broker.sealing_key_unavailable", f"{path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        data = memoryview(key.export())
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise SealingError("broker.sealing_key_unavailable", f"{path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return key
