"""The broker: records release decisions and answers secret requests from attested nodes.

A secret leaves the broker only (1) for a node holding an unexpired *allow* decision signed
by the policy service, (2) for a resource that node may read (``default/*`` or its own
``<node>/*``), and (3) HPKE-wrapped to the very public key its evidence bound. Every answer,
released or refused, is written to the sealed audit log. Decisions are kept as the policy's
signed tokens in the ``broker-state`` bucket, so replicas share them and a restarted broker
re-verifies them instead of trusting its own memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.aio.msg import Msg
from opentelemetry import trace

from services.broker import release
from services.broker.audit import AuditLog, Outcome
from services.broker.sealing import SealingKeySource
from services.broker.store import SecretStore, load_keyring
from services.mesh import events, metrics, subjects, telemetry
from services.mesh.bus import Bus
from services.mesh.errors import ParseError, Rejected, ReleaseError, SealingError, VerificationError
from services.mesh.keys import TrustedKeys
from services.mesh.kv import KeyValue, WriteConflictError
from services.mesh.natskv import NatsKeyValue
from services.verifier.ear import unb64url

log = telemetry.logger("broker")
tracer = telemetry.tracer("broker")

DECISION_PREFIX = "decision."
POLICY_SIGNER = "policy"


@dataclass(frozen=True)
class HeldDecision:
    """The signed claims of a node's current decision."""

    decision_id: str
    issued_at: int
    expires_at: int
    allow: bool
    public_key: bytes
    verdict_id: str
    evidence_id: str
    reappraisal: bool
    refused: bool = False


def may_read(node: str, resource: str) -> bool:
    """The resource policy: shared ``default/*`` secrets and the node's own namespace."""
    namespace = resource.split("/", 1)[0]
    return namespace in ("default", node)


