"""The collector: one node's attestation round, from nonce to unwrapped secret.

Each round uses a fresh X25519 key pair whose public half the evidence binds, so the secret
the broker releases can be opened only by this round's TEE-held key; the private key never
leaves the process and is dropped when the round ends. The round acts only on a decision the
policy service signed for it (:mod:`services.collector.decisions`); anything else on the
node's decision subject is ignored and counted, and the round keeps waiting.

What a round released is held in :attr:`CollectorNode.secrets`, in memory only. While
:meth:`CollectorNode.run` runs, the node listens on its own revocation subject
(:mod:`services.collector.revocations`): a revocation drops every held secret, tells the
embedding application (``on_revoked``), and starts the next round at once instead of after
the interval, so a node revoked by a transient failure is back within a round, while one
that still fails stays denied and holds nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TypeVar

import nats.errors
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.broker import release
from services.collector import decisions as signed
from services.collector.revocations import RevocationWatch
from services.collector.secrets import HeldSecrets
from services.collector.sources.base import EvidenceSource
from services.mesh import events, metrics, subjects, telemetry
from services.mesh.bus import Bus
from services.mesh.errors import AttestmeshError, BusError, ParseError, Rejected
from services.mesh.keys import TrustedKeys
from services.verifier.worker import expected_report_data

T = TypeVar("T")

log = telemetry.logger("collector")

DEFAULT_RESOURCE = "default/key/workload"
"""The secret a node asks for unless told otherwise (the demo secret of ``attestmesh up``)."""
tracer = telemetry.tracer("collector")
PENDING_RETRY_FIRST_S = 0.005
PENDING_RETRY_MAX_S = 0.05
REVOKED_DURING_ROUND = "collector.revoked_during_round"
STAGES = ("nonce", "evidence", "decision", "secret")
"""A round's stages: the nonce request; making the evidence; from publishing it to the
decision's arrival (verifier and policy); the secret request (broker)."""


@dataclass(frozen=True)
class RoundResult:
    """What one attestation round achieved (never the secret itself)."""

    node: str
    status: str
    allowed: bool
    released: bool
    latency_ms: float
    reason: str = ""
    evidence_id: str = ""
    """The evidence this round published (empty if it failed before publishing)."""
    admitted_ms: float = -1.0
    """From the nonce's arrival to the round's end (-1 if no nonce came): the round's
    time in the mesh, without the time spent waiting to be admitted."""
    stages_ms: tuple[tuple[str, float], ...] = ()
    """Where a released round's time went, stage by stage (:data:`STAGES`)."""


