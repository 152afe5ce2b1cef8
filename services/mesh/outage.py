"""Telling a failover from a refusal, and waiting a failover out.

Why one module: the KV, the bus, the policy's loader and the consumers must all sort a
failure the same way. A failover (a server lost, a stream or bucket electing a leader, a
write waiting for its quorum) passes with time, so a consumer waits it out with the message
kept; a refusal (a bucket gone, a full store, a value too large) does not, so waiting on it
would only hold messages back, and it spends a delivery at once. Sorted wrongly one way,
good evidence is dead-lettered over an election; the other way, a broken deployment stalls.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from services.mesh import metrics, telemetry
from services.mesh.errors import BusError, Unavailable

log = telemetry.logger("bus")

UNANSWERED: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    TimeoutError,
)
"""Client errors that mean nobody answered (a JetStream 503 is told apart by its code)."""

OUTAGE_CODES = frozenset({10004, 10008, 10163})
"""JetStream's 503s that pass with time: incomplete results, the system temporarily
unavailable, a per-subject check not ready yet. Its other 503s (insufficient resources,
JetStream or the account not enabled, a store failure) are refusals."""

MAX_PAUSE_S = 1.0
"""The longest pause between in-place retries: a recovered server is noticed within it."""
_FIRST_PAUSE_S = 0.1
_jitter = random.SystemRandom()


def outage_answer(code: int | None, err_code: int | None) -> bool:
    """Whether a JetStream error answer is a failover (a 503 with no code or an outage's)."""
    return code == 503 and (not err_code or err_code in OUTAGE_CODES)


def unanswered(exc: BaseException) -> bool:
    """Whether ``exc`` means the mesh's servers did not answer, rather than refused."""
    if isinstance(exc, Unavailable):
        return True
    if isinstance(exc, nats.js.errors.APIError):
        return outage_answer(exc.code, exc.err_code)
    return isinstance(exc, UNANSWERED)


def mapped(exc: Exception, *, unavailable: str, refused: str, step: str = "") -> BusError:
    """A client error as the mesh's own: :class:`Unavailable` (reason ``unavailable``) if
    nobody answered, else a refusal (reason ``refused``); ``step`` names what failed."""
    if isinstance(exc, nats.js.errors.APIError):
        detail = f"{exc.code}/{exc.err_code or 0}"
    else:
        detail = type(exc).__name__
    if step:
        detail = f"{step}: {detail}"
    if unanswered(exc):
        return Unavailable(unavailable, detail)
    return BusError(refused, detail)


async def handle_through(
    handler: Callable[[Msg], Awaitable[None]],
    msg: Msg,
    *,
    stream: str,
    stop: asyncio.Event,
    ack_wait: float,
    budget: float,
) -> None:
    """Run ``handler``; while it fails only because the mesh's servers do not answer, run it
    again in place, for up to ``budget`` seconds from the first such failure, keeping the
    message meanwhile (the server is told every third of ``ack_wait``, also while an attempt
    runs, so it is not handed to another consumer as well).

    Why: a delivery limit is a budget for messages that cannot be handled. Spent on a
    failover instead (five quick redeliveries are over in seconds, an election on a loaded
    machine can take longer), it dead-letters good evidence and its node never gets a
    decision. Past ``budget``, or once ``stop`` is set, the failure is raised (as
    :class:`Unavailable`) and counts against the limit as any other would."""
    keeper: asyncio.Task[None] | None = None
    gives_up = 0.0
    attempt = 0
    try:
        while True:
            try:
                await handler(msg)
                return
            except Exception as exc:
                if not unanswered(exc):
                    raise
                failure = mapped(exc, unavailable="bus.unavailable", refused="bus.api_error")
                if isinstance(exc, Unavailable):
                    failure = exc
            if keeper is None:
                gives_up = time.monotonic() + budget
                keeper = asyncio.create_task(_keep(msg, ack_wait / 3))
                log.info("consume.waiting_out", stream=stream, reason=failure.reason)
            if stop.is_set() or time.monotonic() >= gives_up:
                raise failure from None
            metrics.outage_retries.add(1, {"stream": stream, "reason": failure.reason})
            ceiling = min(_FIRST_PAUSE_S * 2 ** min(attempt, 16), MAX_PAUSE_S, ack_wait / 3)
            pause = ceiling * (0.5 + _jitter.random() / 2)  # a crowd must not retry as one
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
            attempt += 1
    finally:
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper


async def _keep(msg: Msg, every: float) -> None:
    """Tell the server, every ``every`` seconds, that ``msg`` is still being worked on."""
    while True:
        await asyncio.sleep(every)
        with contextlib.suppress(*UNANSWERED, nats.errors.Error):
            await msg.in_progress()
