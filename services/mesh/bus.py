"""The bus: connect, declare streams and KV buckets, publish, request and consume.

Guarantees the services build on:

* Streams and buckets are declared idempotently at start-up by every service, so start order
  does not matter and a restarted server with file storage comes back with all of them.
* ``publish`` sets ``Nats-Msg-Id`` and retries with the same id until the server answers, so
  a retry after a lost ack is de-duplicated by JetStream instead of processed twice.
* ``consume`` runs a durable pull consumer with explicit ack and bounded redelivery. A message
  that cannot be decoded, or still fails on its last delivery, goes to ``attest.dlq.<stream>``
  with the reason before it is terminated: nothing is dropped silently.
* The connection reconnects forever; consumers and responders resume by themselves.

NATS errors are mapped to :class:`BusError` at this boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from services.mesh import events, metrics, outage, subjects, telemetry
from services.mesh.cluster import server_urls
from services.mesh.config import Config
from services.mesh.errors import AttestmeshError, BusError, ParseError, Rejected, Unavailable
from services.mesh.responder import (
    BUSY,
    DEFAULT_QUEUE_LIMIT,
    DEFAULT_WORKERS,
    TIMEOUT_HEADER,
    Responder,
)

M = TypeVar("M", bound=events.Message)

log = telemetry.logger("bus")

_TRANSIENT: tuple[type[Exception], ...] = (
    *outage.UNANSWERED,
    nats.js.errors.ServiceUnavailableError,
)

DAY = 24 * 3600.0


class _AckError(msgspec.Struct):
    code: int = 0
    err_code: int = 0


class StreamAck(msgspec.Struct, frozen=True):
    """JetStream's answer to a publish: where the message was stored, or why not."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _AckError | None = None

NONCE_TTL_MARGIN_S = 30.0
"""The ``nonces`` bucket keeps a used nonce's entry this much longer than the nonce lives
(:mod:`services.policy.nonces`: its use must not be forgotten while it is valid)."""
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
UNREACHABLE_RETRY_S = 0.2
STOPPING_PUBLISH_S = 2.0
"""How long a stopping consumer tries to file a dead letter: a restart during a failover
must not wait out the whole outage first."""
UNFILED = "consume.dead_letter_failed"
"""The dead-letter count's reason for a dead letter the DLQ stream did not take."""
"""The pause while no server or no responder is there: failing then costs the services
nothing, and a quick retry notices a restarted one at once."""
_jitter = random.SystemRandom()


