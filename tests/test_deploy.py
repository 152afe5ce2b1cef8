"""deploy/: the Helm chart renders, validates strictly, fails closed, is hardened, and
configures the services as they expect; the image and the identity generator.

Every rendered object is checked against the Kubernetes OpenAPI schemas of a pinned release
with kubernetes-validate in strict mode (unknown fields are errors). Rendering: tests/chart.py.
"""

from __future__ import annotations

import base64
import json
import stat
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest

from services.mesh.config import Config
from tests.chart import (
    CHART,
    CRD_KINDS,
    DEPLOY,
    FULLNAME,
    HAVE_NKEYS,
    KUBERNETES_VERSION,
    NAMESPACE,
    RENDERS,
    Doc,
    default_values,
    find,
    merge_values,
    needs_helm,
    needs_sh,
    needs_validator,
    one,
    pod_specs,
    render,
    render_files,
)

# --- the chart renders, validates and fails closed --------------------------------------


@needs_helm
def test_defaults_alone_fail_closed_and_name_the_generator() -> None:
    from helm_python.errors import HelmError

    with pytest.raises(HelmError, match=r"gen-identities\.py"):
        render_files({})


@needs_helm
def test_a_collector_without_per_node_identities_does_not_render(
    identities: dict[str, Any],
) -> None:
    """There is no shared collector identity: one node could otherwise speak for all."""
    from helm_python.errors import HelmError

    with pytest.raises(HelmError, match=r"attestmesh node enroll"):
        render_files(merge_values(default_values(identities), {"collector": {"enabled": True}}))


@needs_helm
def test_schema_rejects_unknown_keys_and_test_only_switches(identities: dict[str, Any]) -> None:
    from helm_python.errors import HelmError

    base = default_values(identities)
    bad: dict[str, Any]
    for bad in (
        {"natsUser": {}},
        {"config": {"allow_simulated": True}},
        {"config": {"test_roots_dir": "/tmp"}},
        {"nats": {"replicas": 2}},
        {"natsUsers": {"policy": "not-an-nkey"}},
    ):
        with pytest.raises(HelmError):
            render_files(merge_values(base, bad))


@needs_helm
def test_helm_lint_finds_nothing_above_info(identities: dict[str, Any]) -> None:
    import helm_python

    report = helm_python.lint(
        str(CHART),
        default_values(identities),
        strict=True,
        namespace=NAMESPACE,
        kube_version=KUBERNETES_VERSION,
    )
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] > 1] == []  # 1 is Helm's "info"


@needs_helm
@needs_validator
@pytest.mark.parametrize("name", RENDERS)
def test_every_object_validates_strictly(renders: dict[str, list[Doc]], name: str) -> None:
    from kubernetes_validate import utils  # type: ignore[import-untyped]

    docs = renders[name]
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            utils.validate(doc, KUBERNETES_VERSION, strict=True)
        except utils.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]


