"""Test helpers for authenticated NATS: a server admitting only our identities, and a probe
that reports which publishes and subscriptions the server did *not* refuse."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import nats

from services.mesh import authconf, identities
from services.mesh.server import NatsServer


@contextlib.contextmanager
def authenticated_server(
    data_dir: Path, *, families: Iterable[str] = ("snp",), nodes: Iterable[str] = ()
) -> Iterator[tuple[NatsServer, dict[str, str]]]:
    """A loopback nats-server configured like ``attestmesh up``'s, with seeds for the
    services of ``families``, the admin and each of ``nodes``: (server, identity -> seed)."""
    directory = authconf.identities_dir(data_dir)
    names = [
        *identities.service_identities(families),
        identities.ADMIN,
        *(identities.node_identity(n) for n in nodes),
    ]
    seeds = {name: str(authconf.ensure(directory, name)) for name in names}
    authconf.write_server_config(authconf.server_config_path(data_dir), directory)
    server = NatsServer(
        authconf.server_store_dir(data_dir), config_file=authconf.server_config_path(data_dir)
    )
    server.start()
    try:
        yield server, seeds
    finally:
        server.stop()


async def not_refused(
    url: str,
    seed: str,
    attempts: Iterable[tuple[str, str]],
    *,
    inbox_prefix: str = "_INBOX",
) -> list[str]:
    """Try each (``pub``|``sub``, subject) as the identity of ``seed``; return the subjects
    the server did not refuse with a permissions violation."""
    attempts = list(attempts)
    refused: list[str] = []

    async def on_error(exc: Exception) -> None:
        refused.append(str(exc).lower())

    nc = await nats.connect(
        url,
        nkeys_seed=seed,
        error_cb=on_error,
        allow_reconnect=False,
        inbox_prefix=inbox_prefix,
    )
    try:
        for kind, subject in attempts:
            if kind == "pub":
                await nc.publish(subject, b"{}")
            else:
                await nc.subscribe(subject)
        await nc.flush(timeout=5)
        await asyncio.sleep(0.05)
    finally:
        await nc.close()
    return [s for _, s in attempts if not any(f'"{s.lower()}"' in r for r in refused)]
