"""A real Prometheus server scrapes a running ``attestmesh up`` through the ``metrics.json`` it
writes, and its query API sees verdicts, decisions and releases happening.

Prometheus comes from the distribution (``make`` installs Debian's package the way it installs
swtpm); where it is missing the test says so and skips.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None, reason="the prometheus server is not installed (make installs it)"
    ),
]
SERVICES = {"verifier-snp", "verifier-nitro", "verifier-tpm", "policy", "broker", "up-nodes"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[dict[str, str]]:
    data_dir = tmp_path / "mesh"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ATTESTMESH_"))}
    command = ["up", "--nodes", "3", "--interval", "0.2", "--json", "--data-dir", str(data_dir)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 90
        path = data_dir / "metrics.json"
        while not path.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "up wrote no metrics.json"
            time.sleep(0.2)
        yield json.loads(path.read_text())
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.fixture
def prometheus(tmp_path: Path, mesh: dict[str, str]) -> Iterator[str]:
    assert PROMETHEUS is not None
    jobs = []
    for service, url in sorted(mesh.items()):
        target = urllib.parse.urlsplit(url)
        jobs.append(
            {
                "job_name": service,
                "scrape_interval": "1s",
                "metrics_path": target.path,
                "static_configs": [{"targets": [target.netloc]}],
            }
        )
    config = tmp_path / "prometheus.json"  # YAML is a superset of JSON
    config.write_text(json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": jobs}))
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
    except OSError:
        return []
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _value(base: str, promql: str) -> float:
    result = _query(base, promql)
    return sum(float(r["value"][1]) for r in result)


def _labels(base: str, promql: str, label: str) -> set[str]:
    return {str(r["metric"][label]) for r in _query(base, promql)}


def test_prometheus_sees_the_mesh_working(mesh: dict[str, str], prometheus: str) -> None:
    assert set(mesh) == SERVICES
    rates = {
        "verdicts": 'sum(rate(attestmesh_verdicts_total{status="affirming"}[10s]))',
        "decisions": 'sum(rate(attestmesh_decisions_total{allow="true"}[10s]))',
        "releases": 'sum(rate(attestmesh_releases_total{outcome="released"}[10s]))',
        "evidence": "sum(rate(attestmesh_evidence_received_total[10s]))",
        "round trips": "sum(rate(attestmesh_attestation_seconds_count[10s]))",
    }
    labels = {
        "scraped": ("up == 1", "job"),
        "lag": ("attestmesh_consumer_pending", "consumer"),
        "families": ("sum by (family) (attestmesh_verification_seconds_count)", "family"),
    }
    expected = {
        "scraped": SERVICES,
        "lag": {"verifier-snp", "verifier-nitro", "verifier-tpm", "policy", "broker"},
        "families": {"snp", "nitro", "tpm"},
    }
    seen: dict[str, float] = {}
    found: dict[str, set[str]] = {}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        seen = {name: _value(prometheus, promql) for name, promql in rates.items()}
        found = {name: _labels(prometheus, *query) for name, query in labels.items()}
        if all(value > 0 for value in seen.values()) and found == expected:
            break
        time.sleep(1)
    assert all(value > 0 for value in seen.values()), seen
    assert found == expected
