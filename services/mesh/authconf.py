"""NATS credentials and the embedded server's authorization file.

``attestmesh up`` and ``attestmesh node enroll`` keep, under ``<data-dir>/identities/``
(directory 0700, files 0600):

* ``<identity>.nk`` — the identity's nkey seed (``SU...``), what ``Bus.connect`` signs in with;
* ``users.json`` — identity -> public nkey, the registry the server configuration is built
  from (public material only, so enrolling a node whose seed is written elsewhere works).

The server configuration (JSON, which nats-server reads as its config syntax) lists one user
per registered identity with the permissions of :mod:`services.mesh.identities` and no
anonymous or default user, so a connection without a registered key is refused.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import msgspec
import nkeys  # type: ignore[import-untyped]

from services.mesh import identities, keys
from services.mesh.config import Config
from services.mesh.errors import ConfigError

IDENTITIES_DIR = "identities"
REGISTRY = "users.json"
MAX_REGISTRY_BYTES = 1024 * 1024


def new_user() -> tuple[str, str]:
    """A fresh NATS user key pair as (seed ``SU...``, public ``U...``)."""
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public: bytes = nkeys.from_seed(bytearray(seed)).public_key
    return seed.decode(), public.decode()


def public_of(seed_file: Path) -> str:
    """The public nkey of a seed file; a file that is not a user seed is an error."""
    try:
        seed = seed_file.read_bytes().strip()
        public: bytes = nkeys.from_seed(bytearray(seed)).public_key
    except (OSError, nkeys.NkeysError, ValueError) as exc:
        raise ConfigError("identity.bad_seed", f"{seed_file}: {type(exc).__name__}") from None
    if not seed.startswith(b"SU"):
        raise ConfigError("identity.bad_seed", f"{seed_file}: not a NATS user seed")
    return public.decode()


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only, replacing it atomically (in a
    0700 directory; the temporary file is per process, so concurrent writers cannot clash)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys.write_private(path, text.encode())


def identities_dir(data_dir: Path) -> Path:
    return data_dir / IDENTITIES_DIR


def server_store_dir(data_dir: Path) -> Path:
    """Where the embedded server keeps JetStream, its log and its pid file."""
    return data_dir / "nats"


def server_config_path(data_dir: Path) -> Path:
    return server_store_dir(data_dir) / "nats-server.conf"


MEMBER_CONFIG = "member.conf"
"""A cluster member's configuration file, in its own store directory."""


def server_pid_file(data_dir: Path) -> Path:
    return server_store_dir(data_dir) / "nats-server.pid"


def server_pid_files(data_dir: Path) -> list[Path]:
    """Every embedded server's pid file: the single server's, or each member's of an
    ``up --cluster`` (all read the same authorization file, so all must reload it)."""
    members = sorted((data_dir / "nats-cluster").glob("n*/nats-server.pid"))
    return [server_pid_file(data_dir), *members]


def seed_file(directory: Path, identity: str) -> Path:
    return directory / f"{identity}.nk"


def signed_in_as(config: Config, identity: str) -> Config:
    """``config`` signed in as ``identity`` of an ``attestmesh up`` data directory, unless it
    names a seed already (operator commands: admin; ``node reset``: the broker)."""
    if config.nats_nkey_seed_file is not None:
        return config
    seed = seed_file(identities_dir(Path(config.data_dir)), identity)
    if not seed.is_file():
        return config
    return msgspec.structs.replace(config, nats_nkey_seed_file=str(seed))


def read_registry(directory: Path) -> dict[str, str]:
    """identity -> public nkey; missing means none yet, anything malformed is an error."""
    path = directory / REGISTRY
    if not path.exists():
        return {}
    try:
        raw = path.read_bytes()
        if len(raw) > MAX_REGISTRY_BYTES:
            raise ConfigError("identity.registry_too_large", str(path))
        users = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise ConfigError("identity.registry_unreadable", f"{path}: {exc}") from None
    if not isinstance(users, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in users.items()
    ):
        raise ConfigError("identity.registry_invalid", f"{path}: expected identity -> nkey")
    return users


def register(directory: Path, identity: str, public: str) -> None:
    identities.permissions(identity)  # an identity without permissions is never registered
    users = read_registry(directory)
    users[identity] = public
    write_private(directory / REGISTRY, json.dumps(users, indent=2, sort_keys=True) + "\n")


def ensure(directory: Path, identity: str) -> Path:
    """The seed file of ``identity``, created (and registered) if it does not exist yet."""
    path = seed_file(directory, identity)
    if path.exists():
        public = public_of(path)
    else:
        seed, public = new_user()
        write_private(path, seed + "\n")
    if read_registry(directory).get(identity) != public:
        register(directory, identity, public)
    return path


def server_authorization(users: dict[str, str]) -> dict[str, Any]:
    """The ``authorization`` block: one nkey user per identity, nothing anonymous."""
    entries = [
        {
            "nkey": public,
            "permissions": identities.permissions(identity).to_nats(),
            "allowed_connection_types": ["STANDARD"],
        }
        for identity, public in sorted(users.items())
    ]
    if not entries:
        raise ConfigError("identity.none", "no identities registered; refusing an open server")
    return {"users": entries}


def write_server_config(path: Path, directory: Path) -> None:
    """(Re)write the server's configuration from the registry in ``directory``; so too each
    ``up --cluster`` member's, which carries the same authorization beside its own cluster
    block (a reload re-reads the whole file, so the cluster settings must be in it)."""
    authorization = server_authorization(read_registry(directory))
    write_private(path, json.dumps({"authorization": authorization}, indent=2) + "\n")
    for member in sorted(path.parent.parent.glob(f"nats-cluster/n*/{MEMBER_CONFIG}")):
        config = json.loads(member.read_text())
        config["authorization"] = authorization
        write_private(member, json.dumps(config, indent=2) + "\n")


def signal_reload(pid_file: Path) -> None:
    """Ask the running server (by its pid file) to re-read its configuration."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        raise ConfigError("nats.not_running", f"{pid_file}: no running server") from None
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        raise ConfigError("nats.not_running", f"process {pid} is gone") from None
    if Path(os.fsdecode(command)).name != "nats-server":
        # A stale pid file whose number now belongs to another process: never signal that.
        raise ConfigError("nats.not_running", f"process {pid} is not nats-server")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ConfigError("nats.not_running", f"process {pid} is gone") from None
