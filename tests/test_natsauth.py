"""The embedded server's identities, live: who gets in, and what each identity may not do.

The server is the real nats-server, configured exactly as ``attestmesh up`` configures it
(services/mesh/authconf.py from services/mesh/identities.py); the attacks are the ones that
worked against the anonymous server: taking another node's nonce or secret, reading other
nodes' traffic, forging decisions, and rewriting the release policy.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import pytest

from services.broker.sealing import KeyFileSource
from services.cli import main as cli
from services.collector.service import DEFAULT_RESOURCE
from services.embedded import prepare
from services.mesh import authconf, events, identities, subjects
from services.mesh.bus import Bus
from services.mesh.config import load
from services.mesh.errors import BusError, ConfigError, Rejected
from services.mesh.keys import SigningKey
from services.mesh.server import NatsServer
from services.testing.brokerthread import running_broker
from services.testing.mesh import TestMesh
from services.testing.natsauth import authenticated_server, not_refused

NODES = ("node-a", "node-b")


@pytest.fixture
def auth_nats(tmp_path: Path) -> Iterator[tuple[NatsServer, dict[str, str]]]:
    with authenticated_server(tmp_path / "data", nodes=NODES) as started:
        yield started


async def _node_bus(server: NatsServer, seeds: dict[str, str], node: str) -> Bus:
    return await Bus.connect(
        server.url,
        identities.node_identity(node),
        wait=5.0,
        nkey_seed_file=seeds[identities.node_identity(node)],
        inbox_prefix=subjects.node_inbox(node),
    )


def test_identity_files_are_private_and_every_identity_has_permissions(
    auth_nats: tuple[NatsServer, dict[str, str]], tmp_path: Path
) -> None:
    _, seeds = auth_nats
    directory = authconf.identities_dir(tmp_path / "data")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in [*map(Path, seeds.values()), directory / authconf.REGISTRY]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    conf = json.loads(authconf.server_config_path(tmp_path / "data").read_text())
    assert set(conf) == {"authorization"}  # no no_auth_user, no anonymous account
    users = conf["authorization"]["users"]
    assert sorted(u["nkey"] for u in users) == sorted(authconf.read_registry(directory).values())
    with pytest.raises(ConfigError, match="identity"):
        identities.permissions("collector")  # the shared collector identity is gone


def test_a_node_identity_has_no_jetstream_api_and_no_bucket() -> None:
    perms = identities.node("node-a")
    for subject in (*perms.publish, *perms.subscribe):
        assert not subject.startswith(("$JS", "$KV")), subject
        assert "node-a" in subject, subject
    assert not perms.responder


async def test_anonymous_and_unknown_keys_are_refused(
    auth_nats: tuple[NatsServer, dict[str, str]],
) -> None:
    server, _ = auth_nats
    with pytest.raises(BusError) as refused:
        await Bus.connect(server.url, "anonymous", wait=2.0)
    assert refused.value.reason in {"bus.unauthorized", "bus.connect_failed"}
    stranger, _ = authconf.new_user()
    for options in ({}, {"nkeys_seed_str": stranger}):
        with pytest.raises((nats.errors.Error, OSError)):
            await asyncio.wait_for(
                nats.connect(
                    server.url, allow_reconnect=False, max_reconnect_attempts=1, **options
                ),
                10,
            )


async def test_node_identity_cannot_step_outside_its_own_subjects(
    auth_nats: tuple[NatsServer, dict[str, str]],
) -> None:
    server, seeds = auth_nats
    seed = seeds["node-node-a"]
    attacks = [
        ("pub", "attest.evidence.snp.node-b"),
        ("pub", "attest.nonce.node-b"),
        ("pub", "attest.nonce"),
        ("pub", "attest.secret.node-b"),
        ("pub", "attest.decision.node-a"),
        ("pub", "attest.verdict.snp.node-a"),
        ("pub", "attest.revoked.node-b"),
        ("pub", "attest.load.broker"),  # a false load report would hold back every round
        ("pub", "$KV.policies.release"),
        ("pub", "$KV.nonces.x"),
        ("pub", "$KV.broker-state.x"),
        ("pub", "$JS.API.STREAM.INFO.KV_policies"),
        ("pub", "$JS.API.STREAM.MSG.GET.KV_broker-state"),
        ("pub", "$JS.API.DIRECT.GET.KV_policies"),
        ("pub", "$JS.API.CONSUMER.CREATE.EVIDENCE"),
        ("pub", "$JS.API.CONSUMER.MSG.NEXT.EVIDENCE.verifier-snp"),
        ("pub", "$JS.API.STREAM.CREATE.KV_policies"),
        ("sub", "attest.evidence.>"),
        ("sub", "attest.decision.>"),
        ("sub", "attest.decision.node-b"),
        ("sub", "attest.revoked.*"),
        ("sub", "_INBOX_node_node-b.>"),
        ("sub", "_INBOX.>"),
        ("sub", "_INBOX_policy.>"),
        ("sub", "$KV.>"),
        ("sub", ">"),
    ]
    prefix = subjects.node_inbox("node-a")
    assert await not_refused(server.url, seed, attacks, inbox_prefix=prefix) == []
    own = [
        ("pub", "attest.nonce.node-a"),
        ("pub", "attest.evidence.snp.node-a"),
        ("pub", "attest.secret.node-a"),
        ("sub", "attest.decision.node-a"),
        ("sub", "attest.revoked.node-a"),
        ("sub", f"{prefix}.>"),
    ]
    assert await not_refused(server.url, seed, own, inbox_prefix=prefix) == [s for _, s in own]


async def test_services_stay_in_their_lanes(
    auth_nats: tuple[NatsServer, dict[str, str]],
) -> None:
    server, seeds = auth_nats
    verifier = await not_refused(
        server.url,
        seeds["verifier-snp"],
        [
            ("pub", "$KV.policies.release"),
            ("pub", "$KV.refvalues.snp"),
            ("pub", "attest.decision.node-a"),
            ("pub", "attest.load.broker"),
            ("sub", "_INBOX_node_node-a.>"),
            ("sub", "attest.secret.*"),
        ],
        inbox_prefix=subjects.inbox("verifier-snp"),
    )
    assert verifier == []
    admin = await not_refused(
        server.url,
        seeds["admin"],
        [
            ("pub", "attest.decision.node-a"),
            ("pub", "attest.evidence.snp.node-a"),
            ("pub", "$KV.nonces.x"),
            ("pub", "$JS.API.STREAM.DELETE.EVIDENCE"),
            # Shortening a bucket's max age would expire every pin or the audit log unseen.
            *(("pub", f"$JS.API.STREAM.UPDATE.{s}") for s in ("KV_node-pins", "KV_broker-state")),
            ("pub", "$JS.API.STREAM.UPDATE.EVIDENCE"),
            ("pub", "$KV.node-pins.node-a"),
            # A broker's own records: putting back a revoked node's older allow, or clearing
            # its release claim, would re-admit it.
            ("pub", "$KV.broker-state.decision.node-a"),
            ("pub", "$KV.broker-state.answered.node-a"),
            ("pub", "$KV.broker-state.audit-checkpoint"),
            ("pub", "$KV.broker-state.audit.000000000001"),  # nor erase or rewrite the log
            # Secrets change only through the broker, which audits each change first.
            ("pub", "$KV.broker-state.secret.default/x"),
            ("pub", "$KV.broker-state.index"),
            ("sub", "attest.secret.*"),
            ("sub", "_INBOX_node_node-a.>"),
            ("sub", "attest.evidence.>"),
            ("sub", "attest.nonce.*"),
        ],
        inbox_prefix=subjects.inbox("admin"),
    )
    assert admin == []
    policy = await not_refused(
        server.url,
        seeds["policy"],
        [("pub", "$KV.policies.release"), ("pub", "$KV.refvalues.snp")],
        inbox_prefix=subjects.inbox("policy"),
    )
    assert policy == [], "the policy service may not write what it enforces"
    own = [
        ("sub", "attest.revoked.*"),
        ("sub", "attest.verdict.>"),
        ("sub", "attest.decision.>"),
        ("pub", "$KV.broker-state.keyring"),
        ("pub", "attest.operator.secret-put"),
    ]
    allowed = await not_refused(
        server.url, seeds["admin"], own, inbox_prefix=subjects.inbox("admin")
    )
    assert allowed == [s for _, s in own]


async def test_the_admin_may_write_policies_and_a_verifier_may_not(
    auth_nats: tuple[NatsServer, dict[str, str]],
) -> None:
    server, seeds = auth_nats
    admin = await Bus.connect(server.url, "admin", wait=5.0, nkey_seed_file=seeds["admin"])
    verifier = await Bus.connect(
        server.url, "verifier-snp", wait=5.0, nkey_seed_file=seeds["verifier-snp"]
    )
    try:
        await admin.setup()
        policies = await admin.key_value(subjects.BUCKET_POLICIES)
        revision = await policies.put("release", b"package attestmesh.release\n")
        assert revision >= 1
        own = await verifier.key_value(subjects.BUCKET_COLLATERAL)
        assert await own.put("probe", b"x") >= 1
        with pytest.raises(nats.errors.Error):
            await verifier.js.publish(
                "$KV.policies.release", b"package allow_everything", timeout=1.0
            )
        assert (await policies.get("release")).value == b"package attestmesh.release\n"
    finally:
        await verifier.close()
        await admin.close()


async def test_a_node_gets_only_its_own_nonce_and_secret_through_the_whole_flow(
    auth_nats: tuple[NatsServer, dict[str, str]], tmp_path: Path
) -> None:
    server, seeds = auth_nats
    mesh = TestMesh(server, tmp_path / "mesh", seeds=seeds)
    await mesh.start()
    node_a = await _node_bus(server, seeds, "node-a")
    try:
        received: dict[str, bytes] = {}
        result = await mesh.node(node_a, "node-a", received=received).attest_once()
        assert result.released and received["node-a"] == mesh.secret
        # The subject is node-a's own, the body names node-b: the policy service refuses.
        with pytest.raises(Rejected) as refused:
            await node_a.request(
                subjects.nonce("node-a"),
                events.NonceRequest(node="node-b"),
                events.NonceChallenge,
                retry_for=2.0,
            )
        assert refused.value.reason == "policy.routing_mismatch"
        # node-b's own subjects are closed to node-a at the server: nobody ever answers.
        with pytest.raises(BusError):
            await node_a.request(
                subjects.nonce("node-b"),
                events.NonceRequest(node="node-b"),
                events.NonceChallenge,
                timeout=0.5,
                retry_for=1.0,
            )
        with pytest.raises(BusError):
            await node_a.request(
                subjects.secret("node-b"),
                events.SecretRequest(
                    node="node-b",
                    resource=DEFAULT_RESOURCE,
                    public_key=bytes(32),
                    decision_id="d",
                    evidence_id="e",
                ),
                events.SecretResponse,
                timeout=0.5,
                retry_for=1.0,
            )
    finally:
        await node_a.close()
        await mesh.stop()
    violations = [ln for ln in server.log_path.read_text().splitlines() if "Violation" in ln]
    assert violations, "node-a's attempts on node-b's subjects were not even logged"
    assert all(':node-node-a"' in line for line in violations), violations


async def test_enroll_admits_a_new_node_to_the_running_embedded_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    with authenticated_server(data_dir) as (server, _):
        prepare(data_dir, server.url)
        out = tmp_path / "edge-1"
        assert (
            cli(["node", "enroll", "edge-1", "--data-dir", str(data_dir), "--out", str(out)]) == 0
        )
        assert "reloaded" in capsys.readouterr().out
        seed = out / "node-edge-1.nk"
        for path in (seed, out / "config.json"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert (out / "keys" / "trusted" / "policy.pem").read_bytes() == (
            data_dir / "keys" / "trusted" / "policy.pem"
        ).read_bytes()
        config = load(out / "config.json")
        assert config.nats_url == server.url and config.nats_nkey_seed_file == str(seed.resolve())
        bus = None
        for _ in range(50):  # the reload is asynchronous
            try:
                bus = await Bus.connect(
                    server.url,
                    "node-edge-1",
                    wait=0.5,
                    nkey_seed_file=str(seed),
                    inbox_prefix=subjects.node_inbox("edge-1"),
                )
                break
            except BusError:
                await asyncio.sleep(0.1)
        assert bus is not None, "the enrolled node could not connect"
        await bus.close()
        allowed = await not_refused(
            server.url,
            str(seed),
            [("pub", "attest.evidence.snp.edge-1"), ("pub", "attest.evidence.snp.edge-2")],
            inbox_prefix=subjects.node_inbox("edge-1"),
        )
        assert allowed == ["attest.evidence.snp.edge-1"]
        # Enrolling the same name again must not silently lock the first node out.
        again = ["node", "enroll", "edge-1", "--data-dir", str(data_dir), "--out", str(out / "x")]
        assert cli(again) == 2
        assert "enroll.exists" in capsys.readouterr().err
        assert (
            authconf.public_of(seed)
            == authconf.read_registry(authconf.identities_dir(data_dir))["node-edge-1"]
        )
    # A stale pid file whose number now names another process (here: this test) is refused.
    pid_file = authconf.server_pid_file(data_dir)
    pid_file.write_text(str(os.getpid()))
    with pytest.raises(ConfigError, match="not nats-server"):
        authconf.signal_reload(pid_file)


def test_enroll_for_a_chart_release_writes_the_values_to_merge(tmp_path: Path) -> None:
    config_dir = tmp_path / "release"
    (config_dir / "keys" / "trusted").mkdir(parents=True)
    (config_dir / "keys" / "trusted" / "policy.pem").write_text("-----BEGIN PUBLIC KEY-----\n")
    config_file = config_dir / "config.json"
    config_file.write_text(
        json.dumps(
            {
                "nats_url": "tls://nats.example:4222",
                "data_dir": str(config_dir / "d"),
                "keys_dir": str(config_dir / "keys"),
            }
        )
    )
    out = tmp_path / "out"
    assert cli(["node", "enroll", "gpu-7", "--config", str(config_file), "--out", str(out)]) == 0
    values = json.loads((out / "values.json").read_text())
    public = values["collector"]["nodeIdentities"]["nodes"]["gpu-7"]
    assert public == authconf.public_of(out / "node-gpu-7.nk")
    assert cli(["node", "enroll", "bad.name", "--config", str(config_file), "--out", str(out)]) == 2


def test_operator_commands_sign_in_as_the_admin_of_an_up_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s" * 32)
    with authenticated_server(data_dir) as (server, _):
        _, config_path = prepare(data_dir, server.url)
        KeyFileSource.in_data_dir(data_dir, create=True).sealing_key()  # as `up` does
        keys = data_dir / "keys"
        for name in ("operator", "broker"):
            SigningKey.load_or_create(name, keys).publish_to(keys / "trusted")
        put = ["secret", "put", "default/db/key", str(secret), "--config", str(config_path)]
        with running_broker(load(config_path)):
            assert cli(put) == 0
            assert cli(["secret", "list", "--config", str(config_path)]) == 0
        assert "default/db/key" in capsys.readouterr().out.splitlines()
        # Without the admin seed the same command is refused by the server, not half-done.
        authconf.seed_file(authconf.identities_dir(data_dir), identities.ADMIN).unlink()
        assert cli(["secret", "list", "--config", str(config_path)]) == 2
        assert "bus.unauthorized" in capsys.readouterr().err
