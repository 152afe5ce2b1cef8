"""The verifier worker: evidence in, signed EAR verdict out, one family per worker.

Verification is pure and CPU-bound, so it runs in a worker thread while the event loop keeps
acknowledging and fetching. The verdict's id is derived from the evidence's id, so a
redelivered evidence message yields a de-duplicated verdict rather than a second one.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Mapping
from datetime import datetime

from nats.aio.msg import Msg

from services.mesh import events, metrics, subjects, telemetry
from services.mesh.bus import Bus
from services.mesh.errors import ParseError
from services.mesh.keys import SigningKey
from services.verifier import ear
from services.verifier.collateral import CollateralCache, Planner
from services.verifier.families.base import (
    Appraisal,
    FamilyVerifier,
    Reason,
    Status,
    VerifyOptions,
    appraise_untrusted,
    unparsable,
)
from services.verifier.families.dcap.ccel import CCEL_FILE
from services.verifier.reappraisal import Reappraiser
from services.verifier.trust import TrustStore

log = telemetry.logger("verifier")
tracer = telemetry.tracer("verifier")


def expected_report_data(nonce: bytes, public_key: bytes) -> bytes:
    """REPORT_DATA a node must bind: SHA-512(nonce || its ephemeral public key)."""
    return hashlib.sha512(nonce + public_key).digest()


def derived_id(kind: str, source_id: str) -> str:
    return hashlib.sha256(f"{kind}:{source_id}".encode()).hexdigest()[:32]


def evidence_collateral(evidence: events.Evidence) -> dict[str, bytes]:
    """Collateral that travels inside the evidence: a TDX node's CCEL event log (``ccel.bin``).

    Handing it over as a collateral file keeps the family interface bytes-in, and lets
    ``attestmesh verify --collateral DIR`` replay a saved log the same way. It is the node's
    own, so it overrides any file of that name among the worker's collateral.
    """
    if isinstance(evidence, events.TdxEvidence) and evidence.event_log is not None:
        return {CCEL_FILE: evidence.event_log}
    return {}


class VerifierWorker:
    """Consumes ``attest.evidence.<family>.*`` and publishes ``attest.verdict.<family>.<node>``."""

    def __init__(
        self,
        bus: Bus,
        family: str,
        verifier: FamilyVerifier,
        key: SigningKey,
        trust: TrustStore,
        *,
        collateral: Mapping[str, bytes] | None = None,
        clock: Callable[[], datetime] = events.utcnow,
        verdict_ttl: float = 300.0,
        offline: bool = True,
        planner: Planner | None = None,
        fetched: CollateralCache | None = None,
        reappraise: bool = False,
    ) -> None:
        self.bus = bus
        self.family = family
        self.verifier = verifier
        self.key = key
        self.trust = trust
        self.collateral = dict(collateral or {})
        self.clock = clock
        self.verdict_ttl = verdict_ttl
        self.offline = offline
        self.planner = planner
        self.fetched = fetched
        self.reappraiser = Reappraiser(self) if reappraise else None

    async def run(
        self, stop: asyncio.Event, *, max_deliver: int = 5, ack_wait: float = 30.0
    ) -> None:
        consuming = self.bus.consume(
            stream=subjects.STREAM_EVIDENCE,
            durable=f"verifier-{self.family}",
            subject=subjects.evidence_family(self.family),
            handler=self.handle,
            stop=stop,
            max_deliver=max_deliver,
            ack_wait=ack_wait,
        )
        if self.reappraiser is None:
            await consuming
        else:
            await asyncio.gather(consuming, self.reappraiser.watch(stop))

    async def handle(self, msg: Msg) -> None:
        with tracer.start_as_current_span(
            "verifier.verify", context=telemetry.extract(msg.headers)
        ) as span:
            event = events.decode(msg.data, events.EvidenceEvent)
            span.set_attribute("attestmesh.node", event.node)
            span.set_attribute("attestmesh.family", self.family)
            metrics.evidence_received.add(1, {"family": self.family})
            extra = await self.fetch_collateral(event)
            started = time.perf_counter()
            appraisal = await asyncio.to_thread(
                self.appraise, event, subjects.node_of(msg.subject), extra
            )
            metrics.verification_seconds.record(
                time.perf_counter() - started, {"family": self.family}
            )
            span.set_attribute("attestmesh.status", str(appraisal.status))
            span.set_attribute("attestmesh.reasons", [r.code for r in appraisal.reasons])
            span.set_attribute("attestmesh.authenticated", appraisal.authenticated)
            await self.publish_verdict(event, appraisal)
            if self.reappraiser is not None and appraisal.authenticated:
                # Only evidence that proved it is the node may later revoke the node.
                self.reappraiser.remember(event, appraisal.status, appraisal.hwid)

    async def publish_verdict(
        self,
        event: events.EvidenceEvent,
        appraisal: Appraisal,
        *,
        reappraisal: bool = False,
        proven_hwid: str = "",
    ) -> None:
        """Sign ``appraisal`` of ``event`` as an EAR and publish it as the node's verdict.

        A first verdict's id derives from the evidence id (redeliveries de-duplicate); a
        re-appraisal's from the evidence id and its outcome, so each change is published once.
        """
        subject = ear.Subject(
            node=event.node,
            evidence_id=event.id,
            nonce=event.nonce,
            public_key=event.public_key,
            simulated=event.simulated,
        )
        token = ear.issue(
            self.key,
            appraisal,
            subject,
            now=self.clock(),
            ttl=self.verdict_ttl,
            reappraisal=reappraisal,
            proven_hwid=proven_hwid,
        )
        source = event.id
        if reappraisal:
            source += ":" + ",".join(sorted(r.code for r in appraisal.reasons))
        verdict = events.Verdict(
            id=derived_id("reappraisal" if reappraisal else "verdict", source),
            node=event.node,
            family=self.family,
            evidence_id=event.id,
            status=appraisal.status.value,
            ear=token,
        )
        await self.bus.publish(subjects.verdict(self.family, event.node), verdict)
        metrics.verdicts.add(1, {"family": self.family, "status": appraisal.status.value})
        log.info(
            "verdict.published",
            node=event.node,
            family=self.family,
            status=str(appraisal.status),
            reasons=[r.code for r in appraisal.reasons],
            authenticated=appraisal.authenticated,
            reappraisal=reappraisal,
        )

    async def fetch_collateral(self, event: events.EvidenceEvent) -> dict[str, bytes]:
        """Collateral the evidence lacks, from the shared cache or the vendor."""
        if self.planner is None or self.fetched is None:
            return {}
        wanted = self.planner(events.evidence_bytes(event.evidence), self.collateral)
        return await self.fetched.resolve(wanted) if wanted else {}

    def appraise(
        self,
        event: events.EvidenceEvent,
        subject_node: str,
        extra: Mapping[str, bytes] | None = None,
    ) -> Appraisal:
        """Check the envelope, then let the family verify the evidence itself.

        Evidence whose envelope disagrees with it (another node's subject, another family) is
        never authenticated: it cannot speak for the node named on either side.
        """
        family = events.family_of(event.evidence)
        if family != self.family or subject_node != event.node:
            return Appraisal(
                family=self.family,
                status=Status.CONTRAINDICATED,
                reasons=[
                    Reason(
                        "wire.envelope_mismatch",
                        f"evidence of family {family} for node {event.node} "
                        f"arrived on the {self.family} subject of node {subject_node}",
                    )
                ],
            )
        options = VerifyOptions(
            now=self.clock(),
            trust=self.trust,
            collateral={**self.collateral, **(extra or {}), **evidence_collateral(event.evidence)},
            expected_report_data=expected_report_data(event.nonce, event.public_key),
            offline=self.offline,
        )
        try:
            evidence = events.evidence_bytes(event.evidence)
        except ParseError as exc:
            return unparsable(self.family, exc)
        return appraise_untrusted(self.verifier, evidence, options)
