"""The broker: records release decisions and answers secret requests from attested nodes.

A secret leaves the broker only (1) for a node holding an unexpired *allow* decision signed
by the policy service, (2) for a resource the operator's resource policy lets that node read
(:mod:`.resources`; by default ``default/*`` and its own ``<node>/*``), and (3) HPKE-wrapped
to the very public key its evidence bound, and (4) once per decision
and resource (:mod:`services.broker.answers`). Releases, and refusals to the
holder of the node's current decision (once per decision and reason), are written to the
sealed audit log; refusals to anyone else, and repeats, are only counted and sealed as a
periodic summary, so requests cannot be turned into unbounded audit growth. A maintenance
task signs audit checkpoints and prunes the log to its configured bound. Decisions are kept
as the policy's signed tokens in the ``broker-state`` bucket, so replicas share them and a
restarted broker re-verifies them instead of trusting its own memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from opentelemetry import trace

from services.broker import presented, recorded, release, replays
from services.broker.answers import Answers, RefusalCounter
from services.broker.audit import (
    DEFAULT_MAX_RECORDS,
    AuditLog,
    Outcome,
)
from services.broker.held import (
    DECISION_PREFIX,
    STORED_SEPARATOR,
    DecisionReader,
    HeldDecision,
)
from services.broker.operator import OperatorDesk
from services.broker.replays import Replays, request_key
from services.broker.resources import ResourcePolicy, ResourcePolicyWatch
from services.broker.sealing import SealingKeySource
from services.broker.store import SecretStore, load_keyring
from services.mesh import events, metrics, subjects, telemetry
from services.mesh.bus import Bus
from services.mesh.errors import (
    AttestmeshError,
    ParseError,
    Rejected,
    ReleaseError,
    SealingError,
    VerificationError,
)
from services.mesh.keys import SigningKey, TrustedKeys
from services.mesh.kv import KeyValue, WriteConflictError
from services.mesh.natskv import NatsKeyValue
from services.mesh.responder import Responder

log = telemetry.logger("broker")
tracer = telemetry.tracer("broker")

DEFAULT_CHECKPOINT_EVERY = 1000
DEFAULT_MAINTENANCE_INTERVAL_S = 60.0
FULL_CHECK_INTERVAL_S = 3600.0
AUDIT_WALK_PAUSE_S = 0.01
LOAD_REPORT_INTERVAL_S = 0.5
_UNSENT = (nats.errors.Error, OSError)
REVOKED_CLAIM = "v:revoked"
"""The claim (:mod:`.answers`) that makes a deny decision's ``revoked`` record happen once."""


class _Counted(ReleaseError):
    """A refusal that is counted, never sealed on its own (see :mod:`.answers`)."""


