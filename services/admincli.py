"""What every operator command shares: where the mesh is, who signs in, and a deadline.

An operator command is a person waiting at a terminal. nats-py retries a first connection
forever, and the bus retries each JetStream call for half a minute (right for services,
which outlive a server restart); chained over a dozen calls that was a command hanging for
many minutes against an unreachable or JetStream-less server. Here the connection gets
``--timeout`` seconds (default 10), every bus call as long, and the whole command a hard
deadline on top; on expiry the command exits 2 with one line naming the server.

Configuration precedence: command line (``--nats``, ``--data-dir``) > environment
(``ATTESTMESH_*``) > config file (``--config FILE``, else ``DATA_DIR/config.json``) >
defaults. The NATS identity is ``admin`` from the data directory's ``identities/`` unless a
seed is configured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from services import sealingopts
from services.mesh import authconf, identities
from services.mesh import config as config_mod
from services.mesh.boundedfile import read_bounded
from services.mesh.bus import Bus
from services.mesh.config import Config
from services.mesh.errors import BusError, ConfigError
from services.mesh.keys import SigningKey

T = TypeVar("T")

DEFAULT_DATA_DIR = Path(".attestmesh")
DEFAULT_TIMEOUT_S = 10.0
WORK_TIMEOUT_S = 60.0
"""What a command may take once connected (many KV round trips), on top of connecting."""
MAX_INPUT_BYTES = 1024 * 1024
OPERATOR_KEY_HELP = "operator signing key, PEM (default: operator.key in the keys directory)"


def add_target(parser: argparse.ArgumentParser) -> None:
    """``--data-dir D | --config FILE``, ``--nats URL`` and ``--timeout S``."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--data-dir", type=Path, help="an `attestmesh up` data directory")
    where.add_argument("--config", type=Path, help="the mesh's config.json (remote mesh)")
    parser.add_argument("--nats", default=None, help="NATS URL (overrides config and env)")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to reach NATS"
    )


def resolve(
    config_file: Path | None, data_dir: Path | None, nats: str | None, **extra: object
) -> Config:
    """The configuration an operator command runs with (precedence: module docstring);
    ``extra`` are further command-line overrides (``None``: not given)."""
    overrides: dict[str, object] = {"nats_url": nats, **extra}
    if config_file is not None:
        return config_mod.load(config_file, **overrides)
    if data_dir is not None:
        path = data_dir / "config.json"
        if not path.is_file():
            raise ConfigError("cli.no_config", f"{path} does not exist (run `attestmesh up`)")
        return config_mod.load(path, data_dir=str(data_dir), **overrides)
    directory = Path(os.environ.get("ATTESTMESH_DATA_DIR") or DEFAULT_DATA_DIR)
    path = directory / "config.json"
    return config_mod.load(path if path.is_file() else None, **overrides)


def admin_config(args: argparse.Namespace) -> Config:
    """``args``' configuration signed in as ``admin``."""
    config = resolve(
        getattr(args, "config", None),
        getattr(args, "data_dir", None),
        getattr(args, "nats", None),
        **sealingopts.overrides(args),
    )
    return authconf.signed_in_as(config, identities.ADMIN)


def operator_key(args: argparse.Namespace, config: Config) -> SigningKey:
    """The operator's signing key; a missing key is an error naming where it looked."""
    from services.policy.documents import OPERATOR

    path = getattr(args, "operator_key", None) or config.keys_path / f"{OPERATOR}.key"
    return SigningKey.load(OPERATOR, Path(path))


def timeout_of(args: argparse.Namespace) -> float:
    timeout = float(getattr(args, "timeout", DEFAULT_TIMEOUT_S))
    if not 0 < timeout <= 600:
        raise ConfigError("cli.usage", "--timeout must be in (0, 600] seconds")
    return timeout


def run(
    config: Config,
    timeout: float,
    work: Callable[[Bus], Awaitable[T]],
    *,
    declare: bool = True,
    identity: str = identities.ADMIN,
) -> T:
    """Run ``work`` on a session as ``identity`` (the operator's, unless a command acts as
    a service) under the deadlines of the module docstring."""

    async def session() -> T:
        async with Bus.session(
            config, identity, wait=timeout, retry_for=timeout, declare=declare, quiet=True
        ) as bus:
            return await work(bus)

    async def bounded() -> T:
        try:
            return await asyncio.wait_for(session(), timeout + WORK_TIMEOUT_S)
        except TimeoutError:
            raise BusError("bus.timeout", f"no answer from {config.nats_url} in time") from None

    return asyncio.run(bounded())


def read_input(source: str, *, limit: int = MAX_INPUT_BYTES) -> bytes:
    """A file's bytes, or standard input's for ``-``; bounded, unreadable is an error."""
    import sys

    if source != "-":
        return read_bounded(Path(source), limit)
    try:
        data = sys.stdin.buffer.read(limit + 1)
    except OSError as exc:
        raise ConfigError("cli.unreadable", f"{source}: {exc.strerror}") from None
    if len(data) > limit:
        raise ConfigError("cli.too_large", f"{source} exceeds {limit} bytes")
    return data
