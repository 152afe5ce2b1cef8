"""The policy service: issues nonces, appraises signed verdicts, publishes release decisions.

A verdict is acted on only if its EAR verifies under a known verifier key, its routing fields
agree with the signed content, and its nonce is fresh; anything else is dead-lettered with the
reason. The Rego policy and reference values live in KV and are recompiled when they change.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import nats.errors
from nats.aio.msg import Msg

from services.mesh import events, subjects, telemetry
from services.mesh.bus import Bus
from services.mesh.errors import ParseError, PolicyError, Rejected, VerificationError
from services.mesh.keys import SigningKey, TrustedKeys
from services.mesh.natskv import NatsKeyValue
from services.policy import refvalues
from services.policy.engine import PolicyEngine, default_policy
from services.policy.nonces import NonceStore
from services.verifier import ear
from services.verifier.families.base import Status
from services.verifier.worker import derived_id

log = telemetry.logger("policy")
tracer = telemetry.tracer("policy")

POLICY_KEY = "release"
POLICY_SIGNER = "policy"


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
    ) -> None:
        self.bus = bus
        self.key = key
        self.trusted = trusted
        self.settings = settings or {}
        self.nonce_ttl = nonce_ttl
        self.decision_ttl = decision_ttl
        self.clock = clock
        self.engine: PolicyEngine | None = None
        self.nonces: NonceStore | None = None

    async def start(self) -> None:
        self.nonces = NonceStore(
            NatsKeyValue(await self.bus.key_value(subjects.BUCKET_NONCES)),
            ttl=self.nonce_ttl,
            clock=self.clock,
        )
        policies = NatsKeyValue(await self.bus.key_value(subjects.BUCKET_POLICIES))
        if await policies.get(POLICY_KEY) is None:
            with contextlib.suppress(Exception):
                await policies.create(POLICY_KEY, default_policy().encode())
        await self.reload()
        await self.bus.serve(subjects.NONCE_ALL, self.on_nonce_request, queue="policy")

    async def reload(self) -> None:
        """Recompile from KV; a policy that fails to compile keeps the previous one in force."""
        policies = NatsKeyValue(await self.bus.key_value(subjects.BUCKET_POLICIES))
        refs = NatsKeyValue(await self.bus.key_value(subjects.BUCKET_REFVALUES))
        entry = await policies.get(POLICY_KEY)
        source = entry[0].decode() if entry else default_policy()
        revision = entry[1] if entry else 0
        try:
            data = {"refvalues": await refvalues.load_all(refs), "settings": self.settings}
            self.engine = PolicyEngine(source, data, policy_id=f"{POLICY_KEY}@{revision}")
            log.info("policy.loaded", policy_id=self.engine.policy_id)
        except PolicyError as exc:
            log.error("policy.reload_failed", reason=exc.reason, detail=exc.detail[:300])
            if self.engine is None:
                raise

    async def watch(self, stop: asyncio.Event) -> None:
        """Recompile whenever the policy or reference values change."""
        watchers = [
            await (await self.bus.key_value(b)).watchall(include_history=False)
            for b in (subjects.BUCKET_POLICIES, subjects.BUCKET_REFVALUES)
        ]
        initial_done = [False] * len(watchers)
        while not stop.is_set():
            changed = False
            for i, watcher in enumerate(watchers):
                try:
                    entry = await watcher.updates(timeout=0.5)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                if entry is None:
                    initial_done[i] = True
                elif initial_done[i]:
                    changed = True
            if changed:
                await self.reload()

    async def run(
        self, stop: asyncio.Event, *, max_deliver: int = 5, ack_wait: float = 30.0
    ) -> None:
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
            challenge = await self.nonces.issue(request.node)
            log.info("nonce.issued", node=request.node)
            return challenge

    async def handle_verdict(self, msg: Msg) -> None:
        assert self.nonces is not None and self.engine is not None
        with tracer.start_as_current_span(
            "policy.appraise", context=telemetry.extract(msg.headers)
        ) as span:
            verdict = events.decode(msg.data, events.Verdict)
            span.set_attribute("attestmesh.node", verdict.node)
            try:
                result = ear.read(verdict.ear, self.trusted, now=self.clock())
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
            try:
                await self.nonces.consume(result.subject.nonce, verdict.node, verdict.id)
            except Rejected as exc:
                log.warning("verdict.rejected", node=verdict.node, reason=exc.reason)
                span.set_attribute("attestmesh.rejected", exc.reason)
                raise
            outcome = self.engine.evaluate(
                {
                    "family": result.family,
                    "status": str(result.status),
                    "verified": result.verified,
                    "claims": result.claims,
                    "reasons": [r.get("code", "") for r in result.reasons],
                    "simulated": result.subject.simulated,
                    "node": verdict.node,
                }
            )
            await self.publish_decision(verdict, result, outcome.allow, outcome.reasons)
            span.set_attribute("attestmesh.allow", outcome.allow)

    async def revoke_on_reappraisal(self, verdict: events.Verdict, result: ear.Result) -> None:
        """A verifier re-checked a node's evidence against changed collateral (a revoked
        certificate, a TCB recovery). Its nonce was spent long ago, so only a *negative*
        re-appraisal is acted on: it can withdraw trust, never grant it."""
        if result.status is not Status.CONTRAINDICATED:
            raise Rejected("policy.reappraisal_not_negative", "only revocations are accepted")
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
    ) -> None:
        assert self.engine is not None
        now = self.clock()
        expires = now + timedelta(seconds=self.decision_ttl)
        decision_id = derived_id("decision", verdict.id)
        token = self.key.sign(
            {
                "iat": int(now.timestamp()),
                "exp": math.ceil(expires.timestamp()),
                "jti": decision_id,
                "node": verdict.node,
                "family": result.family,
                "status": str(result.status),
                "allow": allow,
                "reasons": reasons + [r.get("code", "") for r in result.reasons],
                "public_key": ear.b64url(result.subject.public_key),
                "verdict_id": verdict.id,
                "evidence_id": verdict.evidence_id,
                "policy_id": self.engine.policy_id,
                "reappraisal": reappraisal,
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
        )
        await self.bus.publish(subjects.decision(verdict.node), decision)
        log.info("decision.published", node=verdict.node, allow=allow, reasons=reasons)