class CollectorNode:
    def __init__(
        self,
        bus: Bus,
        node: str,
        source: EvidenceSource,
        trusted: TrustedKeys,
        *,
        resource: str = DEFAULT_RESOURCE,
        decision_timeout: float = 30.0,
        on_secret: Callable[[str, bytes], None] | None = None,
        on_revoked: Callable[[str], None] | None = None,
        clock: Callable[[], datetime] = events.utcnow,
    ) -> None:
        """``trusted`` must hold the policy service's public key (as ``policy``): the only
        signer whose decisions this node acts on. ``on_secret(resource, value)`` hands an
        embedding application each released secret; ``on_revoked(reason)`` tells it to drop
        every copy it took (it may be called more than once for one withdrawal: on a denied
        round and on the broker's announcement)."""
        self.bus = bus
        self.node = subjects.token(node)
        self.source = source
        self.trusted = trusted
        self.clock = clock
        self.ignored: Counter[str] = Counter()
        """Decisions ignored so far, by reason (forged, foreign-signed, another round's)."""
        self.resource = resource
        self.decision_timeout = decision_timeout
        self.on_secret = on_secret
        self.on_revoked = on_revoked
        self.secrets = HeldSecrets()
        """What this node received and still holds; emptied when it is revoked or denied."""
        self.revocations = RevocationWatch(bus, self.node, self._revoked)
        """The node's revocation subject; :meth:`run` listens on it (``async with``)."""
        self._withdrawals = 0
        self._in_round = False
        self._allowed = False
        """The last round that got a decision was allowed, and nothing revoked it since."""
        self._wake = asyncio.Event()
        self._listeners: set[Callable[[Msg], None]] = set()
        """The rounds waiting for their decision (each reads every message that comes)."""
        self._decision_sub: Subscription | None = None
        self._subscribing = asyncio.Lock()
        self.last_public_key = b""
        self.last_decision_id = ""
        self.last_evidence_id = ""
        self._evidence_id = ""
        self._admitted_at = 0.0
        self._marks: list[float] = []

    async def attest_once(self) -> RoundResult:
        """One round; a failure anywhere (a service or the connection gone) is a failed
        round with a reason, never an exception, so the node keeps attesting."""
        started = time.perf_counter()
        self._evidence_id = ""
        self._admitted_at = 0.0
        self._marks = [started]
        self._wake.clear()
        self._in_round = True
        with tracer.start_as_current_span("collector.attest") as span:
            span.set_attribute("attestmesh.node", self.node)
            span.set_attribute("attestmesh.family", self.source.family)
            try:
                result = await self._round(started, self._withdrawals)
            except (AttestmeshError, nats.errors.Error) as exc:
                reason = exc.reason if isinstance(exc, AttestmeshError) else _bus_reason(exc)
                span.set_attribute("attestmesh.error", reason)
                log.warning("round.failed", node=self.node, reason=reason)
                result = RoundResult(
                    self.node, "none", False, False, _ms(started), reason, self._evidence_id
                )
            finally:
                self._in_round = False
            if self._admitted_at:
                result = replace(result, admitted_ms=_ms(self._admitted_at))
            if result.released and len(self._marks) == len(STAGES):
                ends = [*self._marks, time.perf_counter()]
                result = replace(
                    result,
                    stages_ms=tuple(
                        (name, (ends[i + 1] - ends[i]) * 1000.0) for i, name in enumerate(STAGES)
                    ),
                )
            outcome = (
                "released" if result.released else "denied" if result.status != "none" else "failed"
            )
            metrics.attestation_seconds.record(
                result.latency_ms / 1000.0, {"family": self.source.family, "outcome": outcome}
            )
            return result

    async def _round(self, started: float, withdrawals: int) -> RoundResult:
        """Each stage that can go unanswered fails with its own reason (``collector.no_nonce``,
        ``collector.evidence_not_accepted``, ``collector.decision_timeout``,
        ``collector.no_release``), so an operator knows which service to look at.

        ``withdrawals`` is how many revocations the node had seen when the round began: a
        secret released to a round that saw another one is not kept (it cannot tell whether
        that revocation was about its own decision), and the next round starts at once."""
        challenge = await _stage(
            "collector.no_nonce",
            self.bus.request(
                subjects.nonce(self.node),
                events.NonceRequest(node=self.node, family=self.source.family),
                events.NonceChallenge,
            ),
        )
        self._admitted_at = time.perf_counter()
        self._marks.append(self._admitted_at)
        private = X25519PrivateKey.generate()
        public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        report_data = expected_report_data(challenge.nonce, public)
        evidence = await asyncio.to_thread(self.source.collect, report_data)
        self._marks.append(time.perf_counter())
        event = events.EvidenceEvent(
            node=self.node,
            nonce=challenge.nonce,
            public_key=public,
            evidence=evidence,
            simulated=self.source.simulated,
        )
        decisions: asyncio.Queue[signed.SignedDecision] = asyncio.Queue()

        def on_decision(msg: Msg) -> None:
            try:
                decision = events.decode(msg.data, events.Decision)
                decisions.put_nowait(
                    signed.read(
                        decision,
                        self.trusted,
                        node=self.node,
                        evidence_id=event.id,
                        public_key=public,
                        now=self.clock(),
                    )
                )
            except (ParseError, Rejected) as exc:
                self.ignored[exc.reason] += 1
                log.warning("decision.ignored", node=self.node, reason=exc.reason)

        await self._listen_for_decisions()
        self._listeners.add(on_decision)
        try:
            await _stage(
                "collector.evidence_not_accepted",
                self.bus.publish(subjects.evidence(self.source.family, self.node), event),
            )
            self._evidence_id = event.id
            try:
                decision = await asyncio.wait_for(decisions.get(), self.decision_timeout)
            except TimeoutError:
                raise BusError("collector.decision_timeout", "no decision arrived") from None
        finally:
            self._listeners.discard(on_decision)
        self._marks.append(time.perf_counter())
        log.info("decision.received", node=self.node, status=decision.status, allow=decision.allow)
        if decision.refused:
            # The mesh refused this evidence; the node's previous decision stays in force.
            reason = decision.reason or "policy.refused"
            return RoundResult(
                self.node, decision.status, False, False, _ms(started), reason, event.id
            )
        self.last_public_key, self.last_decision_id = public, decision.id
        self.last_evidence_id = event.id
        if not decision.allow:
            # The broker records this deny and revokes the node: drop now, and do not take
            # that announcement of what this round already knows as a reason to attest again.
            reason = decision.reason or "policy.denied"
            self._allowed = False
            self._wake.clear()
            self._forget(reason)
            return RoundResult(
                self.node, decision.status, False, False, _ms(started), reason, event.id
            )
        secret = await _stage("collector.no_release", self._fetch_secret(private, public, decision))
        if self._withdrawals != withdrawals:
            log.warning("secret.discarded", node=self.node, reason=REVOKED_DURING_ROUND)
            return RoundResult(
                self.node, decision.status, True, True, _ms(started), REVOKED_DURING_ROUND, event.id
            )
        self.secrets.put(self.resource, secret)
        self._allowed = True
        if self.on_secret is not None:
            self.on_secret(self.resource, secret)
        return RoundResult(self.node, decision.status, True, True, _ms(started), "", event.id)

    async def _listen_for_decisions(self) -> None:
        """Subscribe to the node's decision subject once, for the node's lifetime.

        Each round used to subscribe before publishing its evidence and unsubscribe once its
        decision came: two protocol operations per round for the server (and a task started
        and cancelled here) to deliver one message. Messages that arrive while no round
        waits are dropped unread, as they were while nothing was subscribed; a waiting round
        reads every message, as its own subscription did."""
        async with self._subscribing:
            if self._decision_sub is None:
                self._decision_sub = await self.bus.nc.subscribe(
                    subjects.decision(self.node), cb=self._on_decision
                )

    async def _on_decision(self, msg: Msg) -> None:
        for listener in list(self._listeners):
            listener(msg)

    def _revoked(self, reason: str) -> None:
        """The broker withdrew this node's decision: drop what it holds and attest again at
        once, unless the node already knew (its last round was denied, and this is the
        broker announcing that very deny: attesting again would only repeat it)."""
        self._withdrawals += 1
        if self._in_round or self._allowed:
            self._wake.set()
        self._allowed = False
        dropped = self.secrets.drop()
        log.warning("revocation.received", node=self.node, reason=reason, dropped=dropped)
        if self.on_revoked is not None:
            self.on_revoked(reason)

    def _forget(self, reason: str) -> None:
        """Drop every held secret and tell the embedding application to drop its copies."""
        self.secrets.drop()
        if self.on_revoked is not None:
            self.on_revoked(reason)

    async def _fetch_secret(
        self, private: X25519PrivateKey, public: bytes, decision: signed.SignedDecision
    ) -> bytes:
        """Ask the broker, presenting the signed decision so it can record it at once; a
        broker that does not (or a decision it will not take that way) may answer that it
        has not recorded it yet, so retry briefly.

        The first retries come after a few milliseconds, backing off to
        ``PENDING_RETRY_MAX_S``: a fixed 50 ms wait was most of a round's latency on an idle
        mesh."""
        deadline = time.monotonic() + self.decision_timeout
        delay = PENDING_RETRY_FIRST_S
        while True:
            request = events.SecretRequest(
                node=self.node,
                resource=self.resource,
                public_key=public,
                decision_id=decision.id,
                evidence_id=decision.evidence_id,
                decision_token=decision.token,
                decision_appraisal=decision.appraisal,
            )
            response = await self.bus.request(
                subjects.secret(self.node), request, events.SecretResponse
            )
            if response.ok:
                wrapped = release.Wrapped(enc=response.enc, ciphertext=response.ciphertext)
                return release.unwrap(
                    wrapped,
                    private,
                    info=release.release_info(self.node, self.resource),
                    aad=request.id.encode(),
                )
            pending = response.reason in ("broker.no_decision", "broker.decision_pending")
            if not pending or time.monotonic() > deadline:
                raise Rejected(response.reason or "broker.refused", "secret not released")
            await asyncio.sleep(delay)
            delay = min(delay * 2, PENDING_RETRY_MAX_S)

    async def run(
        self,
        stop: asyncio.Event,
        *,
        interval: float,
        rounds: int | None = None,
        results: asyncio.Queue[RoundResult] | None = None,
    ) -> None:
        """Attest every ``interval`` seconds (continuous attestation) until ``stop``, and at
        once after a revocation; the node listens on its revocation subject meanwhile."""
        done = 0
        async with self.revocations:
            while not stop.is_set() and (rounds is None or done < rounds):
                result = await self.attest_once()
                done += 1
                if results is not None:
                    results.put_nowait(result)
                if rounds is not None and done >= rounds:
                    break
                await self._pause(stop, interval)

    async def _pause(self, stop: asyncio.Event, interval: float) -> None:
        """Wait for the interval, or less if stopped or revoked meanwhile."""
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waits, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            await asyncio.gather(*waits, return_exceptions=True)


async def _stage(reason: str, step: Awaitable[T]) -> T:
    """Await one stage; the bus giving up on it (nobody answered) becomes ``reason``."""
    try:
        return await step
    except BusError as exc:
        raise BusError(reason, exc.reason) from None
    except nats.errors.Error as exc:
        raise BusError(reason, _bus_reason(exc)) from None


def _bus_reason(exc: nats.errors.Error) -> str:
    """``bus.connection_closed`` and the like: the connection itself failed mid-round."""
    if isinstance(exc, nats.errors.ConnectionClosedError):
        return "bus.connection_closed"
    return "bus.unavailable"


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
