"""Logs and traces: structlog JSON lines and OpenTelemetry spans, joined by trace id.

Every hop puts the W3C ``traceparent`` into the NATS headers, so one attestation is one trace
from the collector's span to the secret release. Spans and logs carry ids, families, statuses
and reason codes, never evidence secrets, wrapped keys or secret values.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_state = {"configured": False}


def _add_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event["trace_id"] = format(ctx.trace_id, "032x")
        event["span_id"] = format(ctx.span_id, "016x")
    return event


def configure(
    service: str,
    *,
    level: str = "info",
    otlp_endpoint: str | None = None,
    stream: TextIO | None = None,
    extra_processor: SpanProcessor | None = None,
) -> None:
    """Configure logging and tracing once per process (later calls only add processors)."""
    if not _state["configured"]:
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                _add_trace_ids,
                structlog.processors.JSONRenderer(),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(
                logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
            ),
            logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
            cache_logger_on_first_use=False,
        )
        structlog.contextvars.bind_contextvars(service=service)
        resource = Resource.create({"service.name": f"attestmesh-{service}"})
        provider = TracerProvider(resource=resource)
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            endpoint = otlp_endpoint.rstrip("/") + "/v1/traces"
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        trace.set_tracer_provider(provider)
        _state["configured"] = True
    provider_now = trace.get_tracer_provider()
    if extra_processor is not None and isinstance(provider_now, TracerProvider):
        provider_now.add_span_processor(extra_processor)


def shutdown() -> None:
    """Flush spans before the process exits."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush(timeout_millis=5000)
        provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(f"attestmesh.{name}")


def logger(name: str) -> Any:
    return structlog.get_logger(name)


def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Add the current trace context (``traceparent``) to NATS headers."""
    carrier = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context a message carried (an empty context when it carried none)."""
    return propagate.extract(dict(headers or {}))
