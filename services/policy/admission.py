"""Admission: start no new round while the stages behind the nonce are backed up.

Why: a nonce is where a round begins, and issuing one is cheap; verifying, appraising and
releasing are not. Issued freely under overload, nonces let the evidence and verdict streams
fill faster than they drain: every round then waits in the queues for longer than its node
waits for a decision, so the mesh works at full speed on rounds nobody will use (a fleet
offered twice the mesh's peak had 1,000 to 1,500 messages pending and released rounds 26 s
after they began). Refusing the nonce instead, with ``mesh.busy``, makes the node back off
and come back (:meth:`services.mesh.bus.Bus.request`), so the queues stay short and the
rounds that start, finish.

The backlog a new round would queue behind is read from JetStream itself, shared by every
replica: for the node's family, its verifiers' consumer on ``EVIDENCE``, plus the policy's
own consumer on ``VERDICTS`` and the broker's on ``DECISIONS`` (pending and unacknowledged
messages), polled every :data:`POLL_INTERVAL_S` with one consumer listing per stream. A
round is refused when that backlog reaches ``max_backlog`` messages, or, from
:data:`MIN_BACKLOG` messages on, when it would take more than ``max_wait_s`` to drain at the
rate each stage has delivered lately: the limit follows the machine, and a stage that has
stopped delivering admits nothing behind it. One family's stalled verifier therefore holds
back only that family's nodes.

While the stages are backing up (a backlog of :data:`MIN_BACKLOG` or more that would take
from :data:`PACE_FROM` of ``max_wait_s`` to drain), rounds are also paced: each family admits
at most :data:`HEADROOM` times as many rounds per second as the slowest stage behind it has
lately delivered, with a burst of :data:`BURST`. Without pacing, the nodes refused while the
mesh was backed up all came back together the moment a reading showed room, so the queues
swung between empty and full every poll and an admitted round waited seconds in them. A
stage with a backlog is busy, so what it delivers is what it can do: pacing at that rate
keeps the queues level instead. Pacing starts no sooner: a mesh at its peak with a short
queue would refuse rounds it could take, and keep their nodes waiting out a retry hint. Each
policy replica paces on its own (the nonce requests are spread over the replicas, so the mesh
may admit up to that many times the rate); the backlog limit bounds the total either way.

A refused node is told when to come back (``retry_after_ms``). The hint is tuned each poll
so that the refused come back at about the rate the family is admitting: refusals arriving
faster than admissions lengthen it, slower shorten it (within :data:`MIN_RETRY_AFTER_S` and
:data:`MAX_RETRY_AFTER_S`). Left to their own growing back-off, a crowd of refused nodes
asked again ten to fifteen times per round admitted, and answering them cost the policy and
the server as much as the rounds themselves.

This is load shedding, not a security control: if the backlog cannot be read (the server
failing over, no permission), or the last reading is older than :data:`STALE_AFTER_S`,
rounds are admitted as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import nats.errors

from services.mesh import events, subjects, telemetry
from services.mesh.errors import ParseError

DEFAULT_MAX_BACKLOG = 256
DEFAULT_MAX_WAIT_S = 1.0
MIN_BACKLOG = 16
MIN_RATE = 1.0
SMOOTHING = 0.5
MAX_REPLICAS = 64
BURST = 16.0
PACE_FROM = 0.5
HEADROOM = 1.25
OTHER_FAMILIES = "*"
MIN_RETRY_AFTER_S = 0.25
MAX_RETRY_AFTER_S = 20.0
POLL_INTERVAL_S = 0.5
STALE_AFTER_S = 5.0
VERIFIER_PREFIX = "verifier-"
STREAMS = (subjects.STREAM_EVIDENCE, subjects.STREAM_VERDICTS, subjects.STREAM_DECISIONS)
SHARED = ((subjects.STREAM_VERDICTS, "policy"), (subjects.STREAM_DECISIONS, "broker"))

log = telemetry.logger("admission")


@dataclass(frozen=True)
class _Stage:
    backlog: int
    delivered: int
    rate: float | None
    """Deliveries per second, smoothed over polls (``None`` until two readings)."""

    def after(self, before: _Stage, elapsed: float) -> _Stage:
        """This reading with its rate: deliveries since ``before``, ``elapsed`` seconds
        earlier, smoothed with ``before``'s rate (none if the count went back: a new
        consumer or replica).

        Only a stage that had a backlog (:data:`MIN_BACKLOG`) through the interval shows
        what it can do; an idle one delivered what it was offered. Taking that as its pace
        made a burst after a quiet spell look seconds long to drain (32 nodes starting
        together waited up to 0.95 s for their nonces), so the rate learnt while it was
        busy is kept instead."""
        if elapsed <= 0 or self.delivered < before.delivered:
            return self
        if before.backlog < MIN_BACKLOG:
            return replace(self, rate=before.rate)
        recent = (self.delivered - before.delivered) / elapsed
        if before.rate is not None:
            recent = SMOOTHING * recent + (1 - SMOOTHING) * before.rate
        return replace(self, rate=recent)

    def wait_s(self) -> float:
        if self.rate is None or self.backlog == 0:
            return 0.0
        return self.backlog / max(self.rate, MIN_RATE)


def _together(replicas: list[_Stage]) -> _Stage:
    """Replicas of one service as one stage: their backlogs and rates add up (a replica
    whose rate is not known yet adds its backlog only, which errs towards caution)."""
    rates = [stage.rate for stage in replicas if stage.rate is not None]
    return _Stage(
        backlog=sum(stage.backlog for stage in replicas),
        delivered=sum(stage.delivered for stage in replicas),
        rate=sum(rates) if rates else None,
    )


class Admission:
    """The latest backlog per consumer, and whether it leaves room for another round.

    A round is admitted while the messages it would queue behind are fewer than
    ``max_backlog`` and, once there are at least :data:`MIN_BACKLOG` of them, would drain in
    under ``max_wait_s`` at the rate each stage has been delivering (so the limit follows
    the machine: a slow mesh holds fewer rounds, a stalled stage none)."""

    def __init__(
        self,
        js: Any,
        *,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._js = js
        self.max_backlog = max_backlog
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._stages: dict[tuple[str, str], _Stage] = {}
        self._read_at: float | None = None
        self._reported: dict[str, tuple[float, _Stage]] = {}
        """Per replica of a request-serving service (the broker), its latest load report
        and when it came."""
        self._buckets: dict[str, tuple[float, float]] = {}
        """Per family, the rounds it may still admit while paced, and when that was counted."""
        self._answers: dict[str, list[int]] = {}
        """Per family, rounds admitted and refused since the last poll."""
        self._retry_after: dict[str, float] = {}
        """Per family, the pause a refused node is told to take (seconds)."""

    def __repr__(self) -> str:
        return f"Admission(max_backlog={self.max_backlog}, max_wait_s={self.max_wait_s})"

    def _behind(self, family: str) -> list[_Stage]:
        """The stages a new round of ``family`` would queue in (none if unknown or stale):
        the consumers' backlogs, and the requests waiting in the broker, its replicas that
        reported lately taken together (they drain side by side: one replica's rate is its
        share of the stage's)."""
        now = self._clock()
        replicas: dict[str, list[_Stage]] = {}
        for key, (at, stage) in self._reported.items():
            if now - at <= STALE_AFTER_S:
                replicas.setdefault(key.split("/", 1)[0], []).append(stage)
        reported = [_together(stages) for stages in replicas.values()]
        if self._read_at is None or now - self._read_at > STALE_AFTER_S:
            return reported
        pairs = [
            *SHARED,
            *([(subjects.STREAM_EVIDENCE, VERIFIER_PREFIX + family)] if family else []),
        ]
        return [self._stages[pair] for pair in pairs if pair in self._stages] + reported

    def on_report(self, service: str, report: events.LoadReport) -> None:
        """Take a replica's load report (requests waiting, served so far)."""
        now = self._clock()
        key = f"{service}/{report.replica}"
        before = self._reported.get(key)
        stage = _Stage(report.waiting, report.served, None)
        if before is not None:
            stage = stage.after(before[1], now - before[0])
        self._reported[key] = (now, stage)
        if len(self._reported) > MAX_REPLICAS:
            oldest = min(self._reported, key=lambda k: self._reported[k][0])
            del self._reported[oldest]

    async def listen(self, nc: Any) -> Any:
        """Subscribe to the services' load reports (``attest.load.*``)."""

        async def on_message(msg: Any) -> None:
            try:
                report = events.decode(msg.data, events.LoadReport)
            except ParseError:
                log.debug("admission.bad_report", subject=msg.subject)
                return
            self.on_report(msg.subject.rsplit(".", 1)[-1], report)

        return await nc.subscribe(subjects.LOAD_ALL, cb=on_message)

    def backlog(self, family: str) -> int:
        """Messages a new round of ``family`` would queue behind (0 if unknown or stale)."""
        return sum(stage.backlog for stage in self._behind(family))

    def wait_s(self, family: str) -> float:
        """How long those messages would take to drain at the stages' recent rates."""
        return sum(stage.wait_s() for stage in self._behind(family))

    def admits(self, family: str) -> bool:
        """Whether a round of ``family`` may start now (counted for the retry hint)."""
        admitted = self._admits(family)
        counts = self._answers.setdefault(self._tracked(family), [0, 0])
        counts[0 if admitted else 1] += 1
        return admitted

    def _tracked(self, family: str) -> str:
        """The family under which pacing and the hint are kept: a family with a verifier
        consumer, else :data:`OTHER_FAMILIES`. The name comes from the node's request, so
        made-up names must not each get state of their own (nor push out a real family's)."""
        known = (subjects.STREAM_EVIDENCE, VERIFIER_PREFIX + family) in self._stages
        return family if family and known else OTHER_FAMILIES

    def _admits(self, family: str) -> bool:
        stages = self._behind(family)
        backlog = sum(stage.backlog for stage in stages)
        if backlog >= self.max_backlog:
            return False
        if backlog < MIN_BACKLOG:
            return True
        wait = sum(s.wait_s() for s in stages)
        if wait >= self.max_wait_s:
            return False
        return wait < PACE_FROM * self.max_wait_s or self._paced(family, stages)

    def retry_after_ms(self, family: str) -> int:
        """How long a node of ``family`` refused now should wait before asking again."""
        return round(self._retry_after.get(self._tracked(family), MIN_RETRY_AFTER_S) * 1000)

    def _retune(self) -> None:
        """Per family, scale the hint by refusals over admissions since the last poll: at
        one refusal per admission, the refused crowd comes back as fast as it is let in."""
        for family, (admitted, refused) in self._answers.items():
            hint = self._retry_after.get(family, MIN_RETRY_AFTER_S)
            if refused:
                hint *= min(refused / max(admitted, 1), 4.0)
            else:
                hint /= 2
            self._retry_after[family] = min(max(hint, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S)
        self._answers = {}

    def _paced(self, family: str, stages: list[_Stage]) -> bool:
        """Take one round from ``family``'s bucket, refilled at :data:`HEADROOM` times the
        slowest stage's rate (admitted freely while no stage's rate is known yet)."""
        rates = [stage.rate for stage in stages if stage.rate is not None]
        if not rates:
            return True
        now = self._clock()
        tracked = self._tracked(family)
        tokens, at = self._buckets.get(tracked, (BURST, now))
        rate = HEADROOM * max(min(rates), MIN_RATE)
        tokens = min(BURST, tokens + max(now - at, 0.0) * rate)
        admitted = tokens >= 1.0
        self._buckets[tracked] = (tokens - 1.0 if admitted else tokens, now)
        return admitted

    async def poll_once(self) -> None:
        self._retune()
        now = self._clock()
        found: dict[tuple[str, str], _Stage] = {}
        for stream in STREAMS:
            try:
                consumers = await self._js.consumers_info(stream)
            except (nats.errors.Error, TimeoutError) as exc:
                log.debug("admission.unreadable", stream=stream, error=type(exc).__name__)
                return  # keep the last reading; it turns stale rather than wrong
            for info in consumers:
                durable = info.config.durable_name or info.name
                if durable:
                    found[(stream, durable)] = self._stage(
                        (stream, durable), info, now - (self._read_at or now)
                    )
        self._stages = found
        self._read_at = now

    def _stage(self, pair: tuple[str, str], info: Any, elapsed: float) -> _Stage:
        backlog = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        delivered = int(getattr(info.delivered, "consumer_seq", 0) or 0)
        before = self._stages.get(pair)
        stage = _Stage(backlog, delivered, None)
        return stage if before is None else stage.after(before, elapsed)

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop``. Load shedding must never take the policy down with it: an
        unexpected failure is logged, and the reading turns stale (admitting as before)."""
        while not stop.is_set():
            try:
                await self.poll_once()
            except Exception as exc:  # noqa: BLE001 - see the docstring
                log.error("admission.poll_failed", error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_INTERVAL_S)
