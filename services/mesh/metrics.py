"""Native metrics: what every service counts, scraped by Prometheus or pushed over OTLP.

Why native instruments and not span metrics: rates and latencies should not depend on an
OpenTelemetry Collector build that derives them from spans, and a scrape endpoint is what
operators already point Prometheus at. Instruments are created from the API's global meter, so
they cost nothing until :func:`configure` installs a provider with a reader; a process that
exports nothing records nothing.

Label values are bounded by construction: families, statuses, streams, consumers and reason
codes, never node ids, evidence ids or anything a client chooses freely.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

SECONDS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
"""Latency buckets: the mesh aims at milliseconds, and a 30 s decision timeout bounds the top."""

_meter = metrics.get_meter("attestmesh")

evidence_received = _meter.create_counter(
    "attestmesh_evidence_received", description="Evidence messages a verifier took up, by family"
)
verdicts = _meter.create_counter(
    "attestmesh_verdicts", description="Signed verdicts published, by family and EAR status"
)
decisions = _meter.create_counter(
    "attestmesh_decisions", description="Signed release decisions published, by allow"
)
releases = _meter.create_counter(
    "attestmesh_releases", description="Secret requests answered, by outcome and reason code"
)
revocations = _meter.create_counter(
    "attestmesh_revocations", description="Nodes revoked (attest.revoked.<node> published)"
)
revocations_received = _meter.create_counter(
    "attestmesh_revocations_received",
    description="Revocations a collector received for its own node, by outcome (applied: "
    "secrets dropped; ignored: malformed) and reason code",
)
requests_shed = _meter.create_counter(
    "attestmesh_requests_shed",
    description="Requests a service did not serve: refused busy (queue full) or dropped "
    "expired (waited past the sender's timeout), by subject and reason",
)
dead_letters = _meter.create_counter(
    "attestmesh_dead_letters", description="Messages dead-lettered, by stream and reason code"
)
outage_retries = _meter.create_counter(
    "attestmesh_outage_retries",
    description="Consumed messages handled again in place because the mesh's servers did not "
    "answer (a failover), by stream and reason code: not counted against the delivery limit",
)
service_restarts = _meter.create_counter(
    "attestmesh_service_restarts",
    description="Service processes restarted by the supervisor, by service and exit reason",
)
verification_seconds = _meter.create_histogram(
    "attestmesh_verification_seconds",
    unit="s",
    description="Parse, verify and appraise time of one evidence, by family",
    explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
)
attestation_seconds = _meter.create_histogram(
    "attestmesh_attestation_seconds",
    unit="s",
    description="One attestation round end to end, nonce to secret, as a collector saw it",
    explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
)

NAMES = (
    "attestmesh_evidence_received_total",
    "attestmesh_verdicts_total",
    "attestmesh_decisions_total",
    "attestmesh_releases_total",
    "attestmesh_revocations_total",
    "attestmesh_revocations_received_total",
    "attestmesh_dead_letters_total",
    "attestmesh_requests_shed_total",
    "attestmesh_outage_retries_total",
    "attestmesh_service_restarts_total",
    "attestmesh_verification_seconds",
    "attestmesh_attestation_seconds",
    "attestmesh_consumer_pending",
    "attestmesh_consumer_ack_pending",
    "attestmesh_consumer_redelivered",
)
"""Every metric family as Prometheus names it (counters get ``_total``; histograms add
``_bucket``/``_sum``/``_count``). The dashboard test checks its queries against this list."""


@dataclass
class ConsumerLag:
    """The last JetStream consumer info this process read for each of its durable consumers.

    Observable gauges are read by the exporter's thread, which must not block on NATS, so an
    asyncio task polls ``consumer_info`` and the callbacks only read these numbers.
    """

    consumers: Sequence[tuple[str, str]]
    """(stream, durable) pairs this process consumes from."""
    interval: float = 5.0
    pending: dict[str, int] = field(default_factory=dict)
    ack_pending: dict[str, int] = field(default_factory=dict)
    redelivered: dict[str, int] = field(default_factory=dict)

    async def poll_once(self, js: Any) -> None:
        for stream, durable in self.consumers:
            try:
                info = await js.consumer_info(stream, durable)
            except (nats.errors.Error, TimeoutError):
                for values in (self.pending, self.ack_pending, self.redelivered):
                    values.pop(durable, None)
                continue
            self.pending[durable] = int(info.num_pending or 0)
            self.ack_pending[durable] = int(info.num_ack_pending or 0)
            self.redelivered[durable] = int(info.num_redelivered or 0)

    async def run(self, js: Any, stop: asyncio.Event) -> None:
        _LAGS.append(self)
        try:
            while not stop.is_set():
                await self.poll_once(js)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
        finally:
            _LAGS.remove(self)


_LAGS: list[ConsumerLag] = []


def _observe(attribute: str) -> Any:
    def callback(_: CallbackOptions) -> Iterable[Observation]:
        for lag in list(_LAGS):
            values: dict[str, int] = getattr(lag, attribute)
            for consumer, value in list(values.items()):
                yield Observation(value, {"consumer": consumer})

    return callback


_meter.create_observable_gauge(
    "attestmesh_consumer_pending",
    callbacks=[_observe("pending")],
    description="Messages in the stream not yet delivered to the durable consumer",
)
_meter.create_observable_gauge(
    "attestmesh_consumer_ack_pending",
    callbacks=[_observe("ack_pending")],
    description="Messages delivered to the consumer and not yet acknowledged",
)
_meter.create_observable_gauge(
    "attestmesh_consumer_redelivered",
    callbacks=[_observe("redelivered")],
    description="Messages the consumer has had redelivered (JetStream's running count)",
)
