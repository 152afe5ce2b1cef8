"""Operator commands against an `up`-style authenticated nats-server, signed in as ``admin``:
``policy set|show|history|rollback`` and ``refvalues add|list|remove``, their refusals and
exit codes (``secret`` commands: tests/test_operator_secrets.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from services import cli
from services.broker.audit import AuditLog, AuditRecord
from services.broker.sealing import KEY_FILE_NAME, KeyFileSource
from services.broker.store import load_keyring
from services.mesh import identities, subjects
from services.mesh.bus import Bus
from services.mesh.keys import SigningKey
from services.mesh.natskv import NatsKeyValue
from services.mesh.server import NatsServer
from services.policy.engine import default_policy, default_resource_policy
from services.testing.natsauth import authenticated_server

T = TypeVar("T")
MEASUREMENT = "ab" * 48
OTHER = "cd" * 48
SECRET = b"do-not-print-me-0123456789"


@dataclass
class Mesh:
    server: NatsServer
    data_dir: Path
    seeds: dict[str, str]

    @property
    def target(self) -> list[str]:
        return ["--data-dir", str(self.data_dir)]

    def run(self, work: Callable[[Bus], Awaitable[T]]) -> T:
        """``work`` on a bus of its own, as the admin, with the streams declared."""
        return asyncio.run(self._with_bus(work))

    async def _with_bus(self, work: Callable[[Bus], Awaitable[T]]) -> T:
        bus = await Bus.connect(
            self.server.url, identities.ADMIN, nkey_seed_file=self.seeds[identities.ADMIN]
        )
        try:
            await bus.setup()
            return await work(bus)
        finally:
            await bus.close()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    data_dir = tmp_path / "mesh"
    data_dir.mkdir(mode=0o700)
    with authenticated_server(data_dir) as (server, seeds):
        keys = data_dir / "keys"
        SigningKey.load_or_create("operator", keys).publish_to(keys / "trusted")
        (data_dir / "config.json").write_text(
            json.dumps({"nats_url": server.url, "data_dir": str(data_dir)})
        )
        yield Mesh(server, data_dir, seeds)


def _audit_records(mesh: Mesh) -> list[AuditRecord]:
    async def read(bus: Bus) -> list[AuditRecord]:
        kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
        sealing = KeyFileSource.in_data_dir(mesh.data_dir, create=False)
        return await AuditLog(kv, await load_keyring(kv, sealing)).entries()

    return mesh.run(read)


def test_policy_set_show_history_rollback(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / "first" / "release.rego"
    first.parent.mkdir()
    first.write_text(default_policy() + "\n# first\n")
    second = tmp_path / "second" / "release.rego"
    second.parent.mkdir()
    second.write_text(default_policy() + "\n# second\n")
    (second.parent / "release_test.rego").write_text(
        "package attestmesh.release_test\n\nimport rego.v1\n\ntest_true if {\n\ttrue\n}\n"
    )
    assert cli.main(["policy", "set", str(first), *mesh.target]) == 0
    assert cli.main(["policy", "set", str(second), *mesh.target]) == 0
    out = capsys.readouterr().out
    assert "1/1 tests passed" in out and out.count("release policy stored") == 2

    assert cli.main(["policy", "show", *mesh.target]) == 0
    shown = capsys.readouterr()
    assert shown.out == second.read_text()
    assert "signed operator" in shown.err

    assert cli.main(["policy", "history", *mesh.target]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("signed operator" in line for line in lines)
    assert "(current)" in lines[1] and "(current)" not in lines[0]
    revision = int(lines[0].split()[1].rstrip(":"))

    assert cli.main(["policy", "rollback", str(revision), *mesh.target]) == 0
    assert f"release policy of revision {revision}" in capsys.readouterr().out
    assert cli.main(["policy", "show", *mesh.target]) == 0
    assert capsys.readouterr().out == first.read_text()

    # A revision that does not exist, and one that is not an operator-signed policy.
    assert cli.main(["policy", "rollback", "999", *mesh.target]) == 1
    assert "policy.no_revision" in capsys.readouterr().err

    async def plant(bus: Bus) -> int:
        kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_POLICIES))
        found = await kv.get("release")
        assert found is not None
        return await kv.update("release", b"package attestmesh.release\n", found[1])

    planted = mesh.run(plant)
    assert cli.main(["policy", "show", *mesh.target]) == 1
    assert "policy.unsigned" in capsys.readouterr().err
    assert cli.main(["policy", "rollback", str(planted), *mesh.target]) == 1
    assert "policy.unsigned" in capsys.readouterr().err
    assert cli.main(["policy", "history", *mesh.target]) == 0
    assert "REFUSED policy.unsigned" in capsys.readouterr().out


def test_policy_set_refuses_what_fails_its_check(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.rego"
    broken.write_text("package attestmesh.release\nallow if {\n")
    assert cli.main(["policy", "set", str(broken), *mesh.target]) == 1
    assert "policy.compile_failed" in capsys.readouterr().err
    failing = tmp_path / "failing" / "release.rego"
    failing.parent.mkdir()
    failing.write_text(default_policy())
    (failing.parent / "release_test.rego").write_text(
        "package attestmesh.release_test\n\ntest_no if {\n\tfalse\n}\n"
    )
    assert cli.main(["policy", "set", str(failing), *mesh.target]) == 1
    assert "policy not stored" in capsys.readouterr().err
    missing_key = ["--operator-key", str(tmp_path / "absent.key")]
    assert cli.main(["policy", "set", str(broken), *mesh.target, *missing_key]) == 2
    assert "keys.missing" in capsys.readouterr().err

    async def stored(bus: Bus) -> tuple[bytes, int] | None:
        return await NatsKeyValue(await bus.key_value(subjects.BUCKET_POLICIES)).get("release")

    assert mesh.run(stored) is None


def test_the_resource_policy_has_the_same_commands(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--resource`` addresses the broker's policy, with the release policy untouched."""
    first = tmp_path / "resources.rego"
    first.write_text(default_resource_policy())
    second = tmp_path / "v2" / "resources.rego"
    second.parent.mkdir()
    second.write_text(default_resource_policy() + "\n# second\n")
    resource = ["--resource", *mesh.target]
    assert cli.main(["policy", "set", str(first), *resource]) == 0
    assert cli.main(["policy", "set", str(second), *resource]) == 0
    assert capsys.readouterr().out.count("resource policy stored") == 2
    assert cli.main(["policy", "show", *resource]) == 0
    assert capsys.readouterr().out == second.read_text()
    assert cli.main(["policy", "show", *mesh.target]) == 1  # no release policy was set
    assert "policy.none: no release policy is stored" in capsys.readouterr().err

    assert cli.main(["policy", "history", *resource]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("signed operator" in line for line in lines)
    revision = int(lines[0].split()[1].rstrip(":"))
    assert cli.main(["policy", "rollback", str(revision), *resource]) == 0
    assert f"resource policy of revision {revision}" in capsys.readouterr().out
    assert cli.main(["policy", "show", *resource]) == 0
    assert capsys.readouterr().out == first.read_text()
    # A release revision is not a resource policy, and the reverse.
    assert cli.main(["policy", "rollback", str(revision), *mesh.target]) == 1
    assert "policy.no_revision" in capsys.readouterr().err
    assert cli.main(["policy", "set", str(first), *mesh.target]) == 1
    assert "policy.compile_failed" in capsys.readouterr().err


def test_refvalues_add_list_remove(mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    add = ["refvalues", "add", "snp", "measurement"]
    assert cli.main([*add, MEASUREMENT.upper(), "--note", "image 1", *mesh.target]) == 0
    assert cli.main([*add, OTHER, "--expires", "2999-01-01T00:00:00Z", *mesh.target]) == 0
    assert cli.main(["refvalues", "add", "snp", "guest_svn", "2", *mesh.target]) == 0
    capsys.readouterr()
    assert cli.main(["refvalues", "list", "snp", *mesh.target]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].startswith("snp (version ") and "signed operator" in listed[0]
    assert f"  measurement {MEASUREMENT} note='image 1'" in listed
    assert f"  measurement {OTHER} expires 2999-01-01T00:00:00+00:00" in listed
    assert "  guest_svn 2" in listed

    refusals = [
        ([*add, "ab" * 32], "refvalues.bad_value"),
        ([*add, OTHER, "--expires", "2001-01-01T00:00:00Z"], "cli.bad_time"),
        ([*add, OTHER, "--expires", "2999-01-01T00:00:00"], "cli.bad_time"),
        (["refvalues", "remove", "snp", "measurement", "ef" * 48], "refvalues.not_found"),
    ]
    for argv, reason in refusals:
        assert cli.main([*argv, *mesh.target]) == 2
        assert reason in capsys.readouterr().err
    remove = ["refvalues", "remove", "snp"]
    assert cli.main([*remove, "measurement", MEASUREMENT, *mesh.target]) == 0
    # The last value of a claim cannot go: the policy would stop checking the claim.
    assert cli.main([*remove, "guest_svn", "2", *mesh.target]) == 2
    assert "refvalues.last_value" in capsys.readouterr().err
    assert cli.main(["refvalues", "list", *mesh.target]) == 0
    out = capsys.readouterr().out
    assert MEASUREMENT not in out and OTHER in out


def test_refvalues_refuse_to_resign_what_nobody_signed(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    """A writer of the bucket planted values: changing them must not launder them."""

    async def plant(bus: Bus) -> int:
        kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_REFVALUES))
        return await kv.create("snp", json.dumps({"measurement": [OTHER]}).encode())

    mesh.run(plant)
    argv = ["refvalues", "add", "snp", "measurement", MEASUREMENT, *mesh.target]
    assert cli.main(argv) == 2
    assert "refvalues.unsigned" in capsys.readouterr().err
    assert cli.main(["refvalues", "list", *mesh.target]) == 1
    assert "refvalues.unsigned" in capsys.readouterr().err


async def test_the_broker_service_never_invents_a_sealing_key(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Outside `up`, a broker without its key stops with an error naming the path."""
    from services import app
    from services.mesh.config import Config
    from services.mesh.errors import SealingError

    data_dir = tmp_path / "broker"
    data_dir.mkdir(mode=0o700)
    config = Config(nats_url=nats_server.url, data_dir=str(data_dir))
    with pytest.raises(SealingError) as caught:
        await app.broker(config, asyncio.Event())
    assert caught.value.reason == "broker.sealing_key_missing"
    assert str(data_dir / KEY_FILE_NAME) in caught.value.detail
    assert not (data_dir / KEY_FILE_NAME).exists()
