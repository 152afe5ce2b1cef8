"""Event-driven revocation: re-check recent evidence when the shared collateral changes.

A verdict is only as current as the collateral it was reached with. When an entry of the
``collateral`` bucket changes (a new AMD CRL revoking an ASK, Intel TCB info after a TCB
recovery), the verifier re-appraises the last evidence each node had verified here, with the
new collateral and the current time. If a node's evidence now fares worse, it publishes a
re-appraisal verdict; the policy service turns a contraindicated one into a deny decision and
the broker withdraws the node's access and announces ``attest.revoked.<node>``. A fresh
attestation by the node then starts over.

The memory is per replica and bounded (least recently verified nodes are forgotten first):
this speeds revocation up, while decision expiry and re-attestation remain the guarantee. It
holds only authenticated evidence, one per node *and hardware identity*: evidence from other
hardware under a node's name (which the policy refuses) must not displace the node's own, or
it would shield the node from revocation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from typing import TYPE_CHECKING

import nats.errors

from services.mesh import events, subjects, telemetry
from services.verifier.families.base import SEVERITY, Status

if TYPE_CHECKING:
    from services.verifier.worker import VerifierWorker

log = telemetry.logger("reappraisal")
tracer = telemetry.tracer("verifier")

MAX_NODES = 10_000
SETTLE_SECONDS = 0.2


class Reappraiser:
    def __init__(self, worker: VerifierWorker, *, max_nodes: int = MAX_NODES) -> None:
        self.worker = worker
        self.max_nodes = max_nodes
        self.latest: OrderedDict[tuple[str, str], tuple[events.EvidenceEvent, Status]] = (
            OrderedDict()
        )

    def remember(self, event: events.EvidenceEvent, status: Status, hwid: str = "") -> None:
        """Keep ``event`` as the latest evidence of its node on hardware ``hwid`` (unless an
        older one arrived late)."""
        key = (event.node, hwid)
        known = self.latest.get(key)
        if known is not None and known[0].collected_at > event.collected_at:
            return
        self.latest[key] = (event, status)
        self.latest.move_to_end(key)
        while len(self.latest) > self.max_nodes:
            self.latest.popitem(last=False)

    async def reappraise_all(self) -> int:
        """Re-check every remembered node; return how many got worse."""
        worse = 0
        for key, (event, before) in list(self.latest.items()):
            node = key[0]
            with tracer.start_as_current_span("verifier.reappraise") as span:
                span.set_attribute("attestmesh.node", node)
                extra = await self.worker.fetch_collateral(event)
                appraisal = await asyncio.to_thread(self.worker.appraise, event, node, extra)
                span.set_attribute("attestmesh.status", str(appraisal.status))
                if SEVERITY[appraisal.status] <= SEVERITY[before]:
                    continue
                worse += 1
                self.latest[key] = (event, appraisal.status)
                await self.worker.publish_verdict(
                    event, appraisal, reappraisal=True, proven_hwid=key[1]
                )
        return worse

    async def watch(self, stop: asyncio.Event) -> None:
        """Re-appraise after each burst of changes to the collateral bucket."""
        bucket = await self.worker.bus.key_value(subjects.BUCKET_COLLATERAL)
        watcher = await bucket.watchall(include_history=False)
        replayed = False
        try:
            while not stop.is_set():
                try:
                    entry = await watcher.updates(timeout=0.5)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                if entry is None:
                    replayed = True  # the current values have been replayed; changes follow
                    continue
                if not replayed:
                    continue
                with contextlib.suppress(nats.errors.TimeoutError, TimeoutError):
                    while await watcher.updates(timeout=SETTLE_SECONDS) is not None:
                        pass
                if self.worker.fetched is not None:
                    self.worker.fetched.forget()  # judge by the bucket as it is now
                worse = await self.reappraise_all()
                log.info("collateral.changed", reappraised=len(self.latest), worse=worse)
        finally:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await watcher.stop()
