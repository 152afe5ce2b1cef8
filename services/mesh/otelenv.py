"""The standard OpenTelemetry environment, read once into plain settings.

Operators configure every OpenTelemetry SDK the same way (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_PROTOCOL``, ``OTEL_SERVICE_NAME``...), so attestmesh honours those names
instead of inventing its own; ``ATTESTMESH_OTLP_ENDPOINT`` stays as an alias for the generic
endpoint. Reading them here, as data, keeps the choice of exporters testable without a network
and without touching the process environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.mesh.errors import ConfigError

HTTP = "http/protobuf"
GRPC = "grpc"
PROTOCOLS = (HTTP, GRPC)
ALIAS = "ATTESTMESH_OTLP_ENDPOINT"


@dataclass(frozen=True)
class Signal:
    """Where one signal (traces or metrics) goes: nowhere, or OTLP over ``protocol``.

    ``endpoint`` is set only when it came from the alias (or a caller); otherwise the exporter
    reads the standard variables itself (endpoint, headers, certificates, timeout, compression),
    exactly as every other OpenTelemetry SDK does.
    """

    protocol: str | None
    endpoint: str | None = None

    @property
    def enabled(self) -> bool:
        return self.protocol is not None


@dataclass(frozen=True)
class OtelSettings:
    traces: Signal
    metrics: Signal
    service_name_set: bool
    """``OTEL_SERVICE_NAME`` (or ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``) is given, so
    the default ``attestmesh-<service>`` must not override it."""


def _protocol(env: Mapping[str, str], signal: str) -> str:
    value = (
        env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    ) or HTTP
    value = value.strip().lower()
    if value not in PROTOCOLS:
        raise ConfigError(
            "telemetry.protocol_unsupported",
            f"OTLP protocol {value!r}; use one of {', '.join(PROTOCOLS)}",
        )
    return value


def _signal(env: Mapping[str, str], signal: str, alias: str | None) -> Signal:
    exporter = env.get(f"OTEL_{signal}_EXPORTER", "otlp").strip().lower()
    if exporter == "none":
        return Signal(None)
    if exporter != "otlp":
        raise ConfigError(
            "telemetry.exporter_unsupported", f"OTEL_{signal}_EXPORTER={exporter!r}; use otlp"
        )
    configured = env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if configured:
        return Signal(_protocol(env, signal))
    if alias:
        return Signal(_protocol(env, signal), endpoint=alias)
    return Signal(None)


def read(env: Mapping[str, str] | None = None, *, alias: str | None = None) -> OtelSettings:
    """Settings from ``env`` (the process environment by default); ``alias`` is the endpoint
    from ``ATTESTMESH_OTLP_ENDPOINT`` or the service's config, used when no standard one is set.
    """
    env = os.environ if env is None else env
    alias = alias or env.get(ALIAS) or None
    attributes = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    named = bool(env.get("OTEL_SERVICE_NAME")) or any(
        part.split("=", 1)[0].strip() == "service.name" for part in attributes.split(",")
    )
    return OtelSettings(
        traces=_signal(env, "TRACES", alias),
        metrics=_signal(env, "METRICS", alias),
        service_name_set=named,
    )


def http_url(endpoint: str, signal: str) -> str:
    """The OTLP/HTTP URL for ``signal`` under a base endpoint (``/v1/traces``, ``/v1/metrics``)."""
    return endpoint.rstrip("/") + f"/v1/{signal}"
