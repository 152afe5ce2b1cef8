"""``attestmesh secret put|list|delete`` as signed requests a real broker audits and applies,
and the attacker's attempts around them: forged, replayed, re-targeted and swapped requests,
an impostor answering for the broker, and an admin writing sealed state behind its back."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from services import cli, secretcli
from services.broker import intake, release
from services.broker.audit import AuditLog, AuditRecord, Outcome
from services.broker.sealing import KeyFileSource
from services.broker.store import SecretStore, load_keyring
from services.mesh import config as config_mod
from services.mesh import events, identities, subjects
from services.mesh.bus import Bus
from services.mesh.errors import VerificationError
from services.mesh.keys import SigningKey, TrustedKeys
from services.mesh.natskv import NatsKeyValue
from services.mesh.server import NatsServer
from services.testing.brokerthread import running_broker
from services.testing.natsauth import authenticated_server, not_refused

T = TypeVar("T")
SECRET = b"do-not-print-me-0123456789"


@dataclass
class Mesh:
    server: NatsServer
    data_dir: Path
    seeds: dict[str, str]
    operator: SigningKey

    @property
    def target(self) -> list[str]:
        return ["--data-dir", str(self.data_dir)]

    def run(self, work: Callable[[Bus], Awaitable[T]], identity: str = identities.ADMIN) -> T:
        async def session() -> T:
            bus = await Bus.connect(self.server.url, identity, nkey_seed_file=self.seeds[identity])
            try:
                return await work(bus)
            finally:
                await bus.close()

        return asyncio.run(session())

    def desk(self, operator: SigningKey | None = None) -> secretcli._Desk:
        trusted = TrustedKeys.load(self.data_dir / "keys" / "trusted")
        return secretcli._Desk(operator or self.operator, trusted, 10.0)

    def store_names(self) -> list[str]:
        async def names(bus: Bus) -> list[str]:
            kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
            store = await SecretStore.open(kv, KeyFileSource.in_data_dir(self.data_dir))
            return await store.list()

        return self.run(names, identities.BROKER)

    def secret(self, name: str) -> bytes:
        async def read(bus: Bus) -> bytes:
            kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
            store = await SecretStore.open(kv, KeyFileSource.in_data_dir(self.data_dir))
            return await store.get(name)

        return self.run(read, identities.BROKER)

    def audit(self) -> list[AuditRecord]:
        async def read(bus: Bus) -> list[AuditRecord]:
            kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
            data_key = await load_keyring(kv, KeyFileSource.in_data_dir(self.data_dir))
            return await AuditLog(kv, data_key).entries()

        return self.run(read, identities.BROKER)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    data_dir = tmp_path / "mesh"
    data_dir.mkdir(mode=0o700)
    with authenticated_server(data_dir, nodes=("n1",)) as (server, seeds):
        keys = data_dir / "keys"
        operator = SigningKey.load_or_create("operator", keys)
        for key in (operator, SigningKey.load_or_create("broker", keys)):
            key.publish_to(keys / "trusted")
        SigningKey.load_or_create("policy", keys).publish_to(keys / "trusted")
        KeyFileSource.in_data_dir(data_dir, create=True).sealing_key()  # as `up` does
        (data_dir / "config.json").write_text(
            json.dumps({"nats_url": server.url, "data_dir": str(data_dir)})
        )
        config = config_mod.load(data_dir / "config.json", data_dir=str(data_dir))
        mesh = Mesh(server, data_dir, seeds, operator)
        mesh.run(_declare)
        with running_broker(config):
            yield mesh


async def _declare(bus: Bus) -> None:
    await bus.setup()


def test_changes_are_applied_audited_and_never_printed(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    value = tmp_path / "value"
    value.write_bytes(SECRET)
    assert cli.main(["secret", "put", "default/key/app", str(value), *mesh.target]) == 0
    value.write_bytes(SECRET + b"-2")
    assert cli.main(["secret", "put", "default/key/app", str(value), *mesh.target]) == 0
    assert cli.main(["secret", "list", *mesh.target]) == 0
    assert cli.main(["secret", "delete", "default/key/app", *mesh.target]) == 0
    assert cli.main(["secret", "list", *mesh.target]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "default/key/app stored (version 1, audit record 0)",
        "default/key/app stored (version 2, audit record 1)",
        "default/key/app",
        "default/key/app deleted (audit record 2)",
    ]
    assert b"do-not-print" not in (captured.out + captured.err).encode()

    records = mesh.audit()
    assert [r.outcome for r in records] == [
        Outcome.SECRET_PUT,
        Outcome.SECRET_PUT,
        Outcome.SECRET_DELETED,
    ]
    assert {r.actor for r in records} == {f"operator:{mesh.operator.kid}"}
    assert {r.resource for r in records} == {"default/key/app"}
    assert len({r.decision_id for r in records}) == 3  # one signed request each
    assert cli.main(["audit", "verify", *mesh.target]) == 0


def test_the_value_stored_is_the_value_sent(mesh: Mesh, tmp_path: Path) -> None:
    value = tmp_path / "value"
    value.write_bytes(SECRET)
    assert cli.main(["secret", "put", "prod/db/password", str(value), *mesh.target]) == 0
    assert mesh.secret("prod/db/password") == SECRET


def test_commands_need_no_sealing_key(mesh: Mesh, tmp_path: Path) -> None:
    """A remote operator holds the admin seed, the operator key and the trusted keys, and
    nothing of the broker's."""
    remote = tmp_path / "remote"
    keys = remote / "keys"
    (keys / "trusted").mkdir(parents=True)
    for name in ("operator.key",):
        (keys / name).write_bytes((mesh.data_dir / "keys" / name).read_bytes())
        (keys / name).chmod(0o600)
    for pem in (mesh.data_dir / "keys" / "trusted").glob("*.pem"):
        (keys / "trusted" / pem.name).write_bytes(pem.read_bytes())
    config = remote / "config.json"
    config.write_text(
        json.dumps(
            {
                "nats_url": mesh.server.url,
                "data_dir": str(remote / "data"),
                "keys_dir": str(keys),
                "nats_nkey_seed_file": mesh.seeds[identities.ADMIN],
            }
        )
    )
    value = tmp_path / "value"
    value.write_bytes(SECRET)
    assert (
        cli.main(["secret", "put", "default/key/remote", str(value), "--config", str(config)]) == 0
    )
    assert not list(remote.rglob("*sealing*"))
    assert mesh.secret("default/key/remote") == SECRET


