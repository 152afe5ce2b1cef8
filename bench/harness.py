"""The mesh a benchmark measures, brought up in a temporary directory and torn down after.

What runs is what ``attestmesh up`` runs (:mod:`services.embedded`): a local nats-server with
file storage admitting only the provisioned identities, the signed seeds, and every service
as its own supervised process, with ``processes`` replicas of the SNP verifier (the family
the benchmarks drive). Every simulated node gets its own NATS identity beforehand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import proc
from services.collector.service import DEFAULT_RESOURCE
from services.embedded import (
    Mesh,
    as_identity,
    prepare,
    provision_identities,
    seed_policy,
    seed_refvalues,
    seed_secret,
)
from services.mesh import authconf, identities
from services.mesh.config import Config
from services.mesh.server import NatsServer

FAMILY = "snp"
NATS_SERVER = "nats-server"


@dataclass(frozen=True)
class Running:
    """One running mesh: its data directory, shared configuration and processes."""

    data_dir: Path
    config: Config
    config_path: Path
    seeds: dict[str, Path]
    mesh: Mesh
    server: NatsServer

    @property
    def admin(self) -> Config:
        return as_identity(self.config, self.seeds.get(identities.ADMIN))

    def pids(self) -> dict[str, int]:
        """Every mesh process by name (the supervisor's children and ``nats-server``), read
        afresh: a service the supervisor restarted has a new pid."""
        pids = proc.read_pids(self.mesh.pids_file) if self.mesh.pids_file else {}
        pids[NATS_SERVER] = int(self.server.pid_file.read_text().strip())
        return pids


def provision_nodes(directory: Path, nodes: Sequence[str]) -> dict[str, Path]:
    """A NATS identity (seed file) per node, registered in one write.

    :func:`services.mesh.authconf.ensure` rewrites the registry once per identity, fine for
    ``up``'s handful of nodes but quadratic for a fleet of thousands."""
    users = authconf.read_registry(directory)
    seeds: dict[str, Path] = {}
    for node in nodes:
        identity = identities.node_identity(node)
        identities.permissions(identity)  # as register(): only identities with permissions
        seed, public = authconf.new_user()
        path = authconf.seed_file(directory, identity)
        authconf.write_private(path, seed + "\n")
        users[identity] = public
        seeds[identity] = path
    registry = json.dumps(users, indent=2, sort_keys=True) + "\n"
    authconf.write_private(directory / authconf.REGISTRY, registry)
    return seeds


@contextlib.contextmanager
def running_mesh(nodes: Sequence[str], *, processes: int) -> Iterator[Running]:
    """The mesh with identities for ``nodes``, every process stopped and its temporary data
    directory removed on leaving, however the block ends."""
    with tempfile.TemporaryDirectory(prefix="attestmesh-bench-") as tmp:
        data_dir = Path(tmp)
        seeds = provision_identities(data_dir, 0)
        directory = authconf.identities_dir(data_dir)
        seeds.update(provision_nodes(directory, nodes))
        authconf.write_server_config(authconf.server_config_path(data_dir), directory)
        server = NatsServer(
            authconf.server_store_dir(data_dir), config_file=authconf.server_config_path(data_dir)
        )
        server.start()
        mesh: Mesh | None = None
        try:
            config, config_path = prepare(data_dir, server.url)
            admin = as_identity(config, seeds.get(identities.ADMIN))
            broker = as_identity(config, seeds.get(identities.BROKER))
            asyncio.run(seed_secret(broker, DEFAULT_RESOURCE))
            asyncio.run(seed_policy(admin))
            asyncio.run(seed_refvalues(admin))
            mesh = Mesh(
                config,
                config_path,
                data_dir / "logs",
                seeds,
                replicas=processes,
                replicated=frozenset({f"verifier-{FAMILY}"}),
                pids_file=data_dir / "pids.json",
            )
            mesh.start()
            yield Running(data_dir, config, config_path, seeds, mesh, server)
        finally:
            if mesh is not None:
                mesh.stop()
            server.stop()