class BrokerService:
    def __init__(
        self,
        bus: Bus,
        trusted: TrustedKeys,
        sealing: SealingKeySource,
        *,
        clock: Callable[[], datetime] = events.utcnow,
        signer: SigningKey | None = None,
        max_records: int = DEFAULT_MAX_RECORDS,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        maintenance_interval: float = DEFAULT_MAINTENANCE_INTERVAL_S,
    ) -> None:
        """``signer`` is the broker's own key for audit checkpoints; without it the log is
        never checkpointed and so never pruned (records are kept rather than lost)."""
        self.bus = bus
        self.trusted = trusted
        self.sealing = sealing
        self.clock = clock
        self.decisions = DecisionReader(trusted, clock)
        self.signer = signer
        self.max_records = max_records
        self.checkpoint_every = checkpoint_every
        self.maintenance_interval = maintenance_interval
        self.state: KeyValue | None = None
        self.store: SecretStore | None = None
        self.audit: AuditLog | None = None
        self.answers: Answers | None = None
        self.refusals = RefusalCounter()
        self.replays = Replays()
        self._released: OrderedDict[str, tuple[str, str, str, bytes]] = OrderedDict()
        """Per released answer (by message id): node, decision, resource and which secret,
        so a kept answer is handed out again only while they still hold."""
        self._fingerprint_key = secrets.token_bytes(32)
        self._secret_requests: Responder | None = None
        self._full_check_at = time.monotonic()
        self.recorded = recorded.Recorded()
        """What this broker last saw under each node's decision key (:mod:`.recorded`)."""
        self._maintain_now = asyncio.Event()
        self.resources = ResourcePolicy(trusted)
        self._resource_watch = ResourcePolicyWatch(bus, self.resources)

    async def start(self, *, seed: dict[str, bytes] | None = None) -> None:
        self.state = NatsKeyValue(await self.bus.key_value(subjects.BUCKET_BROKER))
        self.store = await SecretStore.open(self.state, self.sealing)
        data_key = await load_keyring(self.state, self.sealing)
        audit_trusted = self.trusted
        if self.signer is not None:  # its own checkpoints, even if not yet published
            audit_trusted = self.trusted.including(self.signer.name, self.signer.public_key())
        self.audit = AuditLog(
            self.state,
            data_key,
            clock=self.clock,
            signer=self.signer,
            trusted=audit_trusted,
            walk_pause_s=AUDIT_WALK_PAUSE_S,
        )
        self.answers = Answers(self.state, data_key)
        existing = set(await self.store.list())
        for name, value in (seed or {}).items():
            if name not in existing:
                await self.store.put(name, value)
                log.info("secret.seeded", resource=name)
        await self._resource_watch.start()
        self._secret_requests = await self.bus.serve(
            subjects.SECRET_ALL, self.on_secret_request, queue="broker"
        )
        desk = OperatorDesk(
            self.store, self.audit, data_key, self.trusted, signer=self.signer, clock=self.clock
        )
        await self.bus.serve(subjects.OPERATOR_ALL, desk.on_request, queue="broker", workers=4)

    async def run(self, stop: Any, *, max_deliver: int = 5, ack_wait: float = 30.0) -> None:
        maintenance = asyncio.create_task(self._maintenance(stop))
        load = asyncio.create_task(self._report_load(stop))
        resource_watch = asyncio.create_task(self._resource_watch.run(stop))
        try:
            await self.bus.consume(
                stream=subjects.STREAM_DECISIONS,
                durable="broker",
                subject=subjects.DECISION_ALL,
                handler=self.handle_decision,
                stop=stop,
                max_deliver=max_deliver,
                ack_wait=ack_wait,
            )
        finally:
            for task in (maintenance, resource_watch, load):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            with contextlib.suppress(SealingError):
                await self.flush_refusals()

    async def _report_load(self, stop: asyncio.Event) -> None:
        """Say every :data:`LOAD_REPORT_INTERVAL_S` how many secret requests wait here and
        how many have been served: the policy admits no new rounds while the broker is
        backed up (:mod:`services.policy.admission`). Best effort: a report that cannot be
        sent is skipped, and the policy ignores a replica that has gone quiet."""
        replica = events.new_id()[:16]
        while not stop.is_set():
            responder = self._secret_requests
            if responder is not None:
                report = events.LoadReport(
                    replica=replica,
                    waiting=min(responder.waiting, 1_000_000),
                    served=responder.served,
                )
                with contextlib.suppress(*_UNSENT):
                    await self.bus.notify(subjects.load("broker"), report)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LOAD_REPORT_INTERVAL_S)

    async def _maintenance(self, stop: asyncio.Event) -> None:
        """Every interval, or when an append reaches a checkpoint boundary: seal the refusal
        summary, checkpoint and prune. A failure is logged and retried next time; it never
        stops the broker answering."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._maintain_now.wait(), self.maintenance_interval)
            self._maintain_now.clear()
            try:
                await self.maintain()
            except AttestmeshError as exc:  # NATS unavailable, a sealing or listing failure
                log.error("audit.maintenance_failed", reason=exc.reason)

    async def flush_refusals(self) -> int:
        """Seal the counted refusals as one summary record; return how many it covered."""
        assert self.audit is not None
        counts = self.refusals.drain()
        if not counts:
            return 0
        try:
            await self.audit.append_summary(counts)
        except AttestmeshError:
            self.refusals.restore(counts)
            raise
        return sum(counts.values())

    async def maintain(self) -> int:
        """Flush the refusal summary, then checkpoint and prune; return records pruned.

        A checkpoint reads only the records since the last one; every
        :data:`FULL_CHECK_INTERVAL_S` it lists the whole log instead, which is what notices
        a record removed behind the checkpoint straight from the stream."""
        assert self.audit is not None
        await self.flush_refusals()
        if self.signer is None:
            return 0
        full = time.monotonic() - self._full_check_at >= FULL_CHECK_INTERVAL_S
        made = await self.audit.checkpoint(full=full)
        if full:
            self._full_check_at = time.monotonic()
        if made is None:
            return 0
        pruned = await self.audit.prune(self.max_records)
        log.info("audit.checkpointed", seq=made.seq, pruned=pruned)
        return pruned

    async def handle_decision(self, msg: Msg) -> None:
        assert self.state is not None
        with tracer.start_as_current_span(
            "broker.record_decision", context=telemetry.extract(msg.headers)
        ) as span:
            decision = events.decode(msg.data, events.Decision)
            span.set_attribute("attestmesh.node", decision.node)
            try:
                held = self.decisions.read(decision.token, decision.appraisal, decision.node)
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
            record = decision.token.encode() + STORED_SEPARATOR + decision.appraisal
            if not await self._record(key, record, held, decision.node):
                return
            log.info("decision.recorded", node=decision.node, allow=held.allow)
            if not held.allow:
                revocation = events.Revocation(node=decision.node, reason="policy.denied")
                await self.bus.publish(
                    subjects.revoked(decision.node), revocation, msg_id=f"revoke-{held.decision_id}"
                )
                metrics.revocations.add(1)
                await self._audit_revocation(decision.node, held, span)

    async def _record(self, key: str, record: bytes, held: HeldDecision, node: str) -> bool:
        """Store ``record`` (``held``, delivered to the consumer) under ``key``; ``False`` if
        a newer decision is stored, or it re-appraises evidence the node has since replaced.

        An allow whose record this broker has seen stored there needs neither read nor
        write, and a decision newer than the one seen is written against its revision at
        once (:mod:`.recorded`); everything else is decided on a fresh read."""
        assert self.state is not None
        async with self.recorded.turn(key):
            if not held.reappraisal:
                if held.allow and self.recorded.holds(key, record):
                    return True  # recorded already (presented with a secret request)
                if await recorded.write_over(self.state, self.recorded, key, record, held.order):
                    return True
            return await self._record_read(key, record, held, node)

    async def _record_read(self, key: str, record: bytes, held: HeldDecision, node: str) -> bool:
        """:meth:`_record` on what a fresh read finds stored."""
        assert self.state is not None
        while True:
            current = await self.state.get(key)
            previous = None
            if current is not None:
                with contextlib.suppress(VerificationError):
                    previous = self.decisions.stored(current[0], node)
                if previous is not None:
                    self.recorded.note(key, current[0], current[1], previous.order)
            if previous is not None and previous.order > held.order:
                return False
            if held.reappraisal and (previous is None or previous.evidence_id != held.evidence_id):
                log.info("decision.stale_reappraisal", node=node)
                return False  # about evidence the node has since replaced: nothing to revoke
            if current is not None and current[0] == record:
                return True  # recorded already (presented with a secret request, or redelivered)
            try:
                if current is None:
                    revision = await self.state.create(key, record)
                else:
                    revision = await self.state.update(key, record, current[1])
            except WriteConflictError:
                continue
            self.recorded.note(key, record, revision, held.order)
            return True

    async def _audit_revocation(self, node: str, held: HeldDecision, span: trace.Span) -> None:
        """One ``revoked`` audit record per deny decision, after the announcement (which must
        not wait on the log). Decisions are delivered at least once and replicas may handle
        the same one, so the record is claimed first, like a release; if appending fails,
        the claim is taken back and the error raised, so the redelivery writes it (an
        append that succeeded unseen may then be written twice: never lost)."""
        assert self.answers is not None and self.audit is not None
        if not await self.answers.claim(node, held.decision_id, held.issued_at, REVOKED_CLAIM):
            return
        ctx = span.get_span_context()
        try:
            await self.audit.append(
                node=node,
                resource="*",
                decision_id=held.decision_id,
                verdict_digest=hashlib.sha256(held.verdict_id.encode()).hexdigest(),
                outcome=Outcome.REVOKED,
                reason="policy.reappraisal" if held.reappraisal else "policy.denied",
                reasons=list(held.reasons),
                trace_id=format(ctx.trace_id, "032x") if ctx.is_valid else "",
            )
        except AttestmeshError:
            await self.answers.unclaim(node, held.decision_id, REVOKED_CLAIM)
            raise
        log.info("decision.revocation_audited", node=node)

    async def current_decision(self, node: str) -> HeldDecision:
        """The node's recorded decision, re-verified; refusals say why there is none."""
        assert self.state is not None
        key = DECISION_PREFIX + node
        found = await self.state.get(key)
        if found is None:
            raise ReleaseError("broker.no_decision", "no decision recorded for this node")
        try:
            held = self.decisions.stored(found[0], node)
        except VerificationError as exc:
            if exc.reason == "token.expired":
                raise ReleaseError("broker.decision_expired", "re-attest for a fresh one") from None
            raise ReleaseError("broker.decision_invalid", exc.reason) from None
        self.recorded.note(key, found[0], found[1], held.order)
        return held

    async def on_secret_request(self, msg: Msg) -> events.Message:
        answer, repeated = await self.replays.answer(
            request_key(msg.subject, msg.data), lambda: self._answer(msg), self._still_holds
        )
        if repeated:
            metrics.releases.add(1, {"outcome": "repeated", "reason": ""})
        elif isinstance(answer, events.SecretResponse):
            outcome = "released" if answer.ok else _refusal_kind(answer.reason)
            metrics.releases.add(1, {"outcome": outcome, "reason": answer.reason})
        elif isinstance(answer, events.Refusal):
            metrics.releases.add(1, {"outcome": "malformed", "reason": answer.reason})
        return answer

    async def _answer(self, msg: Msg) -> events.SecretResponse | events.Refusal:
        with tracer.start_as_current_span(
            "broker.release", context=telemetry.extract(msg.headers)
        ) as span:
            try:
                request = events.decode(msg.data, events.SecretRequest)
            except ParseError as exc:
                self.refusals.count(exc.reason)  # the message never named a requester
                return events.Refusal(reason=exc.reason)
            span.set_attribute("attestmesh.node", request.node)
            span.set_attribute("attestmesh.resource", request.resource)
            try:
                if subjects.node_of(msg.subject) != request.node:
                    raise _Counted("broker.routing_mismatch", "subject names another node")
                response = await self._release(request, span)
            except (ReleaseError, SealingError) as exc:
                span.set_attribute("attestmesh.refused", exc.reason)
                if isinstance(exc, _Counted):  # a flood of these must not flood logs either
                    self.refusals.count(exc.reason)
                    log.debug("secret.refused", node=request.node, reason=exc.reason)
                else:
                    log.info("secret.refused", node=request.node, reason=exc.reason)
                return events.SecretResponse(
                    node=request.node, resource=request.resource, ok=False, reason=exc.reason
                )
            return response

    async def _holder(self, request: events.SecretRequest) -> HeldDecision:
        offered = self._presented(request) if request.decision_token else None
        return await self._holder_of(request, offered)

    async def _holder_of(
        self, request: events.SecretRequest, offered: HeldDecision | None
    ) -> HeldDecision:
        """The node's current decision, if the request names it; else a counted refusal.

        A request presenting its signed allow decision (``offered``, verified by
        :meth:`_presented`) makes it the current one if it is the newest
        (:mod:`.presented`); one whose decision has a successor is refused as superseded,
        so the node stops asking."""
        try:
            if offered is None:
                held = await self.current_decision(request.node)
            else:
                assert self.state is not None
                record = request.decision_token.encode() + STORED_SEPARATOR
                held = await presented.adopt(
                    self.state,
                    DECISION_PREFIX + request.node,
                    record + request.decision_appraisal,
                    offered,
                    lambda raw: self.decisions.stored_or_none(raw, request.node),
                    memory=self.recorded,
                )
        except ReleaseError as exc:
            raise _Counted(exc.reason, exc.detail) from None
        if held.reappraisal and hmac.compare_digest(held.evidence_id, request.evidence_id):
            return held
        if not hmac.compare_digest(held.decision_id, request.decision_id):
            if offered is not None and held.order > offered.order:
                raise _Counted("broker.decision_superseded", "the node has a newer decision")
            raise _Counted("broker.decision_pending", "that decision is not the current one")
        return held

    def _presented(self, request: events.SecretRequest) -> HeldDecision | None:
        """The allow decision a request presents, verified; ``None`` for a decision only
        the consumer may record (a deny, a refusal, a re-appraisal)."""
        try:
            offered = self.decisions.read(
                request.decision_token, request.decision_appraisal, request.node
            )
        except VerificationError as exc:
            expired = exc.reason == "token.expired"
            reason = "broker.decision_expired" if expired else "broker.decision_invalid"
            raise _Counted(reason, exc.reason) from None
        if not hmac.compare_digest(offered.decision_id, request.decision_id):
            raise _Counted("broker.routing_mismatch", "the token is another decision")
        if not offered.allow or offered.refused or offered.reappraisal:
            return None
        return offered

    async def _refuse(
        self, request: events.SecretRequest, held: HeldDecision, reason: str, span: trace.Span
    ) -> ReleaseError:
        """Seal a refusal to the decision's holder once per (decision, reason); count repeats."""
        assert self.answers is not None
        if not await self.answers.claim(
            request.node, held.decision_id, held.issued_at, f"x:{reason}"
        ):
            return _Counted(reason, "refused again")
        try:
            await self._audit(request, held, Outcome.REFUSED, reason, span)
        except SealingError as exc:
            log.error("audit.append_failed", reason=exc.reason)
        return ReleaseError(reason, "refused")

    async def _release(
        self, request: events.SecretRequest, span: trace.Span
    ) -> events.SecretResponse:
        assert self.store is not None and self.answers is not None
        offered = self._presented(request) if request.decision_token else None
        early = self._check(request, offered) if offered is not None else None
        reading = None
        if offered is not None and early is None:
            reading = asyncio.ensure_future(self._read_secret(request.resource))
        try:
            held = await self._holder_of(request, offered)
            reason = early if held is offered else self._check(request, held)
            secret = b""
            if reason is None:
                secret, reason = await (reading or self._read_secret(request.resource))
        finally:
            if reading is not None and not reading.done():
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
        if reason is not None:
            raise await self._refuse(request, held, reason, span)
        if not await self.answers.claim(
            request.node, held.decision_id, held.issued_at, f"r:{request.resource}"
        ):
            raise _Counted("broker.already_released", "answered once for this decision")
        wrapped = release.wrap(
            secret,
            request.public_key,
            info=release.release_info(request.node, request.resource),
            aad=request.id.encode(),
        )
        record = await self._audit(request, held, Outcome.RELEASED, "", span)
        log.info("secret.released", node=request.node, resource=request.resource)
        if self.checkpoint_every > 0 and (record + 1) % self.checkpoint_every == 0:
            self._maintain_now.set()
        response = events.SecretResponse(
            node=request.node,
            resource=request.resource,
            ok=True,
            enc=wrapped.enc,
            ciphertext=wrapped.ciphertext,
            audit_id=str(record),
        )
        self._released[response.id] = (
            request.node,
            held.decision_id,
            request.resource,
            self._fingerprint(secret),
        )
        while len(self._released) > replays.MAX_KEPT:
            self._released.popitem(last=False)
        return response

    def _fingerprint(self, secret: bytes) -> bytes:
        """Which secret was released, without keeping it (a keyed digest, the key this
        process's own)."""
        return hmac.new(self._fingerprint_key, secret, hashlib.sha256).digest()

    async def _still_holds(self, answer: events.Message) -> bool:
        """Whether a kept answer may be handed out again: the node's current decision is
        still the allow it was released under, and the secret still the one released."""
        released = self._released.get(answer.id)
        if released is None:
            return False
        node, decision_id, resource, fingerprint = released
        try:
            held = await self.current_decision(node)
        except ReleaseError:
            return False
        if not held.allow or held.reappraisal or not hmac.compare_digest(
            held.decision_id, decision_id
        ):
            return False
        secret, reason = await self._read_secret(resource)
        return reason is None and hmac.compare_digest(self._fingerprint(secret), fingerprint)

    async def _read_secret(self, resource: str) -> tuple[bytes, str | None]:
        """The secret, or why it cannot be had. A request that presents a genuine allow
        for this resource starts reading it while its decision is being recorded (one round
        trip less on the way to the answer); requests naming no verified decision never
        cause a read, so a flood of them costs no more than before."""
        assert self.store is not None
        try:
            return await self.store.get(resource), None
        except SealingError as exc:
            found = exc.reason != "broker.secret_not_found"
            return b"", exc.reason if found else "broker.unknown_resource"

    def _check(self, request: events.SecretRequest, held: HeldDecision) -> str | None:
        """Why the decision's holder may not have this resource, or ``None``."""
        if held.reappraisal and hmac.compare_digest(held.evidence_id, request.evidence_id):
            return "broker.revoked"
        if not held.allow:
            return "broker.not_allowed"
        if not hmac.compare_digest(held.public_key, request.public_key):
            return "broker.key_mismatch"
        return self.resources.check(request.node, request.resource, held.appraisal)

    async def _audit(
        self,
        request: events.SecretRequest,
        held: HeldDecision,
        outcome: Outcome,
        reason: str,
        span: trace.Span,
    ) -> int:
        assert self.audit is not None
        ctx = span.get_span_context()
        entry = await self.audit.append(
            node=request.node,
            resource=request.resource,
            decision_id=held.decision_id,
            verdict_digest=hashlib.sha256(held.verdict_id.encode()).hexdigest(),
            outcome=outcome,
            reason=reason,
            trace_id=format(ctx.trace_id, "032x") if ctx.is_valid else "",
        )
        return entry.seq


def _refusal_kind(reason: str) -> str:
    """``pending`` for the retry signal a collector polls through, else ``refused``."""
    return "pending" if reason == "broker.decision_pending" else "refused"