def _send(mesh: Mesh, request: events.OperatorRequest) -> events.OperatorResponse:
    async def send(bus: Bus) -> events.OperatorResponse:
        return await bus.request(
            subjects.operator(request.action), request, events.OperatorResponse, timeout=5
        )

    return mesh.run(send)


def _put_request(
    mesh: Mesh,
    resource: str,
    value: bytes,
    *,
    signer: SigningKey | None = None,
    lifetime: int = 60,
    generation: int | None = None,
) -> events.OperatorRequest:
    """A well-formed put, as the command builds it, with knobs an attacker would turn."""

    async def intake_of(bus: Bus) -> tuple[bytes, int]:
        return await mesh.desk()._intake(bus)

    public, current = mesh.run(intake_of)
    request_id = events.new_id()
    wrapped = release.wrap(value, public, info=intake.value_info(resource), aad=request_id.encode())
    now = int(time.time())
    token = (signer or mesh.operator).sign(
        {
            "act": "secret-put",
            "jti": request_id,
            "resource": resource,
            "generation": current if generation is None else generation,
            "digest": intake.value_digest(wrapped.enc, wrapped.ciphertext),
            "iat": now,
            "exp": now + lifetime,
        }
    )
    return events.OperatorRequest(
        id=request_id,
        action="secret-put",
        token=token,
        enc=wrapped.enc,
        ciphertext=wrapped.ciphertext,
    )


def test_a_replayed_request_changes_nothing(mesh: Mesh) -> None:
    first = _put_request(mesh, "default/key/app", b"first")
    assert _send(mesh, first).ok
    second = _put_request(mesh, "default/key/app", b"second")
    assert _send(mesh, second).ok
    replay = _send(mesh, first)  # the attacker recorded the first put and sends it again
    assert (replay.ok, replay.reason) == (False, "broker.generation_moved")
    assert mesh.secret("default/key/app") == b"second"
    assert len(mesh.audit()) == 2


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("unknown_signer", "token.unknown_signer"),
        ("policy_signer", "token.wrong_signer"),
        ("long_lived", "operator.token_lifetime"),
        ("swapped_value", "operator.token_mismatch"),
        ("other_id", "operator.token_mismatch"),
        ("other_subject", "broker.routing_mismatch"),
    ],
)
def test_forged_and_altered_requests_are_refused(mesh: Mesh, tamper: str, reason: str) -> None:
    stranger = SigningKey.generate("operator")
    policy = SigningKey.load("policy", mesh.data_dir / "keys" / "policy.key")
    request = _put_request(
        mesh,
        "default/key/app",
        b"planted",
        signer={"unknown_signer": stranger, "policy_signer": policy}.get(tamper),
        lifetime=3600 if tamper == "long_lived" else 60,
    )
    if tamper == "swapped_value":
        other = _put_request(mesh, "default/key/app", b"other value")
        request = events.OperatorRequest(
            id=request.id,
            action="secret-put",
            token=request.token,
            enc=other.enc,
            ciphertext=other.ciphertext,
        )
    if tamper == "other_id":
        request = events.OperatorRequest(
            action="secret-put", token=request.token, enc=request.enc, ciphertext=request.ciphertext
        )
    if tamper == "other_subject":

        async def misroute(bus: Bus) -> events.OperatorResponse:
            return await bus.request(
                subjects.operator("secret-delete"), request, events.OperatorResponse, timeout=5
            )

        response = mesh.run(misroute)
    else:
        response = _send(mesh, request)
    assert (response.ok, response.reason) == (False, reason)
    assert "default/key/app" not in mesh.store_names()
    assert mesh.audit() == []


