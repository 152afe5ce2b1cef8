"""Minimal OTLP receivers for tests (HTTP and gRPC): the contract Tempo and collectors ingest.

No Tempo or OpenTelemetry Collector binary can run in CI, so tests prove that spans and metrics
leave the services in the standard wire format by receiving ``POST /v1/traces`` and
``/v1/metrics`` (protobuf), or the gRPC ``Export`` calls, themselves.
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue

MAX_BODY = 16 * 1024 * 1024


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    attributes: dict[str, Any]


def _service(attributes: Any) -> str:
    found: list[KeyValue] = [a for a in attributes if a.key == "service.name"]
    return found[0].value.string_value if found else ""


class _Recorder:
    """What a receiver saw: spans, metric names by service, and request headers."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.metrics: dict[str, set[str]] = {}
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()

    def _record(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            service = _service(resource_spans.resource.attributes)
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attributes = {a.key: a.value for a in span.attributes}
                    found.append(ReceivedSpan(service, span.name, span.trace_id.hex(), attributes))
        with self._lock:
            self.spans.extend(found)

    def _record_metrics(self, request: ExportMetricsServiceRequest) -> None:
        with self._lock:
            for resource_metrics in request.resource_metrics:
                names = self.metrics.setdefault(
                    _service(resource_metrics.resource.attributes), set()
                )
                for scope in resource_metrics.scope_metrics:
                    names.update(metric.name for metric in scope.metrics)

    def _record_headers(self, headers: dict[str, str]) -> None:
        with self._lock:
            self.headers.append(headers)


class OtlpReceiver(_Recorder):
    """Listens on a loopback port (OTLP/HTTP) and records every span and metric sent to it."""

    def __init__(self) -> None:
        super().__init__()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                if self.path not in ("/v1/traces", "/v1/metrics") or not 0 < length <= MAX_BODY:
                    self.send_response(400)
                    self.end_headers()
                    return
                receiver._record_headers({k.lower(): v for k, v in self.headers.items()})
                data = self.rfile.read(length)
                if self.path == "/v1/metrics":
                    metrics_request = ExportMetricsServiceRequest()
                    metrics_request.ParseFromString(data)
                    receiver._record_metrics(metrics_request)
                    body = ExportMetricsServiceResponse().SerializeToString()
                else:
                    request = ExportTraceServiceRequest()
                    request.ParseFromString(data)
                    receiver._record(request)
                    body = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class GrpcOtlpReceiver(_Recorder):
    """The same over OTLP/gRPC (``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``), on a loopback port."""

    def __init__(self) -> None:
        super().__init__()
        import grpc
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        receiver = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(
                self, request: ExportTraceServiceRequest, context: Any
            ) -> ExportTraceServiceResponse:
                receiver._record_headers(dict(context.invocation_metadata()))
                receiver._record(request)
                return ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(
                self, request: ExportMetricsServiceRequest, context: Any
            ) -> ExportMetricsServiceResponse:
                receiver._record_headers(dict(context.invocation_metadata()))
                receiver._record_metrics(request)
                return ExportMetricsServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self._server)  # type: ignore[no-untyped-call]
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self._server)  # type: ignore[no-untyped-call]
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> GrpcOtlpReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)