def backoff_s(attempt: int) -> float:
    """The pause before retry ``attempt`` (0 first): uniform in (0, min(max, first·2ⁿ)]."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(attempt, 16))
    return float(ceiling * (1.0 - _jitter.random()))


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: list[str]
    max_age: float


STREAMS = (
    StreamSpec(subjects.STREAM_EVIDENCE, [subjects.EVIDENCE_ALL], DAY),
    StreamSpec(subjects.STREAM_VERDICTS, [subjects.VERDICT_ALL], DAY),
    StreamSpec(subjects.STREAM_DECISIONS, [subjects.DECISION_ALL, subjects.REVOKED_ALL], DAY),
    StreamSpec(subjects.STREAM_DLQ, [subjects.DLQ_ALL], 7 * DAY),
)


class Bus:
    """One service's connection to NATS and JetStream."""

    def __init__(self, nc: Client, name: str, *, retry_for: float = 30.0) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=min(5.0, retry_for))
        self.name = name
        self.retry_for = retry_for
        """How long an operation is retried while NATS or JetStream does not answer: long
        for services (they outlive a server restart), short for an operator's command."""
        self._responders: list[Responder] = []

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str,
        *,
        wait: float = 30.0,
        nkey_seed_file: str | None = None,
        inbox_prefix: str | None = None,
        retry_for: float = 30.0,
        quiet: bool = False,
    ) -> Bus:
        """Connect, retrying for ``wait`` seconds so services may start before the server.

        ``quiet`` logs connection errors at debug level: an operator's command reports one
        line when it gives up instead of a warning per attempt.

        ``nkey_seed_file`` names the service's NATS identity (an nkey seed); the server's
        per-identity subject permissions then bound what this service may publish.
        Replies arrive below ``inbox_prefix`` (default: the private inbox of identity
        ``name``), the only inbox that identity may subscribe to.
        """
        deadline = time.monotonic() + wait
        prefix = inbox_prefix if inbox_prefix is not None else subjects.inbox(name)

        refused = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            if "authorization" in str(exc).lower():
                refused.set()
            (log.debug if quiet else log.warning)(
                "nats.error", error=type(exc).__name__, detail=str(exc)[:200]
            )

        async def on_disconnect() -> None:
            log.info("nats.disconnected")

        async def on_reconnect() -> None:
            log.info("nats.reconnected")

        while True:
            nc = Client()
            # nats-py retries a refused first connect forever (reconnects are unbounded), so
            # a rejected identity is noticed through the error callback and ends the attempt.
            attempt = asyncio.ensure_future(
                nc.connect(
                    servers=server_urls(url),
                    name=name,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,  # type: ignore[arg-type]
                    connect_timeout=2,
                    allow_reconnect=True,
                    nkeys_seed=nkey_seed_file,
                    inbox_prefix=prefix,
                )
            )
            watch = asyncio.ensure_future(refused.wait())
            remaining = max(deadline - time.monotonic(), 2.0)
            try:
                await asyncio.wait(
                    {attempt, watch}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                watch.cancel()
            if attempt.done() and not attempt.cancelled() and attempt.exception() is None:
                return cls(nc, name, retry_for=retry_for)
            problem: BaseException | str = "timed out"
            if attempt.done() and not attempt.cancelled():
                problem = attempt.exception() or problem
            else:
                attempt.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await attempt
            with contextlib.suppress(Exception):
                await nc.close()
            if refused.is_set() or "authorization" in str(problem).lower():
                raise BusError("bus.unauthorized", f"{url}: authorization violation")
            if time.monotonic() >= deadline:
                raise BusError("bus.connect_failed", f"{url}: {problem}")
            await asyncio.sleep(0.25)

    @classmethod
    @contextlib.asynccontextmanager
    async def session(
        cls,
        config: Config,
        name: str,
        *,
        wait: float = 30.0,
        declare: bool = True,
        inbox_prefix: str | None = None,
        retry_for: float = 30.0,
        quiet: bool = False,
    ) -> AsyncIterator[Bus]:
        """Connect as ``name`` per ``config``, declare streams and buckets, close on exit.

        ``declare=False`` is for collectors: they only publish evidence and make requests, so
        their NATS identity needs no JetStream API rights at all.
        """
        bus = await cls.connect(
            config.nats_url,
            name,
            wait=wait,
            nkey_seed_file=config.nats_nkey_seed_file,
            inbox_prefix=inbox_prefix,
            retry_for=retry_for,
            quiet=quiet,
        )
        try:
            if declare:
                await bus.setup(nonce_ttl=config.nonce_ttl_s, replicas=config.jetstream_replicas)
            yield bus
        finally:
            await bus.close()

    async def close(self) -> None:
        """Flush what is buffered (acks, replies), then close without a long drain."""
        for responder in self._responders:
            await responder.stop()
        self._responders.clear()
        if self.nc.is_closed:
            return
        with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
            await self.nc.flush(timeout=1)
        await self.nc.close()

    async def setup(self, *, nonce_ttl: float = 120.0, replicas: int = 1) -> None:
        """Declare every stream and bucket; safe to run concurrently and repeatedly.

        A bucket that already exists with other settings (another process configured a
        different nonce TTL, say) is used as it is rather than failing the service.
        """
        for spec in STREAMS:
            config = api.StreamConfig(
                name=spec.name,
                subjects=spec.subjects,
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                max_age=spec.max_age,
                max_msg_size=events.MAX_MESSAGE_BYTES,
                max_bytes=1024 * 1024 * 1024,
                duplicate_window=120.0,
                num_replicas=replicas,
            )
            await self._retry(functools.partial(self._declare_stream, config))
        buckets = [
            api.KeyValueConfig(
                bucket=subjects.BUCKET_NONCES, ttl=nonce_ttl + NONCE_TTL_MARGIN_S, history=1
            ),
            api.KeyValueConfig(bucket=subjects.BUCKET_REFVALUES, history=5),
            api.KeyValueConfig(bucket=subjects.BUCKET_POLICIES, history=5),
            api.KeyValueConfig(bucket=subjects.BUCKET_COLLATERAL, history=1),
            api.KeyValueConfig(bucket=subjects.BUCKET_BROKER, history=1),
            api.KeyValueConfig(bucket=subjects.BUCKET_PINS, history=5),
            api.KeyValueConfig(bucket=subjects.BUCKET_APPRAISALS, history=1),
        ]
        for kv in buckets:
            kv.storage = api.StorageType.FILE
            kv.max_value_size = events.MAX_MESSAGE_BYTES
            kv.replicas = replicas
            await self._retry(functools.partial(self._declare_bucket, kv))

    async def _declare_stream(self, config: api.StreamConfig) -> None:
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await self.js.update_stream(config)

    async def _declare_bucket(self, config: api.KeyValueConfig) -> None:
        try:
            await self.js.create_key_value(config)
        except nats.js.errors.BadRequestError as exc:
            log.warning("bus.bucket_exists", bucket=config.bucket, detail=exc.description)

    async def _retry(self, op: Callable[[], Awaitable[Any]], retry_for: float | None = None) -> Any:
        deadline = time.monotonic() + (self.retry_for if retry_for is None else retry_for)
        while True:
            try:
                return await op()
            except nats.js.errors.APIError as exc:
                if not outage.unanswered(exc):
                    raise BusError("bus.api_error", f"{exc.code}: {exc.description}") from None
                failure = f"{exc.code}/{exc.err_code or 0}"
            except outage.UNANSWERED as exc:
                failure = type(exc).__name__
            if time.monotonic() >= deadline:
                raise Unavailable("bus.unavailable", failure) from None
            await asyncio.sleep(0.2)

    async def publish(
        self,
        subject: str,
        message: events.Message,
        *,
        msg_id: str | None = None,
        retry_for: float | None = None,
    ) -> StreamAck:
        """Publish to a stream with de-duplication, retrying until acknowledged.

        The acknowledgement is decoded with msgspec rather than through nats-py's JSON and
        dataclass layers (about 50 µs less per publish, three publishes per attestation)."""
        headers = telemetry.inject({"Nats-Msg-Id": msg_id or message.id})
        payload = events.encode(message)

        async def once() -> StreamAck:
            reply = await self.nc.request(subject, payload, timeout=2.0, headers=headers)
            try:
                ack = msgspec.json.decode(reply.data, type=StreamAck)
            except (msgspec.DecodeError, msgspec.ValidationError):
                raise BusError("bus.api_error", "malformed publish acknowledgement") from None
            if ack.error is not None:
                if ack.error.code == 503:
                    raise nats.js.errors.ServiceUnavailableError(
                        code=503, err_code=ack.error.err_code
                    )
                raise BusError("bus.api_error", f"{ack.error.code}: {ack.error.err_code}")
            if ack.seq <= 0:
                raise BusError("bus.api_error", "the publish acknowledgement names no sequence")
            return ack

        acknowledged: StreamAck = await self._retry(once, retry_for)
        return acknowledged

    async def notify(self, subject: str, message: events.Message) -> None:
        """Core publish for replies and best-effort notifications (no stream)."""
        await self.nc.publish(subject, events.encode(message), headers=telemetry.inject())

    async def request(
        self,
        subject: str,
        message: events.Message,
        reply: type[M],
        *,
        timeout: float = 5.0,
        retry_for: float | None = None,
    ) -> M:
        """Request/reply, asked again while nobody answers (a responder restarting), the
        request times out, or the responder says it is busy (after the pause it names, if
        it names one: between half and one and a half times that, so the refused spread out).

        Each retry sends the same bytes (the same request id). After a timeout or a busy
        answer it waits a randomised, growing pause (:func:`backoff_s`): a crowd of senders
        whose requests timed out together must not come back together, or an overloaded
        service never recovers; with no server or responder, a short fixed one.
        The timeout travels with the request, so a responder can drop it unread once its
        answer would come too late (:mod:`services.mesh.responder`). A
        :class:`~services.mesh.events.Refusal` reply other than busy raises
        :class:`Rejected`.
        """
        payload = events.encode(message)
        headers = telemetry.inject({TIMEOUT_HEADER: str(max(1, int(timeout * 1000)))})
        deadline = time.monotonic() + (self.retry_for if retry_for is None else retry_for)
        attempt = 0
        while True:
            hinted = 0
            try:
                msg = await self.nc.request(subject, payload, timeout=timeout, headers=headers)
            except _TRANSIENT as exc:
                failure = f"{type(exc).__name__}"
            else:
                try:
                    return events.decode(msg.data, reply)
                except ParseError:
                    refusal = events.decode(msg.data, events.Refusal)
                    if refusal.reason != BUSY:
                        raise Rejected(refusal.reason, f"{subject} refused the request") from None
                    failure = BUSY
                    if isinstance(refusal.retry_after_ms, int):
                        hinted = refusal.retry_after_ms
            overloaded = failure in (BUSY, "TimeoutError")
            pause = backoff_s(attempt) if overloaded else UNREACHABLE_RETRY_S
            if hinted:
                pause = max(hinted / 1000 * (0.5 + _jitter.random()), BACKOFF_FIRST_S)
            if time.monotonic() + pause >= deadline:
                if failure == BUSY:
                    raise BusError("bus.busy", failure)
                raise Unavailable("bus.unavailable", failure)
            await asyncio.sleep(pause)
            attempt += 1

    async def serve(
        self,
        subject: str,
        handler: Callable[[Msg], Awaitable[events.Message]],
        *,
        queue: str,
        workers: int = DEFAULT_WORKERS,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
    ) -> Responder:
        """Answer requests on ``subject`` in queue group ``queue`` (load-balanced replicas),
        up to ``workers`` at once, refusing busy beyond ``queue_limit`` waiting
        (:class:`~services.mesh.responder.Responder`)."""
        responder = Responder(
            self.nc, subject, handler, queue=queue, workers=workers, queue_limit=queue_limit
        )
        await responder.start()
        self._responders.append(responder)
        return responder

    async def key_value(self, bucket: str) -> Any:
        return await self._retry(lambda: self.js.key_value(bucket))

    async def consume(
        self,
        *,
        stream: str,
        durable: str,
        subject: str,
        handler: Callable[[Msg], Awaitable[None]],
        stop: asyncio.Event,
        max_deliver: int = 5,
        ack_wait: float = 30.0,
        batch: int = 16,
    ) -> None:
        """Run a durable pull consumer until ``stop`` is set.

        ``handler`` raising :class:`ParseError` or :class:`Rejected` marks the message as
        poison (dead-lettered at once); any other failure is retried with back-off until
        ``max_deliver``, then dead-lettered.

        Consumption is continuous with at most ``batch`` messages in flight: a pull asks for
        as many messages as there are free slots, so one slow message delays only itself,
        not the next pull (a batch awaited as a whole made every message wait for the
        slowest of its batch). Messages still in flight when ``stop`` is set are finished
        and acknowledged before this returns; if this task is cancelled, so are they, and
        JetStream redelivers them after ``ack_wait`` (at-least-once either way).
        """
        config = api.ConsumerConfig(
            durable_name=durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            filter_subject=subject,
            max_ack_pending=1024,
        )
        psub = await self._retry(
            lambda: self.js.pull_subscribe(subject, durable=durable, stream=stream, config=config)
        )
        deliver = functools.partial(
            self._deliver,
            stream=stream,
            handler=handler,
            max_deliver=max_deliver,
            stop=stop,
            ack_wait=ack_wait,
        )
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                if len(in_flight) >= batch:
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    in_flight = _reap(in_flight)
                    continue
                try:
                    msgs = await psub.fetch(batch - len(in_flight), timeout=1.0)
                except _TRANSIENT:
                    continue
                except nats.js.errors.APIError as exc:
                    log.warning("consume.fetch_failed", stream=stream, code=exc.code)
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    in_flight.add(asyncio.create_task(deliver(msg)))
                in_flight = _reap(in_flight)
            if in_flight:
                await asyncio.gather(*in_flight)
        finally:
            for task in in_flight:
                task.cancel()
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)

    async def _deliver(
        self,
        msg: Msg,
        *,
        stream: str,
        handler: Callable[[Msg], Awaitable[None]],
        max_deliver: int,
        stop: asyncio.Event,
        ack_wait: float,
    ) -> None:
        deliveries = msg.metadata.num_delivered
        try:
            await outage.handle_through(
                handler, msg, stream=stream, stop=stop, ack_wait=ack_wait, budget=self.retry_for
            )
        except (ParseError, Rejected) as exc:
            await self._dead_letter(msg, stream, exc.reason, deliveries, exc.detail)
            return
        except AttestmeshError as exc:
            await self._retry_or_dead_letter(
                msg, stream, exc.reason, deliveries=deliveries, max_deliver=max_deliver, stop=stop
            )
            return
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the consumer
            log.error("consume.handler_crashed", stream=stream, error=type(exc).__name__)
            reason = f"internal.{type(exc).__name__}"
            await self._retry_or_dead_letter(
                msg, stream, reason, deliveries=deliveries, max_deliver=max_deliver, stop=stop
            )
            return
        with contextlib.suppress(*_TRANSIENT, nats.errors.MsgAlreadyAckdError):
            await msg.ack()

    async def _retry_or_dead_letter(
        self,
        msg: Msg,
        stream: str,
        reason: str,
        *,
        deliveries: int,
        max_deliver: int,
        stop: asyncio.Event,
    ) -> None:
        if deliveries >= max_deliver:
            # Stopping: filing it may not wait out the servers as long as running would.
            patience = STOPPING_PUBLISH_S if stop.is_set() else None
            await self._dead_letter(msg, stream, reason, deliveries, patience=patience)
            return
        log.info("consume.retry", stream=stream, reason=reason, deliveries=deliveries)
        with contextlib.suppress(*_TRANSIENT, nats.errors.MsgAlreadyAckdError):
            await msg.nak(delay=min(0.2 * 2**deliveries, 10.0))

    async def _dead_letter(
        self,
        msg: Msg,
        stream: str,
        reason: str,
        deliveries: int,
        detail: str = "",
        *,
        patience: float | None = None,
    ) -> None:
        letter = events.DeadLetter(
            stream=stream,
            subject=msg.subject,
            reason=reason,
            detail=detail[: events.MAX_DETAIL],
            deliveries=deliveries,
            payload=msg.data[: events.MAX_MESSAGE_BYTES // 2],
        )
        try:
            await self.publish(subjects.dlq(stream), letter, retry_for=patience)
        except BusError as exc:
            # Kept for another try if deliveries remain; at the limit the server drops it,
            # and this line and the count are all that is left of it. Either way the
            # consumer carries on.
            metrics.dead_letters.add(1, {"stream": stream, "reason": UNFILED})
            log.error(
                "consume.dead_letter_failed",
                stream=stream,
                reason=reason,
                deliveries=deliveries,
                failure=exc.reason,
            )
            with contextlib.suppress(*_TRANSIENT, nats.errors.MsgAlreadyAckdError):
                await msg.nak(delay=min(0.2 * 2**deliveries, 10.0))
            return
        metrics.dead_letters.add(1, {"stream": stream, "reason": reason})
        log.warning("consume.dead_lettered", stream=stream, reason=reason, deliveries=deliveries)
        with contextlib.suppress(*_TRANSIENT, nats.errors.MsgAlreadyAckdError):
            await msg.term()


def _reap(tasks: set[asyncio.Task[None]]) -> set[asyncio.Task[None]]:
    """The tasks still running; one that failed re-raises here, as it did from ``gather``
    (a handler's own errors are dealt with in ``_deliver``, so this is a crash to surface)."""
    for task in tasks:
        if task.done():
            task.result()
    return {task for task in tasks if not task.done()}
