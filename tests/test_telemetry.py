"""Standard OpenTelemetry configuration: the ``OTEL_*`` variables choose exporters, protocol,
headers and service name, exactly as in any other OpenTelemetry SDK; nothing is exported when
none is set; metrics are served for Prometheus when a port is given.

The SDK's providers are process-global, so each end-to-end case runs in a child process that
configures telemetry, records a span and a metric, and exits; in-test OTLP receivers (HTTP and
gRPC) see what it sent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.broker.sealing import KeyFileSource
from services.mesh import otelenv
from services.mesh.config import Config
from services.mesh.errors import ConfigError
from services.mesh.keys import SigningKey
from services.mesh.server import NatsServer
from services.testing.brokerthread import running_broker
from services.testing.otlp import GrpcOtlpReceiver, OtlpReceiver

ROOT = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent(
    """
    import sys, urllib.request
    from services.mesh import metrics, telemetry
    port = telemetry.configure("policy", metrics_port=int(sys.argv[1]) if sys.argv[1] else None)
    with telemetry.tracer("test").start_as_current_span("policy.appraise"):
        metrics.decisions.add(1, {"allow": "true"})
        metrics.verification_seconds.record(0.004, {"family": "snp"})
        telemetry.logger("test").warning("inside.span")
    telemetry.logger("test").warning("outside.span")
    if port is not None:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        sys.stdout.write(body.decode())
    telemetry.shutdown()
    """
)


def _child(env: dict[str, str], metrics_port: str = "") -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ATTESTMESH_"))}
    return subprocess.run(
        [sys.executable, "-c", _CHILD, metrics_port],
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_nothing_is_exported_without_settings() -> None:
    settings = otelenv.read({})
    assert not settings.traces.enabled and not settings.metrics.enabled
    assert not settings.service_name_set


def test_the_standard_endpoint_alone_enables_both_signals_over_http() -> None:
    settings = otelenv.read({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert settings.traces == otelenv.Signal(otelenv.HTTP)
    assert settings.metrics == otelenv.Signal(otelenv.HTTP)


def test_per_signal_settings_override_the_generic_ones() -> None:
    settings = otelenv.read(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            "OTEL_METRICS_EXPORTER": "none",
        }
    )
    assert settings.traces == otelenv.Signal(otelenv.GRPC)
    assert not settings.metrics.enabled


def test_the_project_alias_still_works_and_yields_to_the_standard_name() -> None:
    alias = otelenv.read({"ATTESTMESH_OTLP_ENDPOINT": "http://old:4318"})
    assert alias.traces == otelenv.Signal(otelenv.HTTP, endpoint="http://old:4318")
    both = otelenv.read(
        {"ATTESTMESH_OTLP_ENDPOINT": "http://old:4318", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://n"}
    )
    assert both.traces == otelenv.Signal(otelenv.HTTP)
    assert otelenv.read({}, alias="http://cfg:4318").traces.endpoint == "http://cfg:4318"


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_TRACES_EXPORTER": "zipkin"},
    ],
)
def test_unsupported_settings_are_refused_not_ignored(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        otelenv.read(env)


def test_a_service_name_from_the_environment_is_detected() -> None:
    assert otelenv.read({"OTEL_SERVICE_NAME": "x"}).service_name_set
    assert otelenv.read({"OTEL_RESOURCE_ATTRIBUTES": "a=b, service.name=x"}).service_name_set
    assert not otelenv.read({"OTEL_RESOURCE_ATTRIBUTES": "service.namespace=x"}).service_name_set


def test_otlp_http_from_the_standard_variables() -> None:
    with OtlpReceiver() as receiver:
        _child(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=attestmesh",
                "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
            }
        )
    assert [(s.service, s.name) for s in receiver.spans] == [
        ("attestmesh-policy", "policy.appraise")
    ]
    assert {"attestmesh_decisions", "attestmesh_verification_seconds"} <= receiver.metrics[
        "attestmesh-policy"
    ]
    assert all(h.get("x-tenant") == "attestmesh" for h in receiver.headers)


def test_otlp_grpc_and_the_operator_s_service_name() -> None:
    with GrpcOtlpReceiver() as receiver:
        _child(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_SERVICE_NAME": "policy-eu-1",
            }
        )
    assert [(s.service, s.name) for s in receiver.spans] == [("policy-eu-1", "policy.appraise")]
    assert "attestmesh_decisions" in receiver.metrics["policy-eu-1"]


def test_the_sampler_comes_from_the_environment() -> None:
    with OtlpReceiver() as receiver:
        _child(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_TRACES_SAMPLER": "always_off",
            }
        )
    assert receiver.spans == []
    assert "attestmesh_decisions" in receiver.metrics["attestmesh-policy"]


def test_prometheus_endpoint_and_trace_ids_in_logs() -> None:
    completed = _child({}, metrics_port="0")
    scraped = completed.stdout
    assert 'attestmesh_decisions_total{allow="true"' in scraped
    assert 'attestmesh_verification_seconds_bucket{family="snp",le="0.005"' in scraped
    inside, outside = (line for line in completed.stderr.splitlines() if ".span" in line)
    assert '"event": "inside.span"' in inside and '"trace_id": "' in inside
    assert '"event": "outside.span"' in outside and "trace_id" not in outside


def test_without_settings_no_metrics_provider_is_installed() -> None:
    probe = textwrap.dedent(
        """
        from opentelemetry import metrics as m
        from opentelemetry.sdk.metrics import MeterProvider
        from services.mesh import telemetry
        telemetry.configure("policy")
        print(isinstance(m.get_meter_provider(), MeterProvider), telemetry.metrics_enabled())
        """
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ATTESTMESH_"))}
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={**clean, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out.split() == ["False", "False"]


def test_metrics_port_from_config_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.mesh import config as config_mod

    monkeypatch.delenv("ATTESTMESH_METRICS_PORT", raising=False)
    assert config_mod.load(None).metrics_port is None
    monkeypatch.setenv("ATTESTMESH_METRICS_PORT", "9464")
    assert config_mod.load(None).metrics_port == 9464
    for bad in ("nine", "70000"):
        monkeypatch.setenv("ATTESTMESH_METRICS_PORT", bad)
        with pytest.raises(ConfigError):
            config_mod.load(None)


def test_admin_commands_print_plain_lines(tmp_path: Path, nats_server: NatsServer) -> None:
    """An operator command prints its result and plain one-line messages: no JSON log lines,
    no structlog console format, never the secret."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ATTESTMESH_"))}
    secret = tmp_path / "value"
    secret.write_bytes(b"s3cret-value")
    env = {
        **clean,
        "PYTHONPATH": str(ROOT),
        "ATTESTMESH_NATS_URL": nats_server.url,
        "ATTESTMESH_DATA_DIR": str(tmp_path),
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    KeyFileSource.in_data_dir(tmp_path, create=True).sealing_key()  # as `up` does
    keys = tmp_path / "keys"
    for name in ("operator", "broker"):
        SigningKey.load_or_create(name, keys).publish_to(keys / "trusted")
    with running_broker(Config(nats_url=nats_server.url, data_dir=str(tmp_path))):
        put = cli("secret", "put", "default/k/v", str(secret))
        assert put.returncode == 0, put.stderr
        listed = cli("secret", "list")
    assert put.stdout == "default/k/v stored (version 1, audit record 0)\n"
    assert listed.stdout.splitlines() == ["default/k/v"]
    for completed in (put, listed):
        assert "s3cret" not in completed.stdout + completed.stderr
        for line in completed.stderr.splitlines():
            assert line.startswith("attestmesh: ") and "{" not in line, line


def test_the_plain_renderer_is_one_line() -> None:
    from services.mesh import telemetry

    line = telemetry._plain_line(None, "warning", {"event": "nats.error", "error": "Refused"})
    assert line == "attestmesh: warning: nats.error error=Refused"


async def test_the_policy_reload_runs_in_a_span_of_its_own(
    nats_server: NatsServer, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    """``policy.loaded`` is logged at start and on every change, outside any attestation; the
    reload's own span gives those lines a trace id (see the child-process test for the ids)."""
    from services.testing.mesh import TestMesh

    spans.clear()
    running = TestMesh(nats_server, tmp_path)
    try:
        await running.start_policy()
    finally:
        await running.stop()
    reloads = [span for span in spans.get_finished_spans() if span.name == "policy.reload"]
    assert reloads and all(span.context.trace_id for span in reloads)
