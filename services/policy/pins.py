"""Hardware pinning: a node name belongs to the hardware that first attested under it.

The first authenticated attestation that the policy allows pins the node's name to the
hardware identity its evidence proved (``families.hwid``). Later evidence under that name
from any other hardware is refused as ``node.identity_mismatch`` and changes nothing: a
stolen or forged collector credential on another machine cannot take the name over, nor get
the real node revoked. Pins live in the ``node-pins`` bucket; every write is compare-and-set,
so racing policy replicas agree on one pin, and ``attestmesh node reset`` removes one (again
compare-and-set) when a node is deliberately rebuilt on new hardware.

A store remembers which hardware each node's pin named when it last read or wrote it
(bounded). That is a hint for the caller's scheduling, never a check: every decision is
taken on a fresh read.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime

import msgspec

from services.mesh import events
from services.mesh.errors import ParseError, Rejected
from services.mesh.kv import KeyValue, WriteConflictError

IDENTITY_MISMATCH = "node.identity_mismatch"
HWID_MISSING = "node.hwid_missing"
MAX_RETRIES = 16
MAX_REMEMBERED = 65_536


class Pin(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One node's pinned hardware identity and the attestation that pinned it."""

    hwid: str
    pinned_at: datetime
    evidence_id: str = ""


class PinStore:
    def __init__(self, kv: KeyValue, *, clock: Callable[[], datetime] = events.utcnow) -> None:
        self._kv = kv
        self._clock = clock
        self._seen: OrderedDict[str, str] = OrderedDict()
        """Per node, the hardware its pin named when last read or written here."""

    def expects(self, node: str, hwid: str) -> bool:
        """Whether ``node``'s pin named ``hwid`` when this store last saw it (a hint only)."""
        seen = self._seen.get(node)
        return bool(hwid) and seen is not None and hmac.compare_digest(seen.encode(), hwid.encode())

    def _saw(self, node: str, pin: Pin | None) -> None:
        self._seen.pop(node, None)
        if pin is not None:
            self._seen[node] = pin.hwid
            while len(self._seen) > MAX_REMEMBERED:
                self._seen.popitem(last=False)

    async def get(self, node: str) -> tuple[Pin, int] | None:
        """The node's pin and its revision; a record that does not decode fails closed."""
        entry = await self._kv.get(node)
        if entry is None:
            return None
        try:
            return msgspec.json.decode(entry[0], type=Pin), entry[1]
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise ParseError("node.pin_corrupt", "the node's pin record does not decode") from None

    async def check(self, node: str, hwid: str) -> bool:
        """Raise ``node.identity_mismatch`` if ``node`` is pinned to other hardware; return
        whether it is pinned at all. Evidence naming no hardware never matches a pin."""
        found = await self.get(node)
        self._saw(node, found[0] if found else None)
        if found is None:
            return False
        _matches(found[0], hwid)
        return True

    async def pin(self, node: str, hwid: str, *, evidence_id: str = "") -> None:
        """Pin ``node`` to ``hwid`` unless pinned already; a racing pin to other hardware
        wins and this one is refused as a mismatch."""
        if not hwid:
            raise Rejected(HWID_MISSING, "the evidence names no hardware identity to pin")
        record = Pin(hwid=hwid, pinned_at=self._clock(), evidence_id=evidence_id)
        for _ in range(MAX_RETRIES):
            found = await self.get(node)
            if found is not None:
                self._saw(node, found[0])
                _matches(found[0], hwid)
                return
            try:
                await self._kv.create(node, msgspec.json.encode(record))
            except WriteConflictError:
                continue
            self._saw(node, record)
            return
        raise Rejected("node.pin_conflict", "the pin kept changing under us")

    async def reset(self, node: str) -> Pin | None:
        """Remove the node's pin (compare-and-set); return what it was, ``None`` if unpinned."""
        self._saw(node, None)
        for _ in range(MAX_RETRIES):
            found = await self.get(node)
            if found is None:
                return None
            try:
                await self._kv.delete(node, last_revision=found[1])
                return found[0]
            except WriteConflictError:
                continue
        raise Rejected("node.pin_conflict", "the pin kept changing under us")


def _matches(pin: Pin, hwid: str) -> None:
    if not hwid or not hmac.compare_digest(pin.hwid.encode(), hwid.encode()):
        raise Rejected(IDENTITY_MISMATCH, "the evidence comes from other hardware than the pin")