class BrokerService:
    def __init__(
        self,
        bus: Bus,
        trusted: TrustedKeys,
        sealing: SealingKeySource,
        *,
        clock: Callable[[], datetime] = events.utcnow,
    ) -> None:
        self.bus = bus
        self.trusted = trusted
        self.sealing = sealing
        self.clock = clock
        self.state: KeyValue | None = None
        self.store: SecretStore | None = None
        self.audit: AuditLog | None = None

    async def start(self, *, seed: dict[str, bytes] | None = None) -> None:
        self.state = NatsKeyValue(await self.bus.key_value(subjects.BUCKET_BROKER))
        self.store = await SecretStore.open(self.state, self.sealing)
        self.audit = AuditLog(self.state, await load_keyring(self.state, self.sealing))
        existing = set(await self.store.list())
        for name, value in (seed or {}).items():
            if name not in existing:
                await self.store.put(name, value)
                log.info("secret.seeded", resource=name)
        await self.bus.serve(subjects.SECRET_ALL, self.on_secret_request, queue="broker")

    async def run(self, stop: Any, *, max_deliver: int = 5, ack_wait: float = 30.0) -> None:
        await self.bus.consume(
            stream=subjects.STREAM_DECISIONS,
            durable="broker",
            subject=subjects.DECISION_ALL,
            handler=self.handle_decision,
            stop=stop,
            max_deliver=max_deliver,
            ack_wait=ack_wait,
        )

    def _read_token(self, token: str) -> HeldDecision:
        claims = self.trusted.verify(
            token, accept=lambda name: name == POLICY_SIGNER, now=self.clock()
        )
        try:
            return HeldDecision(
                decision_id=str(claims["jti"]),
                issued_at=int(claims["iat"]),
                expires_at=int(claims["exp"]),
                allow=claims["allow"] is True,
                public_key=unb64url(str(claims["public_key"])),
                verdict_id=str(claims["verdict_id"]),
                evidence_id=str(claims["evidence_id"]),
                reappraisal=claims.get("reappraisal") is True,
                refused=claims.get("refused") is True,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise VerificationError("broker.decision_malformed", type(exc).__name__) from None

    async def handle_decision(self, msg: Msg) -> None:
        assert self.state is not None
        with tracer.start_as_current_span(
            "broker.record_decision", context=telemetry.extract(msg.headers)
        ) as span:
            decision = events.decode(msg.data, events.Decision)
            span.set_attribute("attestmesh.node", decision.node)
            try:
                held = self._read_token(decision.token)
            except VerificationError as exc:
                if exc.reason == "token.expired":
                    return
                raise Rejected(exc.reason, exc.detail) from None
            if (
                held.allow != decision.allow
                or held.refused != decision.refused
                or subjects.node_of(msg.subject) != decision.node
            ):
                raise Rejected("broker.routing_mismatch", "routing fields disagree with token")
            if held.refused:
                # Evidence that did not prove it is the node: the node's standing is unchanged.
                log.info("decision.refusal_ignored", node=decision.node)
                return
            key = DECISION_PREFIX + decision.node
            while True:
                current = await self.state.get(key)
                previous = None
                if current is not None:
                    with contextlib.suppress(VerificationError):
                        previous = self._read_token(current[0].decode())
                if previous is not None and previous.issued_at > held.issued_at:
                    return
                if held.reappraisal and (
                    previous is None or previous.evidence_id != held.evidence_id
                ):
                    log.info("decision.stale_reappraisal", node=decision.node)
                    return  # about evidence the node has since replaced: nothing to revoke
                try:
                    if current is None:
                        await self.state.create(key, decision.token.encode())
                    else:
                        await self.state.update(key, decision.token.encode(), current[1])
                    break
                except WriteConflictError:
                    continue
            log.info("decision.recorded", node=decision.node, allow=held.allow)
            if not held.allow:
                revocation = events.Revocation(node=decision.node, reason="policy.denied")
                await self.bus.publish(
                    subjects.revoked(decision.node), revocation, msg_id=f"revoke-{held.decision_id}"
                )
                metrics.revocations.add(1)

    async def current_decision(self, node: str) -> HeldDecision:
        """The node's recorded decision, re-verified; refusals say why there is none."""
        assert self.state is not None
        found = await self.state.get(DECISION_PREFIX + node)
        if found is None:
            raise ReleaseError("broker.no_decision", "no decision recorded for this node")
        try:
            return self._read_token(found[0].decode())
        except VerificationError as exc:
            if exc.reason == "token.expired":
                raise ReleaseError("broker.decision_expired", "re-attest for a fresh one") from None
            raise ReleaseError("broker.decision_invalid", exc.reason) from None

    async def on_secret_request(self, msg: Msg) -> events.Message:
        answer = await self._answer(msg)
        if isinstance(answer, events.SecretResponse):
            outcome = "released" if answer.ok else _refusal_kind(answer.reason)
            metrics.releases.add(1, {"outcome": outcome, "reason": answer.reason})
        else:
            metrics.releases.add(1, {"outcome": "malformed", "reason": answer.reason})
        return answer

    async def _answer(self, msg: Msg) -> events.SecretResponse | events.Refusal:
        with tracer.start_as_current_span(
            "broker.release", context=telemetry.extract(msg.headers)
        ) as span:
            try:
                request = events.decode(msg.data, events.SecretRequest)
            except ParseError as exc:
                return events.Refusal(reason=exc.reason)
            span.set_attribute("attestmesh.node", request.node)
            span.set_attribute("attestmesh.resource", request.resource)
            try:
                if subjects.node_of(msg.subject) != request.node:
                    raise ReleaseError("broker.routing_mismatch", "subject names another node")
                response = await self._release(request, span)
            except (ReleaseError, SealingError) as exc:
                span.set_attribute("attestmesh.refused", exc.reason)
                log.info("secret.refused", node=request.node, reason=exc.reason)
                if exc.reason != "broker.decision_pending":  # a retry signal, not a refusal
                    await self._audit(request, None, Outcome.REFUSED, exc.reason, span)
                return events.SecretResponse(
                    node=request.node, resource=request.resource, ok=False, reason=exc.reason
                )
            return response

    async def _release(
        self, request: events.SecretRequest, span: trace.Span
    ) -> events.SecretResponse:
        assert self.store is not None
        held = await self.current_decision(request.node)
        if held.reappraisal and hmac.compare_digest(held.evidence_id, request.evidence_id):
            raise ReleaseError("broker.revoked", "this evidence failed a re-appraisal")
        if not hmac.compare_digest(held.decision_id, request.decision_id):
            raise ReleaseError("broker.decision_pending", "that decision is not the current one")
        if not held.allow:
            raise ReleaseError("broker.not_allowed", "the node's latest decision denies release")
        if not hmac.compare_digest(held.public_key, request.public_key):
            raise ReleaseError("broker.key_mismatch", "key differs from the attested key")
        if not may_read(request.node, request.resource):
            raise ReleaseError("broker.resource_forbidden", "resource outside the node's scope")
        try:
            secret = await self.store.get(request.resource)
        except SealingError as exc:
            if exc.reason == "broker.secret_not_found":
                raise ReleaseError("broker.unknown_resource", request.resource) from None
            raise
        wrapped = release.wrap(
            secret,
            request.public_key,
            info=release.release_info(request.node, request.resource),
            aad=request.id.encode(),
        )
        record = await self._audit(request, held, Outcome.RELEASED, "", span)
        log.info("secret.released", node=request.node, resource=request.resource)
        return events.SecretResponse(
            node=request.node,
            resource=request.resource,
            ok=True,
            enc=wrapped.enc,
            ciphertext=wrapped.ciphertext,
            audit_id=str(record) if record is not None else "",
        )

    async def _audit(
        self,
        request: events.SecretRequest,
        held: HeldDecision | None,
        outcome: Outcome,
        reason: str,
        span: trace.Span,
    ) -> int | None:
        assert self.audit is not None
        ctx = span.get_span_context()
        entry = await self.audit.append(
            node=request.node,
            resource=request.resource,
            decision_id=held.decision_id if held else "none",
            verdict_digest=hashlib.sha256((held.verdict_id if held else "").encode()).hexdigest(),
            outcome=outcome,
            reason=reason,
            trace_id=format(ctx.trace_id, "032x") if ctx.is_valid else "",
        )
        return entry.seq


def _refusal_kind(reason: str) -> str:
    """``pending`` for the retry signal a collector polls through, else ``refused``."""
    return "pending" if reason == "broker.decision_pending" else "refused"
