"""Rendering the Helm chart offline for the deploy tests: helm-python-sdk binds Helm's own Go
engine (a shared library in the wheel, loaded through ctypes), so the templates, the values
schema and Helm's functions behave exactly as `helm template` does; no cluster is contacted.
Shared by the chart tests (``test_deploy*.py``); their fixtures live in ``conftest.py``.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "attestmesh"
GEN_IDENTITIES = DEPLOY / "gen-identities.py"

KUBERNETES_VERSION = "1.33.0"  # the release the rendered objects are validated against
RELEASE, NAMESPACE = "rel", "attestmesh"
FULLNAME = f"{RELEASE}-attestmesh"
COLLECTOR_NODES = ("node-a", "node-b")
CRD_KINDS = {("cert-manager.io/v1", "Certificate")}  # not in Kubernetes' own schemas

HAVE_HELM = importlib.util.find_spec("helm_python") is not None
HAVE_VALIDATOR = importlib.util.find_spec("kubernetes_validate") is not None
HAVE_NKEYS = importlib.util.find_spec("nkeys") is not None
HAVE_YAML = importlib.util.find_spec("yaml") is not None
needs_helm = pytest.mark.skipif(
    not (HAVE_HELM and HAVE_YAML and HAVE_NKEYS),
    reason="helm-python-sdk, PyYAML and nkeys (dev extras) are needed to render the chart",
)
needs_validator = pytest.mark.skipif(
    not HAVE_VALIDATOR, reason="kubernetes-validate (dev extra) is not installed"
)
needs_sh = pytest.mark.skipif(
    shutil.which("sh") is None or shutil.which("install") is None,
    reason="the init container's script needs a POSIX sh and install(1)",
)

Doc = dict[str, Any]


# --- rendering --------------------------------------------------------------------------


def merge_values(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = value
    return out


def render_files(values: dict[str, Any]) -> dict[str, str]:
    import helm_python

    with helm_python.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def render(values: dict[str, Any]) -> list[Doc]:
    import yaml

    docs: list[Doc] = []
    for path, text in sorted(render_files(values).items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    (found,) = find(docs, kind, name)
    return found


def pod_specs(docs: list[Doc]) -> list[tuple[str, Doc, Doc]]:
    """(workload name, pod template metadata, pod spec) of every workload."""
    return [
        (d["metadata"]["name"], d["spec"]["template"]["metadata"], d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in {"Deployment", "StatefulSet", "DaemonSet"}
    ]


def make_identities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Fresh identities from deploy/gen-identities.py: public values, private values, files."""
    out = tmp_path_factory.mktemp("identities")
    subprocess.run(
        [
            sys.executable,
            str(GEN_IDENTITIES),
            str(out),
            "--fullname",
            FULLNAME,
            "--namespace",
            NAMESPACE,
            "--collector-nodes",
            ",".join(COLLECTOR_NODES),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return {
        "dir": out,
        "public": json.loads((out / "identities.values.json").read_text()),
        "private": json.loads((out / "secrets.values.json").read_text()),
        "secrets": json.loads((out / "secrets.json").read_text()),
    }


def _test_root_pem() -> str:
    """A self-signed placeholder certificate (not a vendor root) for the trust-roots values."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "placeholder root")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def custom_values(identities: dict[str, Any]) -> dict[str, Any]:
    """Everything switched away from its default."""
    public = dict(identities["public"])
    public.pop("collector", None)
    nodes = identities["public"]["collector"]["nodeIdentities"]["nodes"]
    return merge_values(
        merge_values(public, identities["private"]),
        {
            "verifier": {
                "families": ["snp", "tdx"],
                "replicas": 3,
                "extraEgress": [
                    {
                        "to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}],
                        "ports": [{"port": 443, "protocol": "TCP"}],
                    }
                ],
            },
            "policy": {"replicas": 3},
            "broker": {"replicas": 3},
            "collector": {
                "enabled": True,
                "simulate": True,
                "deviceGroup": 990,
                "nodeSelector": {"attestmesh.io/tee": "sev-snp"},
                "nodeIdentities": {"nodes": nodes},
            },
            "nats": {
                "replicas": 1,
                "tls": {"enabled": False},
                "metrics": {"enabled": False},
                "jetstream": {"storage": {"storageClassName": "fast-ssd", "size": "50Gi"}},
                "topologySpread": {"whenUnsatisfiable": "DoNotSchedule"},
            },
            "trustRoots": {
                "files": {"amd-milan": {"path": "amd/milan.pem", "pem": _test_root_pem()}}
            },
            "collateral": {"existingConfigMap": "snp-collateral"},
            "otel": {"endpoint": ""},
            "config": {"log_level": "debug", "allow_warning": True, "max_deliver": 7},
            "image": {"digest": "sha256:" + "ab" * 32},
        },
    )


def cert_manager_values(identities: dict[str, Any]) -> dict[str, Any]:
    public = dict(identities["public"])
    public.pop("collector", None)
    return merge_values(
        public,
        {
            "collector": {
                "enabled": True,
                "nodeIdentities": {
                    "nodes": identities["public"]["collector"]["nodeIdentities"]["nodes"]
                },
            },
            "nats": {"tls": {"certManager": {"enabled": True, "issuerRef": {"name": "mesh-ca"}}}},
            "networkPolicy": {"enabled": True, "extraClientsFrom": [{"podSelector": {}}]},
        },
    )


def default_values(identities: dict[str, Any]) -> dict[str, Any]:
    """The chart's defaults plus the one thing it cannot invent: the identities."""
    public = dict(identities["public"])
    public.pop("collector", None)
    return public


def render_all(identities: dict[str, Any]) -> dict[str, list[Doc]]:
    return {
        "default": render(default_values(identities)),
        "custom": render(custom_values(identities)),
        "cert-manager": render(cert_manager_values(identities)),
    }


RENDERS = ["default", "custom", "cert-manager"]


