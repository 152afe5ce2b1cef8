"""Loopback ports chosen ahead of the process that binds them: a cluster's route ports (every
member must know its peers' before any starts) and each service's metrics port (``up`` writes
the scrape map before the services start).

Why not the usual "bind port 0, read it, close it": that port comes from the kernel's
ephemeral range, the very range every outgoing connection takes its local port from. Between
the probe and the child's bind (a second or two of imports on a busy machine) any of the
mesh's own client connections can land on it, and the child fails to start (seen: a broker's
metrics server, ``Address already in use``, restarted by ``up``). A port below that range is
never handed out implicitly, so only another explicit bind can take it.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Collection
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10_000
"""Below this are well-known and registered services' customary ports: left alone."""
_DEFAULT_EPHEMERAL = (32768, 60999)
_ATTEMPTS = 64
_pick = random.SystemRandom()


def ephemeral_range(source: Path = EPHEMERAL_RANGE) -> tuple[int, int]:
    """The kernel's range for implicitly assigned ports (Linux's default where unreadable)."""
    try:
        low, high = (int(word) for word in source.read_text().split())
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL
    if not 0 < low <= high <= 65535:
        return _DEFAULT_EPHEMERAL
    return low, high


def candidates(ephemeral: tuple[int, int]) -> range:
    """The ports to choose from: the larger stretch outside ``ephemeral`` and above
    :data:`LOWEST` (empty when the ephemeral range leaves no room)."""
    low, high = ephemeral
    below, above = range(LOWEST, max(low, LOWEST)), range(max(high + 1, LOWEST), 65536)
    return below if len(below) >= len(above) else above


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be bound on ``host`` right now (as a listener binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(
    host: str = "127.0.0.1",
    *,
    ephemeral: tuple[int, int] | None = None,
    avoid: Collection[int] = (),
) -> int:
    """A port free on ``host`` now and not in ``avoid`` (ports already handed out but not
    bound yet), outside the ephemeral range where there is room (a random one, so that
    concurrent pickers rarely meet); else one the kernel picks."""
    choices = candidates(ephemeral or ephemeral_range())
    for _ in range(_ATTEMPTS if choices else 0):
        port = _pick.choice(choices)
        if port not in avoid and port_free(port, host):
            return port
    for _ in range(_ATTEMPTS):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            chosen: int = probe.getsockname()[1]
        if chosen not in avoid:
            return chosen
    raise OSError(f"no free port on {host}")