def test_a_value_wrapped_for_another_resource_does_not_open(mesh: Mesh) -> None:
    """The token may be re-signed by the operator for another name, but the value was wrapped
    for the first one: the broker cannot open it, so nothing is stored."""
    request = _put_request(mesh, "default/key/app", b"meant for app")
    now = int(time.time())
    token = mesh.operator.sign(
        {
            "act": "secret-put",
            "jti": request.id,
            "resource": "default/key/other",
            "generation": 0,
            "digest": intake.value_digest(request.enc, request.ciphertext),
            "iat": now,
            "exp": now + 60,
        }
    )
    moved = events.OperatorRequest(
        id=request.id,
        action="secret-put",
        token=token,
        enc=request.enc,
        ciphertext=request.ciphertext,
    )
    response = _send(mesh, moved)
    assert (response.ok, response.reason) == (False, "broker.unwrap_failed")
    assert mesh.store_names() == []


async def test_an_impostor_answering_for_the_broker_gets_no_value(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Whoever answers on the operator subject must prove it is the broker before the command
    wraps anything to its key: an intake key signed by another trusted service is refused."""
    keys = tmp_path / "keys"
    policy = SigningKey.load_or_create("policy", keys)
    policy.publish_to(keys / "trusted")
    SigningKey.load_or_create("broker", keys).publish_to(keys / "trusted")
    received: list[str] = []
    impostor = await Bus.connect(nats_server.url, "impostor")
    bus = await Bus.connect(nats_server.url, "admin")
    try:

        async def answer(msg: object) -> events.Message:
            request = events.decode(msg.data, events.OperatorRequest)  # type: ignore[attr-defined]
            received.append(request.action)
            now = int(time.time())
            key = "A" * 43
            token = policy.sign({"sub": "intake", "intake": key, "iat": now, "exp": now + 60})
            return events.OperatorResponse(ok=True, intake=token)

        await impostor.serve(subjects.OPERATOR_ALL, answer, queue="broker")
        desk = secretcli._Desk(
            SigningKey.generate("operator"), TrustedKeys.load(keys / "trusted"), 5.0
        )
        with pytest.raises(VerificationError) as caught:
            await desk.change(bus, "put", "default/key/app", SECRET)
        assert caught.value.reason == "token.wrong_signer"
        assert received == ["intake"]
    finally:
        await bus.close()
        await impostor.close()


def test_admin_writes_no_sealed_secret_state_and_nodes_send_no_operator_requests(
    mesh: Mesh,
) -> None:
    bucket = subjects.BUCKET_BROKER
    attempts = [
        ("pub", f"$KV.{bucket}.index"),
        ("pub", f"$KV.{bucket}.secret.ZGVmYXVsdC9rZXkvYXBw"),
        ("pub", f"$KV.{bucket}.audit.000000000000"),
    ]
    assert asyncio.run(_not_refused(mesh, identities.ADMIN, attempts)) == []
    node = identities.node_identity("n1")
    operator_subjects = [("pub", subjects.operator(a)) for a in ("intake", "secret-put")]
    assert asyncio.run(_not_refused(mesh, node, operator_subjects)) == []


def test_refusals_record_nothing(mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["secret", "delete", "default/key/never", *mesh.target]) == 2
    assert "broker.secret_not_found" in capsys.readouterr().err
    assert mesh.audit() == []


async def _not_refused(mesh: Mesh, identity: str, attempts: list[tuple[str, str]]) -> list[str]:
    return await not_refused(
        mesh.server.url,
        mesh.seeds[identity],
        attempts,
        inbox_prefix=subjects.inbox(identity),
    )
