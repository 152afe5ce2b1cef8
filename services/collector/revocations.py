"""A collector listening on its own revocation subject, ``attest.revoked.<node>``.

The broker announces there that the node's decision was withdrawn (a re-appraisal after a
policy, reference-value or collateral change, or evidence that failed). What the collector
does with it is always safe whoever sent it: drop what it holds and attest again. A
revocation grants nothing and is believed about nothing, so it carries no signature. The
NATS permissions still let only the broker publish it and only the node read it
(:mod:`services.mesh.identities`), so another node cannot make a victim drop its secrets
and re-attest over and over; ``tests/test_collector_revocation.py`` checks both on a real
server.

A message that does not decode as a :class:`~services.mesh.events.Revocation` for this node
is counted (by reason, here and in ``attestmesh_revocations_received_total``), logged and
ignored: the collector keeps running and keeps its secrets.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Callable

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.mesh import events, metrics, subjects, telemetry
from services.mesh.bus import Bus
from services.mesh.errors import ParseError

log = telemetry.logger("collector")

WRONG_NODE = "collector.revocation_wrong_node"
OTHER_REASON = "revocation.other"
_CODE = re.compile(r"[a-z0-9_-]{1,32}(?:\.[a-z0-9_-]{1,32}){1,3}")


def reason_code(text: str) -> str:
    """The revocation's reason if it is a short dotted code, else ``revocation.other``:
    it goes into logs and an application's hook, so its shape is bounded here."""
    return text if _CODE.fullmatch(text) else OTHER_REASON


class RevocationWatch:
    """Subscribes to the node's revocation subject while entered; calls ``on_revocation``
    with the reason code of each revocation that names this node."""

    def __init__(self, bus: Bus, node: str, on_revocation: Callable[[str], None]) -> None:
        self.bus = bus
        self.node = subjects.token(node)
        self.on_revocation = on_revocation
        self.received = 0
        """Revocations acted on so far."""
        self.ignored: Counter[str] = Counter()
        """Messages on the subject that were not a revocation for this node, by reason."""
        self._sub: Subscription | None = None

    async def __aenter__(self) -> RevocationWatch:
        self._sub = await self.bus.nc.subscribe(subjects.revoked(self.node), cb=self._on_msg)
        return self

    async def __aexit__(self, *_: object) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        self.handle(msg.data)

    def handle(self, data: bytes) -> None:
        try:
            revocation = events.decode(data, events.Revocation)
            if revocation.node != self.node:
                raise ParseError(WRONG_NODE, "the body names another node")
        except ParseError as exc:
            self.ignored[exc.reason] += 1
            metrics.revocations_received.add(1, {"outcome": "ignored", "reason": exc.reason})
            log.warning("revocation.ignored", node=self.node, reason=exc.reason)
            return
        self.received += 1
        reason = reason_code(revocation.reason)
        metrics.revocations_received.add(1, {"outcome": "applied", "reason": reason})
        self.on_revocation(reason)
