"""Reading a file no larger than a limit: the one way operator inputs are read from disk.

Reading one byte past the limit tells "too large" from "exactly at the limit" without
trusting a size from ``stat`` that can change before the read.
"""

from __future__ import annotations

from pathlib import Path

from services.mesh.errors import ConfigError


def read_bounded(path: Path, limit: int) -> bytes:
    """``path``'s bytes; unreadable (``cli.unreadable``) or over ``limit`` (``cli.too_large``)
    is an error naming the file."""
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise ConfigError("cli.unreadable", f"{path}: {exc.strerror}") from None
    if len(data) > limit:
        raise ConfigError("cli.too_large", f"{path} exceeds {limit} bytes")
    return data
