"""Answer requests with bounded concurrency and a bounded queue, and skip the stale ones.

Why: nats-py runs a subscription's callback for one message at a time, so a responder whose
handler awaits KV round trips answered strictly one request after another: the broker's
release path (half a dozen round trips) capped the whole mesh and made every request wait
for all those ahead of it. Under overload it was worse: requests queued without bound inside
the client library, timed out at their senders, were sent again, and the service went on
answering requests nobody waited for any more, so nothing got through (a 2,000-node fleet
collapsed to a few rounds per second). Here:

* up to ``workers`` handlers run at once;
* at most ``queue_limit`` requests wait; a request finding the queue full is answered at
  once with a ``mesh.busy`` :class:`~services.mesh.events.Refusal`, so its sender backs off
  instead of waiting out its timeout (:meth:`services.mesh.bus.Bus.request`);
* a request carries its sender's timeout (header :data:`TIMEOUT_HEADER`, milliseconds,
  bounded); one that waited here for more than :data:`EXPIRY_SHARE` of it is dropped
  unanswered, without running its handler: by the time an answer arrived its sender would
  have given up. The wait is measured from the request's arrival in this process, so no
  clocks of different machines are compared.

Both refusals are counted (``attestmesh_requests_shed_total{subject,reason}``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from services.mesh import events, metrics, telemetry
from services.mesh.errors import AttestmeshError

TIMEOUT_HEADER = "Attestmesh-Timeout-Ms"
BUSY = "mesh.busy"
BACKLOG = "mesh.backlog"
"""Counted (not said) when a nonce is refused busy because the stages behind are full."""
EXPIRED = "mesh.expired"
DEFAULT_TIMEOUT_MS = 5_000
MAX_TIMEOUT_MS = 60_000
EXPIRY_SHARE = 0.8
DEFAULT_WORKERS = 32
DEFAULT_QUEUE_LIMIT = 1_024

log = telemetry.logger("responder")
_MILLISECONDS = re.compile(r"[0-9]{1,6}")
_CLOSED = (nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError)

Handler = Callable[[Msg], Awaitable[events.Message]]


def request_timeout_ms(msg: Msg) -> int:
    """The sender's timeout, if it said one within bounds; else the default."""
    raw = (msg.headers or {}).get(TIMEOUT_HEADER, "")
    if _MILLISECONDS.fullmatch(raw) is None or int(raw) == 0:
        return DEFAULT_TIMEOUT_MS
    return min(int(raw), MAX_TIMEOUT_MS)


class Responder:
    """Serves one subject (in a queue group) through a bounded queue and worker tasks."""

    def __init__(
        self,
        nc: Client,
        subject: str,
        handler: Handler,
        *,
        queue: str,
        workers: int = DEFAULT_WORKERS,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if workers < 1 or queue_limit < 1:
            raise ValueError("a responder needs a worker and room for a request")
        self._nc = nc
        self._subject = subject
        self._handler = handler
        self._queue_group = queue
        self._workers = workers
        self._clock = clock
        self._waiting: asyncio.Queue[tuple[Msg, float]] = asyncio.Queue(queue_limit)
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: Any = None
        self.served = 0
        """Requests whose handler ran (answered or failed); dropped ones are not counted,
        as they say nothing of how fast this replica works through its queue."""
        self.running = 0
        self.shed: collections.Counter[str] = collections.Counter()
        """Requests refused busy or dropped expired, by reason (also a metric)."""

    def __repr__(self) -> str:
        return f"Responder({self._subject!r}, waiting={self._waiting.qsize()})"

    async def start(self) -> Any:
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self._workers)]
        try:
            self._sub = await self._nc.subscribe(
                self._subject, queue=self._queue_group, cb=self._admit
            )
        except BaseException:
            await self.stop()
            raise
        return self._sub

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(*_CLOSED):
                await self._sub.unsubscribe()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _admit(self, msg: Msg) -> None:
        """Runs for each request in the client's delivery order: queue it or refuse it, at
        once, so the client library's own queue never grows."""
        try:
            self._waiting.put_nowait((msg, self._clock()))
        except asyncio.QueueFull:
            self._count(BUSY)
            if msg.reply:
                await self._nc.publish(msg.reply, events.encode(events.Refusal(reason=BUSY)))

    async def _work(self) -> None:
        while True:
            msg, arrived = await self._waiting.get()
            if (self._clock() - arrived) * 1000 > EXPIRY_SHARE * request_timeout_ms(msg):
                self._count(EXPIRED)
                continue
            self.running += 1
            try:
                reply = await self._handler(msg)
                if msg.reply:
                    await self._nc.publish(msg.reply, events.encode(reply))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one request must not stop a worker
                reason = exc.reason if isinstance(exc, AttestmeshError) else "internal.error"
                log.error(
                    "request.failed", subject=msg.subject, reason=reason, error=type(exc).__name__
                )
            finally:
                self.running -= 1
                self.served += 1

    @property
    def waiting(self) -> int:
        """Requests queued or being handled."""
        return self._waiting.qsize() + self.running

    def _count(self, reason: str) -> None:
        self.shed[reason] += 1
        metrics.requests_shed.add(1, {"subject": self._subject, "reason": reason})