@needs_helm
def test_default_render_has_the_whole_mesh(renders: dict[str, list[Doc]]) -> None:
    docs = renders["default"]
    nats = one(docs, "StatefulSet", f"{FULLNAME}-nats")
    assert nats["spec"]["replicas"] == 3
    assert nats["spec"]["podManagementPolicy"] == "Parallel"
    (claim,) = nats["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    nats_container = nats["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert nats_container[probe]["httpGet"]["port"] == "monitor"
    conf = one(docs, "ConfigMap", f"{FULLNAME}-nats-config")["data"]["nats.conf"]
    assert "store_dir: /data\n" in conf
    assert conf.count("nats://rel-attestmesh-nats-") == 3
    assert "verify: true" in conf  # routes need a certificate from the cluster CA

    deployments = {d["metadata"]["name"]: d for d in find(docs, "Deployment")}
    assert set(deployments) == {f"{FULLNAME}-verifier-{f}" for f in ("snp", "tdx", "sgx")} | {
        f"{FULLNAME}-policy",
        f"{FULLNAME}-broker",
    }
    assert all(d["spec"]["replicas"] >= 2 for d in deployments.values())
    assert not find(docs, "DaemonSet")
    pdbs = {d["metadata"]["name"] for d in find(docs, "PodDisruptionBudget")}
    assert pdbs == set(deployments) | {f"{FULLNAME}-nats"}
    # Private material is never rendered by default; only public keys are.
    assert {s["metadata"]["name"] for s in find(docs, "Secret")} == {f"{FULLNAME}-trusted-keys"}
    for family in ("snp", "tdx", "sgx"):
        args = deployments[f"{FULLNAME}-verifier-{family}"]["spec"]["template"]["spec"][
            "containers"
        ][0]["args"]
        assert args == [
            "verifier",
            "--family",
            family,
            "--config",
            "/etc/attestmesh/config/config.json",
        ]


@needs_helm
def test_custom_values_take_effect(
    renders: dict[str, list[Doc]], identities: dict[str, Any]
) -> None:
    docs = renders["custom"]
    names = {d["metadata"]["name"] for d in find(docs, "Deployment")}
    assert f"{FULLNAME}-verifier-sgx" not in names and f"{FULLNAME}-verifier-tdx" in names
    assert one(docs, "Deployment", f"{FULLNAME}-policy")["spec"]["replicas"] == 3
    config = json.loads(one(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["config.json"])
    assert config["nats_url"] == f"nats://{FULLNAME}-nats.{NAMESPACE}.svc:4222"
    assert config["collateral_dir"] == "/etc/attestmesh/collateral"
    assert (config["log_level"], config["allow_warning"], config["max_deliver"]) == (
        "debug",
        True,
        7,
    )
    conf = one(docs, "ConfigMap", f"{FULLNAME}-nats-config")["data"]["nats.conf"]
    assert "tls {" not in conf and "cluster {" not in conf
    nats = one(docs, "StatefulSet", f"{FULLNAME}-nats")
    assert [c["name"] for c in nats["spec"]["template"]["spec"]["containers"]] == ["nats"]
    assert nats["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast-ssd"

    daemonset = one(docs, "DaemonSet", f"{FULLNAME}-collector")
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["securityContext"]["supplementalGroups"] == [990]
    assert spec["containers"][0]["args"][:3] == ["collector", "--node", "$(NODE_NAME)"]
    assert "--simulate" in spec["containers"][0]["args"]
    host_paths = {
        v["hostPath"]["path"]: v["hostPath"]["type"] for v in spec["volumes"] if "hostPath" in v
    }
    assert host_paths == {
        "/dev/sev-guest": "CharDevice",
        "/sys/kernel/config": "Directory",
        "/etc/attestmesh/collector.nk": "File",
    }

    secrets = {s["metadata"]["name"]: s for s in find(docs, "Secret")}
    expected = {
        f"{FULLNAME}-{i}" for i in ("verifier-snp", "verifier-tdx", "policy", "broker", "admin")
    }
    assert set(secrets) == expected | {f"{FULLNAME}-trusted-keys"}
    broker = secrets[f"{FULLNAME}-broker"]["data"]
    assert set(broker) == {"nats.seed", "broker-sealing.key", "signing.key"}
    assert len(base64.b64decode(broker["broker-sealing.key"])) == 32
    assert set(secrets[f"{FULLNAME}-policy"]["data"]) == {"nats.seed", "signing.key"}
    roots = one(docs, "ConfigMap", f"{FULLNAME}-trust-roots")["data"]
    assert set(roots) == {"amd-milan"}
    egress = one(docs, "NetworkPolicy", f"{FULLNAME}-verifier-egress")
    assert egress["spec"]["egress"][0]["ports"] == [{"port": 443, "protocol": "TCP"}]
    image = spec["containers"][0]["image"]
    assert image == "attestmesh@sha256:" + "ab" * 32
    for _, _, pod in pod_specs(docs):
        for container in pod["containers"]:
            env = {e["name"] for e in container.get("env", [])}
            assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env and "SSL_CERT_FILE" not in env


@needs_helm
def test_cert_manager_certificate_names_every_address(renders: dict[str, list[Doc]]) -> None:
    docs = renders["cert-manager"]
    cert = one(docs, "Certificate", f"{FULLNAME}-nats-tls")
    spec = cert["spec"]
    assert spec["secretName"] == f"{FULLNAME}-nats-tls"
    assert {"server auth", "client auth"} <= set(spec["usages"])
    assert spec["issuerRef"] == {
        "name": "mesh-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }
    nats = f"{FULLNAME}-nats"
    assert f"{nats}.{NAMESPACE}.svc" in spec["dnsNames"]
    assert f"*.{nats}-headless.{NAMESPACE}.svc.cluster.local" in spec["dnsNames"]
    # Services verify the server against the cluster CA, and nothing else of the TLS Secret.
    for _, _, pod in pod_specs(docs):
        if pod["containers"][0]["name"] == "nats":
            continue
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["SSL_CERT_FILE"] == "/etc/attestmesh/nats-ca/ca.crt"
        (ca,) = [v for v in pod["volumes"] if v["name"] == "nats-ca"]
        assert ca["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]


# --- hardening ----------------------------------------------------------------------------


@needs_helm
@pytest.mark.parametrize("name", RENDERS)
def test_workloads_are_hardened(renders: dict[str, list[Doc]], name: str) -> None:
    docs = renders[name]
    (account,) = find(docs, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert not find(docs, "Role") and not find(docs, "ClusterRole")
    workloads = pod_specs(docs)
    assert workloads
    for workload, _, pod in workloads:
        assert pod["automountServiceAccountToken"] is False, workload
        assert pod["serviceAccountName"] == account["metadata"]["name"], workload
        assert pod["securityContext"]["runAsNonRoot"] is True, workload
        assert pod["securityContext"]["runAsUser"] > 0, workload
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, workload
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(flag), (workload, flag)
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{workload}/{container['name']}"
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc.get("privileged") is not True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), (where, bound)
        host_paths = [v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v]
        if host_paths:
            assert workload == f"{FULLNAME}-collector", workload


@needs_helm
@pytest.mark.parametrize("name", RENDERS)
def test_private_keys_reach_only_the_init_container(
    renders: dict[str, list[Doc]], name: str
) -> None:
    for workload, labels, pod in pod_specs(renders[name]):
        if labels["labels"]["app.kubernetes.io/component"] == "nats":
            continue
        secret_volumes = {
            v["name"] for v in pod["volumes"] if "secret" in v or v["name"] == "host-seed"
        } - {"nats-ca"}
        assert secret_volumes, workload
        (init,) = pod["initContainers"]
        (main,) = pod["containers"]
        assert secret_volumes == {m["name"] for m in init["volumeMounts"]} - {"runtime"}, workload
        assert not secret_volumes & {m["name"] for m in main["volumeMounts"]}, workload
        runtime = next(m for m in main["volumeMounts"] if m["name"] == "runtime")
        collector = labels["labels"]["app.kubernetes.io/component"] == "collector"
        simulated = "--simulate" in main["args"]
        assert runtime["readOnly"] is not (collector and simulated), workload
        (volume,) = [v for v in pod["volumes"] if v["name"] == "runtime"]
        assert volume["emptyDir"]["medium"] == "Memory", workload


@needs_helm
def test_collectors_get_only_the_policy_key_to_check_decisions(
    renders: dict[str, list[Doc]],
) -> None:
    """A collector acts only on decisions the policy signed: it needs that public key."""
    pod = one(renders["cert-manager"], "DaemonSet", f"{FULLNAME}-collector")["spec"]["template"]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "trusted"]
    assert volume["secret"]["items"] == [{"key": "policy.pem", "path": "policy.pem"}]
    (init,) = pod["spec"]["initContainers"]
    assert 'put "$src/trusted/policy.pem" "$dst/keys/trusted/policy.pem"' in init["args"][0]


def _init_script(docs: list[Doc], deployment: str) -> str:
    pod = one(docs, "Deployment", deployment)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == ["/bin/sh", "-c"]
    script: str = init["args"][0]
    return script


def _run_init_script(script: str, src: Path, dst: Path) -> None:
    assert "src=/var/run/attestmesh-src\n" in script and "dst=/run/attestmesh\n" in script
    local = script.replace("src=/var/run/attestmesh-src\n", f"src={src}\n").replace(
        "dst=/run/attestmesh\n", f"dst={dst}\n"
    )
    subprocess.run(["sh", "-c", local], check=True, capture_output=True, timeout=10)


def _project_secret(directory: Path, files: dict[str, bytes]) -> None:
    """Files as kubelet projects a Secret with an fsGroup: group-readable (0440)."""
    for name, data in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o440)


@needs_helm
@needs_sh
def test_installed_keys_are_accepted_by_the_services(
    renders: dict[str, list[Doc]], identities: dict[str, Any], tmp_path: Path
) -> None:
    from services.broker.sealing import KeyFileSource
    from services.mesh.errors import ConfigError
    from services.mesh.keys import SigningKey, TrustedKeys

    docs = renders["default"]
    private = identities["private"]["secrets"]["private"]
    trusted = identities["public"]["trustedKeys"]
    config = json.loads(one(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["config.json"])

    def local(path: str, dst: Path) -> Path:
        return dst / Path(path).relative_to("/run/attestmesh")

    # policy: its own signing key, the verifiers' and the operator's public keys, its seed.
    src, dst = tmp_path / "policy-src", tmp_path / "policy-run"
    _project_secret(
        src,
        {
            "identity/nats.seed": private["policy"]["natsSeed"].encode(),
            "identity/signing.key": private["policy"]["signingKey"].encode(),
            "trusted/operator.pem": trusted["operator"].encode(),
            **{
                f"trusted/verifier-{f}.pem": trusted[f"verifier-{f}"].encode()
                for f in ("snp", "tdx", "sgx")
            },
        },
    )
    dst.mkdir()
    # As projected, the services would refuse the key; that is why it is copied.
    with pytest.raises(ConfigError, match="keys.permissions"):
        SigningKey.load_or_create("signing", src / "identity")
    _run_init_script(_init_script(docs, f"{FULLNAME}-policy"), src, dst)
    keys_dir = local(config["keys_dir"], dst)
    key = SigningKey.load_or_create("policy", keys_dir)
    assert key.public_pem().decode() == trusted["policy"]
    assert TrustedKeys.load(keys_dir / "trusted").names() == [
        "operator",
        *(f"verifier-{f}" for f in ("sgx", "snp", "tdx")),
    ]
    # The operator's private key stays with the operator (written beside the values).
    operator = SigningKey.load("operator", identities["dir"] / "operator.key")
    assert operator.public_pem().decode() == trusted["operator"]
    assert "operator" not in private
    seed = local(config["nats_nkey_seed_file"], dst)
    assert seed.read_text() == private["policy"]["natsSeed"]
    for path in (seed, keys_dir / "policy.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o400, path
    for directory in (keys_dir, keys_dir / "trusted", seed.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory

    # broker: the sealing key, 0400 in the data directory, accepted by the key-file source.
    src, dst = tmp_path / "broker-src", tmp_path / "broker-run"
    sealing = base64.b64decode(private["broker"]["sealingKey"])
    _project_secret(
        src,
        {
            "identity/nats.seed": private["broker"]["natsSeed"].encode(),
            "identity/broker-sealing.key": sealing,
            "identity/signing.key": private["broker"]["signingKey"].encode(),
            "trusted/policy.pem": trusted["policy"].encode(),
            "trusted/broker.pem": trusted["broker"].encode(),
            "trusted/operator.pem": trusted["operator"].encode(),  # the resource policy
        },
    )
    dst.mkdir()
    _run_init_script(_init_script(docs, f"{FULLNAME}-broker"), src, dst)
    data_dir = local(config["data_dir"], dst)
    key_file = data_dir / "broker-sealing.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o400
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    KeyFileSource.in_data_dir(data_dir).sealing_key()
    assert key_file.read_bytes() == sealing
    broker_keys = local(config["keys_dir"], dst)
    assert TrustedKeys.load(broker_keys / "trusted").names() == ["broker", "operator", "policy"]
    # Its audit-checkpoint key, installed rather than invented, matches the published half.
    checkpoint_key = SigningKey.load_or_create("broker", broker_keys)
    assert checkpoint_key.public_pem().decode() == trusted["broker"]

    # Missing material stops the pod instead of letting a service invent a key.
    src, dst = tmp_path / "empty-src", tmp_path / "empty-run"
    _project_secret(src, {"identity/nats.seed": b""})
    dst.mkdir()
    with pytest.raises(subprocess.CalledProcessError):
        _run_init_script(_init_script(docs, f"{FULLNAME}-broker"), src, dst)


# --- service configuration --------------------------------------------------------------

CHART_OWNED_FIELDS = {"nats_url", "nats_nkey_seed_file", "data_dir", "keys_dir", "roots_dir"}


@needs_helm
@pytest.mark.parametrize("name", RENDERS)
def test_service_config_uses_only_config_fields(renders: dict[str, list[Doc]], name: str) -> None:
    config = json.loads(
        one(renders[name], "ConfigMap", f"{FULLNAME}-config")["data"]["config.json"]
    )
    known = set(Config.__struct_fields__) | {"nats_nkey_seed_file"}
    assert set(config) <= known, set(config) - known
    assert set(config) >= CHART_OWNED_FIELDS
    # Never switched on in a cluster: test PKIs and simulated evidence; OTLP comes from env.
    assert not {"test_roots_dir", "allow_simulated", "otlp_endpoint"} & set(config)
    assert config["roots_dir"] == "/etc/attestmesh/roots"


@needs_helm
@pytest.mark.skipif(
    "nats_nkey_seed_file" not in Config.__struct_fields__,
    reason="Config has no nats_nkey_seed_file field yet (services/mesh/config.py)",
)
def test_service_config_decodes_as_the_config_struct(renders: dict[str, list[Doc]]) -> None:
    for name in RENDERS:
        raw = one(renders[name], "ConfigMap", f"{FULLNAME}-config")["data"]["config.json"]
        config = msgspec.json.decode(raw.encode(), type=Config)
        assert config.allow_simulated is False and config.test_roots_dir is None


@needs_helm
def test_every_service_is_probed_through_its_heartbeat(renders: dict[str, list[Doc]]) -> None:
    for name in RENDERS:
        raw = one(renders[name], "ConfigMap", f"{FULLNAME}-config")["data"]["config.json"]
        health_file = msgspec.json.decode(raw.encode(), type=Config).health_file
        assert health_file is not None and health_file.startswith("/tmp/")  # writable emptyDir
        services = [
            spec["containers"][0]
            for workload, _, spec in pod_specs(renders[name])
            if not workload.endswith("-nats")
        ]
        assert services
        for container in services:
            for probe in ("startupProbe", "livenessProbe"):
                command = container[probe]["exec"]["command"]
                assert command[:4] == ["attestmesh", "health", "--file", health_file]


@needs_helm
def test_every_container_is_probed_and_services_serve_metrics(
    renders: dict[str, list[Doc]],
) -> None:
    docs = renders["cert-manager"]
    raw = one(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["config.json"]
    config = msgspec.json.decode(raw.encode(), type=Config)
    assert config.metrics_port == 9464 and config.metrics_host == "0.0.0.0"
    sidecars = 0
    for workload, meta, pod in pod_specs(docs):
        for container in pod["containers"]:
            assert "livenessProbe" in container, (workload, container["name"])
        if meta["labels"]["app.kubernetes.io/component"] == "nats":
            (exporter,) = [c for c in pod["containers"] if c["name"] == "metrics"]
            assert exporter["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
            sidecars += 1
            continue
        (main,) = pod["containers"]
        assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in main["ports"]
        annotations = meta["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == "9464"
    assert sidecars == 1
    services = one(docs, "NetworkPolicy", f"{FULLNAME}-services")["spec"]
    (scrape,) = services["ingress"]
    assert scrape["ports"] == [{"port": 9464, "protocol": "TCP"}]
    assert scrape["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "observability"
    }


@needs_helm
def test_services_get_the_otlp_endpoint_and_their_identity(renders: dict[str, list[Doc]]) -> None:
    from services.verifier import registry

    docs = renders["cert-manager"]
    for workload, meta, pod in pod_specs(docs):
        component = meta["labels"]["app.kubernetes.io/component"]
        if component == "nats":
            continue
        (main,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in main["env"]}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4318"
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
        assert "k8s.pod.name=$(POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]
        assert main["args"][0] == component, workload
        assert main["args"][-2:] == ["--config", "/etc/attestmesh/config/config.json"]
    assert set(registry.families()) >= {"snp", "tdx", "sgx"}


# --- Grafana, the OpenTelemetry Collector and the image ------------------------------------


def test_dockerfile_builds_a_non_root_attestmesh_image() -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in lines
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms == ["FROM ${PYTHON_IMAGE} AS build", "FROM ${PYTHON_IMAGE}"]
    (user,) = [line for line in lines if line.startswith("USER ")]
    uid, gid = user.removeprefix("USER ").split(":")
    assert int(uid) > 0 and int(gid) > 0
    values = (CHART / "values.yaml").read_text()
    assert f"user: {uid}" in values and f"group: {gid}" in values
    assert lines[-2:] == ['ENTRYPOINT ["attestmesh"]', 'CMD ["--help"]']
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[1] == "*" and "!services/" in ignore


@pytest.mark.skipif(not HAVE_NKEYS, reason="nkeys (dev extra) is not installed")
def test_gen_identities_writes_usable_material(identities: dict[str, Any]) -> None:
    import nkeys  # type: ignore[import-untyped]
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out: Path = identities["dir"]
    for path in out.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path
    public = identities["public"]["natsUsers"]
    secrets = {s["metadata"]["name"]: s["data"] for s in identities["secrets"]["items"]}
    for identity in ("policy", "broker", "admin", "verifier-snp"):
        data = secrets[f"{FULLNAME}-{identity}"]
        seed = base64.b64decode(data["nats.seed"])
        nkey = public["verifiers"]["snp"] if identity == "verifier-snp" else public[identity]
        assert nkeys.from_seed(bytearray(seed)).public_key.decode() == nkey
        if "signing.key" in data:
            key = serialization.load_pem_private_key(base64.b64decode(data["signing.key"]), None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            assert isinstance(key.curve, ec.SECP256R1)
            pem = key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            assert pem.decode() == identities["public"]["trustedKeys"][identity]
    assert len(base64.b64decode(secrets[f"{FULLNAME}-broker"]["broker-sealing.key"])) == 32
    assert "signing.key" in secrets[f"{FULLNAME}-broker"]  # audit checkpoints


@needs_helm
@pytest.mark.parametrize("servers", [1, 3, 5])
def test_the_chart_and_up_derive_one_replica_count(
    identities: dict[str, Any], servers: int
) -> None:
    """One rule for how many copies JetStream keeps (``services.mesh.cluster.replicas_for``):
    a majority must survive the loss of any one server (the chart's schema allows only odd
    cluster sizes)."""
    from services.mesh.cluster import replicas_for

    docs = render(merge_values(default_values(identities), {"nats": {"replicas": servers}}))
    raw = one(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["config.json"]
    config = msgspec.json.decode(raw.encode(), type=Config)
    assert config.jetstream_replicas == replicas_for(servers)
