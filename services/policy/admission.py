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
messages), polled every :data:`POLL_INTERVAL_S` with one consumer listing per stream. One
family's stalled verifier therefore holds back only that family's nodes.

This is load shedding, not a security control: if the backlog cannot be read (the server
failing over, no permission), or the last reading is older than :data:`STALE_AFTER_S`,
rounds are admitted as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import nats.errors

from services.mesh import subjects, telemetry

DEFAULT_MAX_BACKLOG = 256
POLL_INTERVAL_S = 0.5
STALE_AFTER_S = 5.0
VERIFIER_PREFIX = "verifier-"
STREAMS = (subjects.STREAM_EVIDENCE, subjects.STREAM_VERDICTS, subjects.STREAM_DECISIONS)
SHARED = ((subjects.STREAM_VERDICTS, "policy"), (subjects.STREAM_DECISIONS, "broker"))

log = telemetry.logger("admission")


class Admission:
    """The latest backlog per consumer, and whether it leaves room for another round."""

    def __init__(
        self,
        js: Any,
        *,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._js = js
        self.max_backlog = max_backlog
        self._clock = clock
        self._backlog: dict[tuple[str, str], int] = {}
        self._read_at: float | None = None

    def __repr__(self) -> str:
        return f"Admission(max_backlog={self.max_backlog})"

    def backlog(self, family: str) -> int:
        """Messages a new round of ``family`` would queue behind (0 if unknown or stale)."""
        if self._read_at is None or self._clock() - self._read_at > STALE_AFTER_S:
            return 0
        shared = sum(self._backlog.get(pair, 0) for pair in SHARED)
        own = self._backlog.get((subjects.STREAM_EVIDENCE, VERIFIER_PREFIX + family), 0)
        return shared + (own if family else 0)

    def admits(self, family: str) -> bool:
        return self.backlog(family) < self.max_backlog

    async def poll_once(self) -> None:
        found: dict[tuple[str, str], int] = {}
        for stream in STREAMS:
            try:
                consumers = await self._js.consumers_info(stream)
            except (nats.errors.Error, TimeoutError) as exc:
                log.debug("admission.unreadable", stream=stream, error=type(exc).__name__)
                return  # keep the last reading; it turns stale rather than wrong
            for info in consumers:
                durable = info.config.durable_name or info.name
                if durable:
                    found[(stream, durable)] = int(info.num_pending or 0) + int(
                        info.num_ack_pending or 0
                    )
        self._backlog = found
        self._read_at = self._clock()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.poll_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_INTERVAL_S)
