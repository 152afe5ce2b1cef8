"""The Grafana dashboard, its provisioning and the OpenTelemetry Collector config: every
metric a panel queries is one the services export, and the files are what Grafana, Tempo and
the Collector load."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from services.mesh import metrics

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
HAVE_YAML = importlib.util.find_spec("yaml") is not None
needs_yaml = pytest.mark.skipif(not HAVE_YAML, reason="PyYAML (dev extra) is not installed")
_SERIES_SUFFIXES = ("_bucket", "_sum", "_count")


def _span_names_in_services() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "services").rglob("*.py"):
        names |= set(re.findall(r'start_as_current_span\(\s*"([a-z_.]+)"', path.read_text()))
    return names


def _load_yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text())


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((GRAFANA / "dashboards" / "attestmesh.json").read_text())
    return loaded


def _queries(datasource: str) -> list[str]:
    return [
        target.get("expr") or target["query"]
        for panel in _dashboard()["panels"]
        for target in panel["targets"]
        if target["datasource"]["uid"] == datasource
    ]


def _metric_family(name: str) -> str:
    for suffix in _SERIES_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in metrics.NAMES:
            return name.removesuffix(suffix)
    return name


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    queried = {
        _metric_family(name)
        for query in _queries("prometheus")
        for name in re.findall(r"\b(attestmesh_[a-z_]+)\b", query)
    }
    assert queried, "the dashboard queries no attestmesh metric"
    assert queried <= set(metrics.NAMES), queried - set(metrics.NAMES)
    assert set(metrics.NAMES) <= queried, f"not on the dashboard: {set(metrics.NAMES) - queried}"


def test_names_list_matches_the_instruments_in_code() -> None:
    """``metrics.NAMES`` is what the dashboard test trusts, so it must match the code."""
    source = (ROOT / "services" / "mesh" / "metrics.py").read_text()
    created = set(
        re.findall(r'create_(?:counter|histogram|observable_gauge)\(\s*"([a-z_]+)"', source)
    )
    counters = set(re.findall(r'create_counter\(\s*"([a-z_]+)"', source))
    expected = {f"{name}_total" if name in counters else name for name in created}
    assert expected == set(metrics.NAMES)


def test_no_dashboard_query_uses_rate_on_a_gauge() -> None:
    gauges = {"attestmesh_consumer_pending", "attestmesh_consumer_ack_pending"}
    for query in _queries("prometheus"):
        for inner in re.findall(r"\b(?:rate|increase|irate)\(([^\[]+)\[", query):
            name = re.match(r"\s*([a-z_]+)", inner)
            assert name is not None, query
            assert name.group(1) not in gauges | {"attestmesh_consumer_redelivered"}, query
            assert name.group(1).endswith(("_total", "_bucket", "_count", "_sum")), query


def test_latency_panels_carry_exemplars() -> None:
    latency = [
        target
        for panel in _dashboard()["panels"]
        for target in panel["targets"]
        if "_seconds_bucket" in (target.get("expr") or "")
    ]
    assert latency and all(target.get("exemplar") is True for target in latency)


@needs_yaml
def test_grafana_provisioning_and_dashboard() -> None:
    datasources = _load_yaml(GRAFANA / "provisioning" / "datasources" / "attestmesh.yaml")
    by_uid = {d["uid"]: d for d in datasources["datasources"]}
    assert {uid: d["type"] for uid, d in by_uid.items()} == {
        "prometheus": "prometheus",
        "tempo": "tempo",
        "loki": "loki",
    }
    (exemplars,) = by_uid["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert exemplars["datasourceUid"] == "tempo"
    assert by_uid["tempo"]["jsonData"]["tracesToLogsV2"]["datasourceUid"] == "loki"
    (derived,) = by_uid["loki"]["jsonData"]["derivedFields"]
    assert derived["datasourceUid"] == "tempo"
    line = json.dumps({"event": "verdict.published", "trace_id": "ab" * 16})
    match = re.search(derived["matcherRegex"], line)
    assert match is not None and match.group(1) == "ab" * 16

    providers = _load_yaml(GRAFANA / "provisioning" / "dashboards" / "attestmesh.yaml")
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]

    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] in by_uid, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == panel["datasource"]["uid"], panel["title"]
    tempo = "\n".join(_queries("tempo"))
    span_names = set(re.findall(r'name="([a-z_.]+)"', tempo))
    assert {"verifier.verify", "broker.release"} <= span_names
    assert span_names <= _span_names_in_services(), span_names - _span_names_in_services()
    assert '{resource.service.name=~"attestmesh-.*"}' in _queries("tempo")
    kinds = {p["type"] for p in panels}
    assert {"timeseries", "table", "logs"} <= kinds


@needs_yaml
def test_tempo_service_map_and_span_metrics_have_a_producer() -> None:
    """Tempo's service map and trace-to-metrics links query series the Collector generates."""
    config = _load_yaml(GRAFANA / "otel-collector.yaml")
    datasources = _load_yaml(GRAFANA / "provisioning" / "datasources" / "attestmesh.yaml")
    tempo = next(d for d in datasources["datasources"] if d["uid"] == "tempo")
    assert tempo["jsonData"]["serviceMap"]["datasourceUid"] == "prometheus"
    assert "servicegraph" in config["connectors"]
    pipelines = config["service"]["pipelines"]
    assert "servicegraph" in pipelines["traces"]["exporters"]
    metric_receivers = {
        r for n, p in pipelines.items() if n.startswith("metrics") for r in p["receivers"]
    }
    assert {"spanmetrics", "servicegraph", "otlp"} <= metric_receivers
    for query in tempo["jsonData"]["tracesToMetrics"]["queries"]:
        assert "traces_span_metrics_" in query["query"]
    assert config["connectors"]["spanmetrics"]["namespace"] == "traces.span.metrics"


@needs_yaml
def test_otel_collector_receives_traces_and_metrics() -> None:
    config = _load_yaml(GRAFANA / "otel-collector.yaml")
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["http"]["endpoint"].endswith(":4318")
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    pipelines = config["service"]["pipelines"]
    assert pipelines["traces"]["receivers"] == ["otlp"]
    assert {"otlp/tempo", "spanmetrics"} <= set(pipelines["traces"]["exporters"])
    for name, pipeline in pipelines.items():
        for component in pipeline.get("processors", []):
            assert component in config["processors"], (name, component)
        for exporter in pipeline["exporters"]:
            assert exporter in config["exporters"] or exporter in config["connectors"], exporter
    spanmetrics = config["connectors"]["spanmetrics"]
    dimensions = {d["name"] for d in spanmetrics["dimensions"]}
    source = "\n".join(p.read_text() for p in (ROOT / "services").rglob("*.py"))
    for dimension in dimensions:
        assert f'"{dimension}"' in source, dimension
    assert "attestmesh.node" not in dimensions
