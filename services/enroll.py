"""``attestmesh node enroll NAME``: issue one TEE node's NATS identity and what it needs.

The node gets, in ``--out`` (directory 0700, files 0600):

* ``node-<NAME>.nk`` — its nkey seed; the server lets it publish only its own nonce request,
  evidence and secret request, and read only its own replies, decisions and revocations;
* ``config.json`` — ``nats_url``, the seed file and a keys directory;
* ``keys/trusted/policy.pem`` — the policy service's public key, so the collector can verify
  the decisions it receives.

For the embedded default (a data directory holding ``identities/users.json``) the node's
public key is registered, the server configuration rewritten and the running server told to
re-read it, so the node can connect at once. For any other deployment (the Helm chart) it
writes ``values.json`` with the node's public key under ``collector.nodeIdentities.nodes``:
merge it into the release's values and ``helm upgrade``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from services.mesh import authconf, identities, subjects
from services.mesh import config as config_mod
from services.mesh.errors import ConfigError


@dataclass(frozen=True)
class Enrolled:
    node: str
    public_key: str
    seed_file: Path
    config_file: Path
    embedded: bool
    reloaded: bool
    values_file: Path | None


def enroll(node: str, config: config_mod.Config, out: Path, *, replace: bool = False) -> Enrolled:
    """Issue ``node``'s identity into ``out`` and admit it (see the module docstring).

    A node already registered with the embedded server keeps its key unless ``replace``
    (key rotation): enrolling a name twice by mistake must not lock the first node out.
    """
    subjects.token(node)
    identity = identities.node_identity(node)
    directory = authconf.identities_dir(Path(config.data_dir))
    if not replace and identity in authconf.read_registry(directory):
        raise ConfigError("enroll.exists", f"{identity} is enrolled already (--replace rotates)")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    seed, public = authconf.new_user()
    seed_path = authconf.seed_file(out, identity)
    authconf.write_private(seed_path, seed + "\n")

    keys_dir = out / "keys"
    policy_pem = config.trusted_keys_path / "policy.pem"
    if not policy_pem.is_file():
        raise ConfigError("enroll.no_policy_key", f"{policy_pem} not found")
    (keys_dir / "trusted").mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copyfile(policy_pem, keys_dir / "trusted" / "policy.pem")

    node_config = config_mod.Config(
        nats_url=config.nats_url,
        nats_nkey_seed_file=str(seed_path.resolve()),
        data_dir=str(out.resolve()),
        keys_dir=str(keys_dir.resolve()),
    )
    config_path = out / "config.json"
    authconf.write_private(config_path, json.dumps(_public_fields(node_config), indent=2) + "\n")

    data_dir = Path(config.data_dir)
    embedded = (directory / authconf.REGISTRY).is_file()
    reloaded = False
    values_file = None
    if embedded:
        authconf.register(directory, identity, public)
        authconf.write_server_config(authconf.server_config_path(data_dir), directory)
        for pid_file in authconf.server_pid_files(data_dir):
            try:
                authconf.signal_reload(pid_file)
                reloaded = True
            except ConfigError:
                continue  # not running: `attestmesh up` reads the registry when it starts
    else:
        values = {"collector": {"nodeIdentities": {"nodes": {node: public}}}}
        values_file = out / "values.json"
        authconf.write_private(values_file, json.dumps(values, indent=2) + "\n")
    return Enrolled(node, public, seed_path, config_path, embedded, reloaded, values_file)


def _public_fields(config: config_mod.Config) -> dict[str, object]:
    return {
        "nats_url": config.nats_url,
        "nats_nkey_seed_file": config.nats_nkey_seed_file,
        "data_dir": config.data_dir,
        "keys_dir": config.keys_dir,
    }
