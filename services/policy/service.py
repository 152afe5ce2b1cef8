"""The policy service: issues nonces, appraises signed verdicts, publishes release decisions.

A verdict is acted on only if its EAR verifies under a known verifier key, its routing fields
agree with the signed content, and its nonce is fresh; anything else is dead-lettered with the
reason. The Rego policy and reference values live in KV as operator-signed documents and are
recompiled when they change (:mod:`services.policy.loader`); the service never writes or
signs them itself, so holding its key does not let anyone change what it allows.

Only evidence that proves it is the node may change the node's standing: a verdict on evidence
that did not authenticate (bad signature or chain, wrong binding, wrong subject), or that came
from other hardware than the node's pin (:mod:`.pins`), is dead-lettered and answered with a
signed *refusal* that tells the waiting collector its round failed while the broker keeps the
node's current decision. Such a verdict does not spend the nonce either, so junk sent with a
node's challenge cannot make the node's real evidence look like a replay (the one exception,
evidence from the hardware a node was pinned to in the instant after an operator reset that
pin, is described at :meth:`PolicyService.identify_and_spend`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any, TypeVar

import nats.errors
from nats.aio.msg import Msg
from opentelemetry import trace

from services.mesh import events, metrics, outage, subjects, telemetry
from services.mesh.bus import Bus
from services.mesh.errors import (
    AttestmeshError,
    ConfigError,
    ParseError,
    PolicyError,
    Rejected,
    Unavailable,
    VerificationError,
)
from services.mesh.keys import SigningKey, TrustedKeys
from services.mesh.natskv import NatsKeyValue
from services.mesh.responder import BACKLOG, BUSY
from services.policy import summary
from services.policy.admission import DEFAULT_MAX_BACKLOG, Admission
from services.policy.engine import Outcome, PolicyEngine
from services.policy.loader import UNAVAILABLE, Loader
from services.policy.nonces import MAC_PURPOSE, NonceStore, lifetime_for
from services.policy.pins import PinStore
from services.policy.reevaluation import Standing
from services.policy.release_policy import POLICY_KEY
from services.verifier import ear
from services.verifier.families.base import Status
from services.verifier.worker import derived_id

T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")

log = telemetry.logger("policy")
tracer = telemetry.tracer("policy")

__all__ = ["POLICY_KEY", "POLICY_SIGNER", "PolicyService"]

POLICY_SIGNER = "policy"
UNAUTHENTICATED = "evidence.unauthenticated"
RETRY_BLOCKED_S = 2.0
HISTORY_TIMEOUT_S = 5.0


async def together(first: Coroutine[Any, Any, A], second: Coroutine[Any, Any, B]) -> tuple[A, B]:
    """Run two steps concurrently; the first failure cancels the other and is raised as
    itself, since the consumer tells a rejection from a retryable failure by its type."""
    try:
        async with asyncio.TaskGroup() as group:
            one, two = group.create_task(first), group.create_task(second)
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return one.result(), two.result()


class PolicyService:
    def __init__(
        self,
        bus: Bus,
        key: SigningKey,
        trusted: TrustedKeys,
        *,
        settings: dict[str, Any] | None = None,
        nonce_ttl: float = 120.0,
        decision_ttl: float = 300.0,
        clock: Callable[[], datetime] = events.utcnow,
        pinning: bool = True,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
    ) -> None:
        self.bus = bus
        self.admission = Admission(bus.js, max_backlog=max_backlog) if bus is not None else None
        self.pinning = pinning
        self.pins: PinStore | None = None
        self.key = key
        self.trusted = trusted
        self.settings = settings or {}
        self.nonce_ttl = nonce_ttl
        self.decision_ttl = decision_ttl
        self.clock = clock
        self.loader: Loader | None = None
        self.nonces: NonceStore | None = None
        self.standing: Standing | None = None
        self.max_deliver = 5
        """The verdict consumer's delivery limit (set by :meth:`run`)."""

    async def start(self) -> None:
        """Start serving even with no usable policy: decisions are then denied with a reason
        (fail closed) until an operator-signed policy arrives, rather than crash-looping."""
        nonce_bucket = await self.bus.key_value(subjects.BUCKET_NONCES)
        try:
            bucket_ttl = (await nonce_bucket.status()).ttl
        except (nats.errors.Error, TimeoutError) as exc:
            raise outage.mapped(
                exc, unavailable="bus.unavailable", refused="bus.api_error", step="nonces bucket"
            ) from None
        try:
            lifetime = lifetime_for(self.nonce_ttl, bucket_ttl)
        except ValueError as exc:
            raise ConfigError("policy.nonce_bucket_ttl", str(exc)) from None
        if lifetime < self.nonce_ttl:
            log.warning("nonce.lifetime_shortened", configured=self.nonce_ttl, issued=lifetime)
        self.nonces = NonceStore(
            NatsKeyValue(nonce_bucket),
            self.key.derive(MAC_PURPOSE),
            ttl=lifetime,
            clock=self.clock,
            entry_ttl=bucket_ttl,
        )
        if self.pinning:
            self.pins = PinStore(
                NatsKeyValue(await self.bus.key_value(subjects.BUCKET_PINS)), clock=self.clock
            )
        self.standing = Standing(
            NatsKeyValue(await self.bus.key_value(subjects.BUCKET_APPRAISALS)),
            self.trusted,
            self.clock,
        )
        self.loader = Loader(
            NatsKeyValue(await self.bus.key_value(subjects.BUCKET_POLICIES)),
            NatsKeyValue(await self.bus.key_value(subjects.BUCKET_REFVALUES)),
            self.trusted,
            settings=self.settings,
            history=self.history,
            clock=self.clock,
        )
        await self.reload()
        if self.admission is not None:
            await self.admission.listen(self.bus.nc)
        await self.bus.serve(subjects.NONCE_ALL, self.on_nonce_request, queue="policy")

    async def history(self, bucket: str) -> dict[str, list[bytes]]:
        """Every key's retained values in ``bucket``, oldest first (deletions left out)."""
        kv = await self.bus.key_value(bucket)
        watcher = await kv.watch(">", include_history=True)
        found: dict[str, list[bytes]] = {}
        try:
            while True:
                entry = await watcher.updates(timeout=HISTORY_TIMEOUT_S)
                if entry is None:
                    return found
                if entry.operation is None and entry.value:
                    found.setdefault(entry.key, []).append(entry.value)
        finally:
            await watcher.stop()

    @property
    def engine(self) -> PolicyEngine | None:
        return self.loader.engine if self.loader else None

    async def reload(self) -> None:
        """Rebuild from KV; see :mod:`services.policy.loader` for what is refused and why.

        In a span of its own, so what the reload logs (``policy.loaded``, refusals of unsigned
        documents) carries a trace id an operator can follow like any attestation's."""
        assert self.loader is not None
        with tracer.start_as_current_span("policy.reload"):
            before = self.loader.engine
            await self.loader.reload()
            if before is not None and self.loader.engine is not before:
                await self.reevaluate()

    async def refresh(self) -> None:
        """Drop reference values that expired since the engine was built; nodes allowed on
        them are re-evaluated at once, as after any other tightening."""
        assert self.loader is not None
        before = self.loader.engine
        self.loader.refresh()
        if before is not None and self.loader.engine is not before:
            await self.reevaluate()

    async def reevaluate(self) -> int:
        """A rule changed: withdraw every allow decision the new rules would not make."""
        assert self.loader is not None and self.standing is not None
        engine = self.loader.engine
        if engine is None:
            return 0

        def evaluate(verdict: events.Verdict, result: ear.Result) -> tuple[bool, list[str]]:
            blocked = self.loader.blocked_for(result.family) if self.loader else [UNAVAILABLE]
            if blocked:
                return False, blocked
            outcome = self._evaluate(engine, self._document(verdict, result))
            return outcome.allow, outcome.reasons

        async def publish(verdict: events.Verdict, result: ear.Result, why: list[str]) -> None:
            await self.publish_decision(
                verdict, result, False, why, reappraisal=True, source=engine.policy_id
            )

        try:
            return await self.standing.reevaluate(evaluate, publish)
        except AttestmeshError as exc:
            log.error("reevaluation.failed", reason=exc.reason)
            return 0

    async def watch(self, stop: asyncio.Event) -> None:
        """Recompile whenever the policy or reference values change."""
        watchers = [
            await (await self.bus.key_value(b)).watchall(include_history=False)
            for b in (subjects.BUCKET_POLICIES, subjects.BUCKET_REFVALUES)
        ]
        initial_done = [False] * len(watchers)
        last_try = time.monotonic()
        while not stop.is_set():
            changed = False
            blocked = self.loader is not None and self.loader.blocked is not None
            if blocked and time.monotonic() - last_try > RETRY_BLOCKED_S:
                changed, last_try = True, time.monotonic()
            for i, watcher in enumerate(watchers):
                try:
                    entry = await watcher.updates(timeout=0.5)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                if entry is None:
                    initial_done[i] = changed = True  # catches writes made before watching
                elif initial_done[i]:
                    changed = True
            if changed:
                await self.reload()
            else:
                await self.refresh()

    async def run(
        self, stop: asyncio.Event, *, max_deliver: int = 5, ack_wait: float = 30.0
    ) -> None:
        self.max_deliver = max_deliver
        await asyncio.gather(
            self.bus.consume(
                stream=subjects.STREAM_VERDICTS,
                durable="policy",
                subject=subjects.VERDICT_ALL,
                handler=self.handle_verdict,
                stop=stop,
                max_deliver=max_deliver,
                ack_wait=ack_wait,
            ),
            self.watch(stop),
            *([self.admission.run(stop)] if self.admission is not None else []),
        )

    async def on_nonce_request(self, msg: Msg) -> events.Message:
        assert self.nonces is not None
        with tracer.start_as_current_span("policy.nonce", context=telemetry.extract(msg.headers)):
            try:
                request = events.decode(msg.data, events.NonceRequest)
            except ParseError as exc:
                log.warning("nonce.bad_request", reason=exc.reason)
                return events.Refusal(reason=exc.reason)
            if subjects.node_of(msg.subject) != request.node:
                # The subject is what the node's NATS identity was allowed to publish to; a
                # body naming another node is an attempt to obtain that node's challenge.
                log.warning("nonce.routing_mismatch", node=request.node)
                return events.Refusal(reason="policy.routing_mismatch")
            if self.admission is not None and not self.admission.admits(request.family):
                metrics.requests_shed.add(1, {"subject": subjects.NONCE_ALL, "reason": BACKLOG})
                hint = self.admission.retry_after_ms(request.family)
                return events.Refusal(reason=BUSY, retry_after_ms=hint)
            challenge = await self.nonces.issue(request.node)
            log.info("nonce.issued", node=request.node)
            return challenge

    async def handle_verdict(self, msg: Msg) -> None:
        """Appraise one verdict: EAR, routing, pin, nonce, policy, then the decision.

        The order is what the guarantees need: the pin is read before a decision is made,
        and the nonce spent before any decision is published (see :meth:`identify_and_spend`
        for when the two go out together). An allow's decision and the node's standing (the
        verdict a tightened rule would be re-checked against) are then written at the same
        time, one round trip instead of two: should one fail, the verdict is delivered again
        and both are written again, and a standing written without its decision can at most
        make a re-evaluation deny the node, never allow it. A deny is published first and the
        standing forgotten after, so a standing is never gone while the allow it backs may
        still be in force."""
        assert self.nonces is not None and self.loader is not None
        with tracer.start_as_current_span(
            "policy.appraise", context=telemetry.extract(msg.headers)
        ) as span:
            verdict = events.decode(msg.data, events.Verdict)
            span.set_attribute("attestmesh.node", verdict.node)
            accepted_at = self.clock()
            try:
                result = ear.read(verdict.ear, self.trusted, now=accepted_at)
            except VerificationError as exc:
                log.warning("verdict.rejected", node=verdict.node, reason=exc.reason)
                raise Rejected(exc.reason, exc.detail) from None
            if (
                result.subject.node != verdict.node
                or result.family != verdict.family
                or result.subject.evidence_id != verdict.evidence_id
                or result.status.value != verdict.status
                or subjects.node_of(msg.subject) != verdict.node
            ):
                raise Rejected("policy.routing_mismatch", "routing fields disagree with the EAR")
            if result.reappraisal:
                await self.revoke_on_reappraisal(verdict, result)
                return
            await self.defer_while_unreadable(msg)
            pinned = await self.identify_and_spend(verdict, result)
            await self.refresh()
            engine, blocked = self.loader.engine, self.loader.blocked_for(result.family)
            if blocked or engine is None:
                log.warning("verdict.denied_blocked", node=verdict.node, reasons=blocked)
                allow, reasons = False, blocked or [UNAVAILABLE]
            else:
                outcome = self._evaluate(engine, self._document(verdict, result))
                allow, reasons = outcome.allow, outcome.reasons
            if allow and self.pins is not None and not pinned:
                await self.refuse_on_error(
                    verdict,
                    result,
                    self.pins.pin(verdict.node, result.hwid, evidence_id=verdict.evidence_id),
                )
                log.info("node.pinned", node=verdict.node, hwid=result.hwid)
            span.set_attribute("attestmesh.allow", allow)
            assert self.standing is not None
            if allow:
                issued = self.clock()
                await together(
                    self.publish_decision(verdict, result, True, reasons, issued_at=issued),
                    self.standing.allowed(
                        verdict,
                        accepted_at=accepted_at,
                        decision_expires_at=issued + timedelta(seconds=self.decision_ttl),
                    ),
                )
            else:
                await self.publish_decision(verdict, result, False, reasons)
                await self.standing.denied(verdict.node)

    async def identify_and_spend(self, verdict: events.Verdict, result: ear.Result) -> bool:
        """Check the evidence's identity, then spend its nonce; return whether the node was
        pinned already.

        A verdict refused on identity must leave the nonce unspent, so the pin is read
        before the nonce is spent. When this replica last saw the node pinned to the very
        hardware the evidence proves, the read (which still decides) and the nonce's
        compare-and-set go out together instead, one round trip rather than two: the only
        verdict that can then be refused after spending its nonce is one from the hardware
        the node was pinned to until an operator reset the pin in that instant."""
        if (
            self.pins is not None
            and result.authenticated
            and self.pins.expects(verdict.node, result.hwid)
        ):
            pinned, _ = await together(
                self.check_identity(verdict, result), self.spend(verdict, result)
            )
            return pinned
        pinned = await self.check_identity(verdict, result)
        await self.spend(verdict, result)
        return pinned

    async def spend(self, verdict: events.Verdict, result: ear.Result) -> None:
        """Spend the verdict's nonce, or reject the verdict (a replay, another node's)."""
        assert self.nonces is not None
        try:
            await self.nonces.consume(result.subject.nonce, verdict.node, verdict.id)
        except Rejected as exc:
            log.warning("verdict.rejected", node=verdict.node, reason=exc.reason)
            trace.get_current_span().set_attribute("attestmesh.rejected", exc.reason)
            raise

    async def defer_while_unreadable(self, msg: Msg) -> None:
        """While the buckets cannot be read (a server failing over), put a fresh verdict off
        instead of denying it: a deny would revoke an honest node over the mesh's own hiccup.
        When no server answered, the consumer waits that out in place before it redelivers
        (:class:`Unavailable`); a refusal (a bucket gone) spends a delivery at once. The last
        delivery is decided (denied, blocked) as before, and this runs before the nonce is
        spent, so a later try can still use it."""
        loader = self.loader
        assert loader is not None
        if not loader.read_failed:
            return
        await self.reload()
        if loader.read_failed and msg.metadata.num_delivered < self.max_deliver:
            kind = Unavailable if loader.read_unanswered else PolicyError
            raise kind(loader.blocked or UNAVAILABLE, "deferred: state unreadable")

    @staticmethod
    def _document(verdict: events.Verdict, result: ear.Result) -> dict[str, Any]:
        """The release policy's input: what the signed EAR says about the evidence."""
        return {
            "family": result.family,
            "status": str(result.status),
            "verified": result.verified,
            "claims": result.claims,
            "reasons": [r.get("code", "") for r in result.reasons],
            "simulated": result.subject.simulated,
            "node": verdict.node,
        }

    @staticmethod
    def _evaluate(engine: PolicyEngine, document: dict[str, Any]) -> Outcome:
        """An evaluation error is a deny naming it, never a crash or a retry loop."""
        try:
            return engine.evaluate(document)
        except PolicyError as exc:
            log.error("policy.evaluation_failed", reason=exc.reason)
            return Outcome(allow=False, reasons=[exc.reason])

    async def check_identity(self, verdict: events.Verdict, result: ear.Result) -> bool:
        """Refuse evidence that did not prove it is the node, or that comes from other
        hardware than the node's pin; return whether the node is pinned already."""
        if not result.authenticated:
            codes = ",".join(r.get("code", "") for r in result.reasons)[: events.MAX_DETAIL]
            await self.refuse(verdict, result, UNAUTHENTICATED)
            raise Rejected(UNAUTHENTICATED, codes or "the verifier did not authenticate it")
        if self.pins is None:
            return False
        return await self.refuse_on_error(
            verdict, result, self.pins.check(verdict.node, result.hwid)
        )

    async def refuse_on_error(
        self, verdict: events.Verdict, result: ear.Result, step: Awaitable[T]
    ) -> T:
        """Await a pin step; when it refuses the evidence, tell the collector, then re-raise."""
        try:
            return await step
        except Rejected as exc:
            log.warning("verdict.refused", node=verdict.node, reason=exc.reason)
            await self.refuse(verdict, result, exc.reason)
            raise

    async def refuse(self, verdict: events.Verdict, result: ear.Result, reason: str) -> None:
        """Publish a signed refusal on the node's decision subject: the collector waiting for
        this evidence learns its round failed; the broker records and revokes nothing."""
        now = self.clock()
        refusal_id = derived_id("refusal", verdict.id)
        token = self.key.sign(
            {
                "iat": int(now.timestamp()),
                "exp": int(now.timestamp()) + int(self.decision_ttl),
                "jti": refusal_id,
                "node": verdict.node,
                "family": result.family,
                "status": str(Status.CONTRAINDICATED),
                "allow": False,
                "refused": True,
                "reasons": [reason] + [r.get("code", "") for r in result.reasons],
                "public_key": ear.b64url(result.subject.public_key),
                "verdict_id": verdict.id,
                "evidence_id": verdict.evidence_id,
                "policy_id": self.engine.policy_id if self.engine is not None else "",
                "reappraisal": False,
            }
        )
        refusal = events.Decision(
            id=refusal_id,
            node=verdict.node,
            evidence_id=verdict.evidence_id,
            status=Status.CONTRAINDICATED.value,
            allow=False,
            expires_at=now + timedelta(seconds=self.decision_ttl),
            token=token,
            refused=True,
            reason=reason,
        )
        await self.bus.publish(subjects.decision(verdict.node), refusal)

    async def revoke_on_reappraisal(self, verdict: events.Verdict, result: ear.Result) -> None:
        """A verifier re-checked a node's evidence against changed collateral (a revoked
        certificate, a TCB recovery). Its nonce was spent long ago, so only a *negative*
        re-appraisal is acted on: it can withdraw trust, never grant it."""
        if result.status is not Status.CONTRAINDICATED:
            raise Rejected("policy.reappraisal_not_negative", "only revocations are accepted")
        if self.pins is not None:
            # Evidence another machine sent under this name (even reusing the node's evidence
            # id) was remembered under that machine's identity: it must not revoke this node.
            await self.pins.check(verdict.node, result.hwid)
        reasons = ["re-appraisal against changed collateral"]
        await self.publish_decision(verdict, result, False, reasons, reappraisal=True)
        log.info("decision.revoked_on_reappraisal", node=verdict.node)

    async def publish_decision(
        self,
        verdict: events.Verdict,
        result: ear.Result,
        allow: bool,
        reasons: list[str],
        *,
        reappraisal: bool = False,
        source: str = "",
        issued_at: datetime | None = None,
    ) -> datetime:
        """``source`` tells apart decisions about one verdict made under different rules (a
        re-evaluation after a policy change), which de-duplication must not merge.

        An allow also carries the appraisal's bounded summary (:mod:`.summary`) beside its
        token, which signs the summary's digest: the broker's resource policy decides on it,
        and must have it from the policy service, never from the node.

        ``issued_us`` orders a node's decisions finer than ``iat``'s whole seconds: a node
        re-attests several times a second under load, and the broker must tell which of two
        decisions is the newer (an older allow must never replace a newer deny)."""
        appraisal = summary.encode(result.claims, result.hwid) if allow else b""
        now = issued_at or self.clock()
        expires = now + timedelta(seconds=self.decision_ttl)
        decision_id = derived_id("decision", f"{verdict.id}:{source}" if source else verdict.id)
        token = self.key.sign(
            {
                "iat": int(now.timestamp()),
                "exp": math.ceil(expires.timestamp()),
                "issued_us": int(now.timestamp() * 1_000_000),
                "jti": decision_id,
                "node": verdict.node,
                "family": result.family,
                "status": str(result.status),
                "allow": allow,
                "reasons": reasons + [r.get("code", "") for r in result.reasons],
                "public_key": ear.b64url(result.subject.public_key),
                "verdict_id": verdict.id,
                "evidence_id": verdict.evidence_id,
                "policy_id": self.engine.policy_id if self.engine else "none",
                "reappraisal": reappraisal,
                **({"appraisal_sha256": summary.digest(appraisal)} if allow else {}),
            }
        )
        decision = events.Decision(
            id=decision_id,
            node=verdict.node,
            evidence_id=verdict.evidence_id,
            status=verdict.status,
            allow=allow,
            expires_at=expires,
            token=token,
            appraisal=appraisal,
        )
        await self.bus.publish(subjects.decision(verdict.node), decision)
        metrics.decisions.add(1, {"allow": str(allow).lower()})
        log.info("decision.published", node=verdict.node, allow=allow, reasons=reasons)
        return expires
