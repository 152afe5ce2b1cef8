"""Logs, traces and metrics: structlog JSON lines, OpenTelemetry spans and instruments.

Every hop puts the W3C ``traceparent`` into the NATS headers, so one attestation is one trace
from the collector's span to the secret release. Spans and logs carry ids, families, statuses
and reason codes, never evidence secrets, wrapped keys or secret values. Exporters follow the
standard ``OTEL_*`` environment (:mod:`services.mesh.otelenv`); with none set, nothing is
exported and no exporter thread runs. Metrics are served for Prometheus when a port is given.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from services.mesh import otelenv

_state: dict[str, Any] = {"configured": False, "meters": None, "http": None}


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
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    environ: Mapping[str, str] | None = None,
) -> int | None:
    """Configure logging, tracing and metrics once per process (later calls only add span
    processors). Returns the port the Prometheus endpoint listens on, if one was asked for.

    ``otlp_endpoint`` is the ``ATTESTMESH_OTLP_ENDPOINT`` alias from the config; the standard
    ``OTEL_*`` variables in ``environ`` take precedence over it.
    """
    if not _state["configured"]:
        _configure_logs(service, level, stream)
        settings = otelenv.read(environ, alias=otlp_endpoint)
        attributes = {} if settings.service_name_set else {"service.name": f"attestmesh-{service}"}
        resource = Resource.create(attributes)
        provider = TracerProvider(resource=resource)
        if settings.traces.enabled:
            provider.add_span_processor(BatchSpanProcessor(_span_exporter(settings.traces)))
        trace.set_tracer_provider(provider)
        _state["port"] = _configure_metrics(resource, settings.metrics, metrics_port, metrics_host)
        _state["configured"] = True
    provider_now = trace.get_tracer_provider()
    if extra_processor is not None and isinstance(provider_now, TracerProvider):
        provider_now.add_span_processor(extra_processor)
    port: int | None = _state.get("port")
    return port


def configure_cli(stream: TextIO | None = None) -> None:
    """Plain one-line messages for operator commands: ``event key=value``, warnings and up.

    Admin commands talk to a person, not a log pipeline, and must not print structlog's
    development console format or JSON lines; nothing is exported from them. The stream is
    looked up at each line, so a caller that swaps ``sys.stderr`` (a test harness) is followed.
    """
    structlog.configure(
        processors=[_plain_line],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=lambda *_: structlog.PrintLogger(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def _plain_line(_: Any, level: str, event: MutableMapping[str, Any]) -> str:
    """``attestmesh: warning: nats.error error=ConnectionRefusedError`` (one line)."""
    name = event.pop("event", "")
    fields = " ".join(f"{key}={value}" for key, value in event.items())
    return f"attestmesh: {level}: {name} {fields}".rstrip()


def _configure_logs(service: str, level: str, stream: TextIO | None) -> None:
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


def _span_exporter(signal: otelenv.Signal) -> SpanExporter:
    """OTLP over the configured protocol; the exporter reads the standard variables itself."""
    if signal.protocol == otelenv.GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        return GrpcSpanExporter(endpoint=signal.endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    if signal.endpoint:
        return OTLPSpanExporter(endpoint=otelenv.http_url(signal.endpoint, "traces"))
    return OTLPSpanExporter()


def _metric_reader(signal: otelenv.Signal) -> MetricReader:
    if signal.protocol == otelenv.GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )

        return PeriodicExportingMetricReader(GrpcMetricExporter(endpoint=signal.endpoint))
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    exporter = (
        OTLPMetricExporter(endpoint=otelenv.http_url(signal.endpoint, "metrics"))
        if signal.endpoint
        else OTLPMetricExporter()
    )
    return PeriodicExportingMetricReader(exporter)


def _configure_metrics(
    resource: Resource, signal: otelenv.Signal, port: int | None, host: str
) -> int | None:
    """A MeterProvider only when something reads it: without one the API's instruments are
    no-ops, so a process that exports no metrics pays nothing per measurement."""
    readers: list[MetricReader] = []
    bound: int | None = None
    if port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        readers.append(PrometheusMetricReader())
        server, _ = start_http_server(port, addr=host)
        _state["http"] = server
        bound = int(server.server_port)
    if signal.enabled:
        readers.append(_metric_reader(signal))
    if readers:
        provider = MeterProvider(resource=resource, metric_readers=readers)
        otel_metrics.set_meter_provider(provider)
        _state["meters"] = provider
    return bound


def metrics_enabled() -> bool:
    """Whether this process exports metrics (so pollers feeding observable gauges should run)."""
    return _state.get("meters") is not None


def shutdown() -> None:
    """Flush spans and metrics before the process exits."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush(timeout_millis=5000)
        provider.shutdown()
    meters = _state.get("meters")
    if isinstance(meters, MeterProvider):
        meters.shutdown(timeout_millis=5000)
        _state["meters"] = None
    server = _state.get("http")
    if server is not None:
        server.shutdown()
        server.server_close()
        _state["http"] = None


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
