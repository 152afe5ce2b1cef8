"""The secrets a collector holds: kept in memory, per resource, until revoked or replaced.

A released secret is only as good as the decision it was released under. When the broker
withdraws that decision (``attest.revoked.<node>``), the node must stop using what it
received, so the collector keeps every secret in one place it owns and can empty at once:
:meth:`HeldSecrets.drop` overwrites each value's buffer with zeros and forgets it. Python
cannot promise that no other copy survives (the bytes the HPKE open returned, or a copy an
application took, live until the garbage collector reuses them); what this guarantees is
that nothing the collector keeps still answers a read after a drop, and that the buffers it
owns do not keep the value. Nothing here is written to disk.

Values never appear in ``repr``, logs or exceptions; only resource names and counts do.
"""

from __future__ import annotations

import threading

from services.broker.store import MAX_SECRET_SIZE
from services.mesh.errors import ConfigError

MAX_HELD = 64
"""Resources one node holds at most (a collector asks for one; an embedding app a few)."""


class HeldSecrets:
    """Resource -> secret value, each in a buffer this holder owns and zeroes on drop.

    Thread-safe, because an embedding application may read from another thread while the
    collector's event loop drops on a revocation.
    """

    def __init__(self, *, max_held: int = MAX_HELD) -> None:
        self._values: dict[str, bytearray] = {}
        self._lock = threading.Lock()
        self._max_held = max_held

    def __repr__(self) -> str:
        return f"HeldSecrets(held={len(self)})"

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)

    def __contains__(self, resource: object) -> bool:
        with self._lock:
            return resource in self._values

    def resources(self) -> list[str]:
        with self._lock:
            return sorted(self._values)

    def put(self, resource: str, value: bytes) -> None:
        """Hold ``value`` for ``resource``, zeroing the value it replaces."""
        if len(value) > MAX_SECRET_SIZE:
            raise ConfigError("collector.secret_too_large", f"{resource}: over the bound")
        with self._lock:
            if resource not in self._values and len(self._values) >= self._max_held:
                raise ConfigError("collector.too_many_secrets", f"at most {self._max_held}")
            old = self._values.get(resource)
            self._values[resource] = bytearray(value)
            if old is not None:
                _zero(old)

    def get(self, resource: str) -> bytes | None:
        """A copy of the held value (the caller's to forget), or ``None`` after a drop."""
        with self._lock:
            held = self._values.get(resource)
            return None if held is None else bytes(held)

    def drop(self) -> int:
        """Overwrite and forget every held value; return how many there were."""
        with self._lock:
            values, self._values = self._values, {}
        for buffer in values.values():
            _zero(buffer)
        return len(values)


def _zero(buffer: bytearray) -> None:
    buffer[:] = bytes(len(buffer))
