"""A JetStream cluster on one machine: what `attestmesh up --cluster N` and the fault tests run.

Why a real cluster rather than one server: a deployment that outgrows one server runs NATS as
a JetStream cluster (the Helm chart runs three), and what makes the mesh survive the loss of a
server is the cluster's replication and the clients' failover. The embedded default should
exercise that engine. Each server is the same ``nats-server`` binary as the single embedded
one, on loopback, with its own JetStream store, routes to every peer, and (optionally) the
same authorization file, so identities and permissions are exactly those of the single server.

The settings every member of the mesh derives from the cluster's size live here, once:
:func:`replicas_for` (how many copies JetStream keeps of each stream and bucket) and
:func:`client_url` (the comma-separated URLs clients connect to, so losing any one server
leaves them a way in). The chart's test checks the chart derives the same replica count.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from services.mesh.authconf import MEMBER_CONFIG
from services.mesh.errors import ConfigError
from services.mesh.keys import write_private
from services.mesh.ports import free_port
from services.mesh.server import ClusterRole, NatsServer

MAX_SERVERS = 5


def replicas_for(servers: int) -> int:
    """Copies of each stream and bucket: three on a cluster of three or more (a majority
    survives the loss of any one server), one on a single server."""
    if servers < 1:
        raise ConfigError("cluster.size_invalid", f"a cluster needs a server, not {servers}")
    return 3 if servers >= 3 else 1


def client_url(urls: list[str]) -> str:
    """The value of ``nats_url`` for a cluster: every server's URL, comma-separated."""
    if not urls:
        raise ConfigError("cluster.no_servers", "no server URLs")
    return ",".join(urls)


def server_urls(nats_url: str) -> list[str]:
    """The server URLs a ``nats_url`` names (one, or a comma-separated list)."""
    urls = [u.strip() for u in nats_url.split(",") if u.strip()]
    if not urls:
        raise ConfigError("config.invalid", "nats_url names no server")
    return urls


class LocalCluster:
    """``size`` nats-server processes on loopback forming one JetStream cluster.

    Route ports are chosen before start (every member must know its peers'); client ports are
    picked by each server itself and fixed after its first start, so a restarted member comes
    back where its clients expect it.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        size: int = 3,
        config_file: Path | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        if not 1 <= size <= MAX_SERVERS:
            raise ConfigError("cluster.size_invalid", f"1..{MAX_SERVERS} servers, not {size}")
        ports: list[int] = []
        for _ in range(size):
            ports.append(free_port(host, avoid=ports))
        routes = tuple(f"nats://{host}:{port}" for port in ports)
        self.servers = []
        for i, port in enumerate(ports):
            role = ClusterRole(server_name=f"n{i + 1}", cluster_port=port, routes=routes)
            store = base_dir / f"n{i + 1}"
            member_config = None
            if config_file is not None:
                # The cluster block goes into the member's own file beside the shared
                # settings: a reload (a node enrolled) re-reads the file and would otherwise
                # lose the flags, and refuse to run a JetStream cluster without a name.
                member_config = store / MEMBER_CONFIG
                settings = json.loads(config_file.read_text())
                settings.update(role.settings(host))
                store.mkdir(parents=True, exist_ok=True)
                write_private(member_config, (json.dumps(settings, indent=2) + "\n").encode())
                role = dataclasses.replace(role, in_config=True)
            self.servers.append(
                NatsServer(store, host=host, config_file=member_config, cluster=role)
            )

    @property
    def size(self) -> int:
        return len(self.servers)

    @property
    def url(self) -> str:
        """What clients connect to: every member's client URL."""
        return client_url([server.url for server in self.servers])

    @property
    def replicas(self) -> int:
        return replicas_for(self.size)

    def start(self) -> None:
        started: list[NatsServer] = []
        try:
            for server in self.servers:
                server.start()
                started.append(server)
        except Exception:
            for server in started:
                server.stop()
            raise

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
