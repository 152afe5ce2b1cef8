"""``attestmesh recovery`` against an authenticated nats-server, signed in as ``admin``: five
officers, shares of the data key any three of which recover it after the sealing key is
lost, a real broker serving the old secrets under the new key; and the refusals (two
shares, shares of another key, a tampered share, the wrong officer's key), none of which
changes the keyring."""

from __future__ import annotations

import base64
import json
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services import cli
from services.broker.keysources import ENV_KEY
from services.broker.recovery import make_recovery_shares
from services.broker.sealing import KEY_FILE_NAME, AeadKey, KeyFileSource, StaticKeySource
from services.broker.store import KEYRING_KEY, SecretStore, open_keyring
from services.mesh import config as config_mod
from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.keys import SigningKey
from services.mesh.natskv import NatsKeyValue
from services.mesh.ports import free_port
from services.testing.brokerthread import running_broker
from services.testing.natsauth import authenticated_server
from tests.test_operator_secrets import SECRET, Mesh

OFFICERS = ("ada", "bo", "cy", "di", "ed")


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    """An authenticated server, the keys `up` would make, and no broker yet (:func:`broker`)."""
    data_dir = tmp_path / "mesh"
    data_dir.mkdir(mode=0o700)
    with authenticated_server(data_dir) as (server, seeds):
        keys = data_dir / "keys"
        operator = SigningKey.load_or_create("operator", keys)
        for name in ("operator", "broker", "policy"):
            SigningKey.load_or_create(name, keys).publish_to(keys / "trusted")
        KeyFileSource.in_data_dir(data_dir, create=True).sealing_key()  # as `up` does
        (data_dir / "config.json").write_text(
            json.dumps({"nats_url": server.url, "data_dir": str(data_dir)})
        )
        yield Mesh(server, data_dir, seeds, operator)


def broker(mesh: Mesh, **overrides: object) -> AbstractContextManager[None]:
    """The broker service of ``mesh``, with ``overrides`` (its sealing source) applied."""
    path = mesh.data_dir / "config.json"
    return running_broker(config_mod.load(path, data_dir=str(mesh.data_dir), **overrides))


@dataclass
class Ceremony:
    """A mesh with two secrets, five officers and their shares (3 of 5)."""

    mesh: Mesh
    keys: Path
    shares: Path
    data_key: AeadKey

    def share(self, name: str) -> str:
        return str(self.shares / f"{name}.share")

    def key(self, name: str) -> str:
        return str(self.keys / f"{name}.key")

    def recover(self, names: tuple[str, ...], *extra: str, keys: tuple[str, ...] = ()) -> int:
        argv = ["recovery", "recover", *(self.share(n) for n in names)]
        for name in keys or names:
            argv += ["--officer-key", self.key(name)]
        return cli.main([*argv, *extra, *self.mesh.target])

    def keyring(self) -> bytes:
        async def read(bus: Bus) -> bytes:
            found = await NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER)).get(KEYRING_KEY)
            assert found is not None
            return found[0]

        return self.mesh.run(read)


def _store(where: Mesh, source: object) -> dict[str, bytes]:
    async def read(bus: Bus) -> dict[str, bytes]:
        kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
        store = await SecretStore.open(kv, source)  # type: ignore[arg-type]
        return {name: await store.get(name) for name in await store.list()}

    return where.run(read)


@pytest.fixture
def ceremony(mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Ceremony]:
    sealing = KeyFileSource.in_data_dir(mesh.data_dir, create=False)
    value = tmp_path / "value"
    value.write_bytes(SECRET)
    with broker(mesh):
        for resource in ("default/key/app", "default/key/db"):
            assert cli.main(["secret", "put", resource, str(value), *mesh.target]) == 0
    keys = tmp_path / "officers"
    for name in OFFICERS:
        assert cli.main(["recovery", "officer-key", name, "--out", str(keys)]) == 0
    shares = tmp_path / "shares"
    init = ["recovery", "init", "--shares", "5", "--threshold", "3", "--officers", str(keys)]
    assert cli.main([*init, "--out", str(shares), *mesh.target]) == 0

    async def data_key(bus: Bus) -> AeadKey:
        kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
        return await open_keyring(kv, sealing)

    key = mesh.run(data_key)
    out = capsys.readouterr().out
    assert f"data key {key.key_id.hex()}: 5 shares, any 3 recover it" in out
    assert key.export().hex() not in out and base64.b64encode(key.export()).decode() not in out
    (mesh.data_dir / KEY_FILE_NAME).unlink()  # the sealing key is lost
    yield Ceremony(mesh, keys, shares, key)


def test_three_of_five_shares_recover_under_a_new_key_file(
    ceremony: Ceremony, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ceremony.mesh.target
    assert sorted(p.name for p in ceremony.shares.iterdir()) == [f"{n}.share" for n in OFFICERS]
    for path in ceremony.shares.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        document = json.loads(path.read_text())
        assert document["officer"] == path.stem and document["shares"] == 5
        assert document["share"]["threshold"] == 3
    assert stat.S_IMODE((ceremony.keys / "ada.key").stat().st_mode) == 0o600
    assert cli.main(["audit", "list", *target]) == 2
    assert "broker.sealing_key_missing" in capsys.readouterr().err

    new_dir = tmp_path / "new"
    new_dir.mkdir(mode=0o700)
    new_key = new_dir / "broker-sealing.key"
    assert ceremony.recover(("bo", "di", "ed"), "--new-key", str(new_key)) == 0
    out = capsys.readouterr().out
    assert f"data key {ceremony.data_key.key_id.hex()} recovered from 3 shares" in out
    assert ceremony.data_key.export().hex() not in out
    assert stat.S_IMODE(new_key.stat().st_mode) == 0o600

    # The broker serves every existing secret under the new sealing key...
    with broker(ceremony.mesh, sealing_key_file=str(new_key)):
        assert cli.main(["secret", "list", *target]) == 0
        assert capsys.readouterr().out.splitlines() == ["default/key/app", "default/key/db"]
    # ...and the store opens them, values intact.
    secrets = _store(ceremony.mesh, KeyFileSource(new_key, create=False))
    assert secrets == {"default/key/app": SECRET, "default/key/db": SECRET}

    # The new key file is only ever created: an existing path is refused, nothing changes.
    before = ceremony.keyring()
    assert ceremony.recover(("ada", "bo", "cy"), "--new-key", str(new_key)) == 2
    assert "recovery.file_exists" in capsys.readouterr().err
    assert ceremony.keyring() == before


def test_recovery_into_the_configured_source(
    ceremony: Ceremony, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --new-key: the keyring is re-wrapped under the configured source's key (here the
    environment; a new Kubernetes Secret or the SNP key of a new host alike)."""
    new = AeadKey.generate()
    monkeypatch.setenv(ENV_KEY, base64.b64encode(new.export()).decode())
    assert ceremony.recover(("ada", "cy", "ed"), "--sealing-source", "env") == 0
    assert "(env source)" in capsys.readouterr().out
    with broker(ceremony.mesh, sealing_source="env"):
        assert cli.main(["secret", "list", *ceremony.mesh.target]) == 0
        assert capsys.readouterr().out.split() == ["default/key/app", "default/key/db"]
    secrets = _store(ceremony.mesh, StaticKeySource(new.export()))
    assert set(secrets) == {"default/key/app", "default/key/db"}
    # A source without a key is refused before anything is touched.
    monkeypatch.delenv(ENV_KEY)
    before = ceremony.keyring()
    assert ceremony.recover(("ada", "cy", "ed"), "--sealing-source", "env") == 2
    assert "broker.sealing_key_missing" in capsys.readouterr().err
    assert ceremony.keyring() == before


def test_refusals_change_nothing(
    ceremony: Ceremony, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = ceremony.keyring()
    new_key = tmp_path / "never.key"
    target = ("--new-key", str(new_key))

    # Two shares of a 3-of-5 split.
    assert ceremony.recover(("ada", "bo"), *target) == 1
    err = capsys.readouterr().err
    assert "recovery.too_few_shares: 2 shares given; this split needs 3" in err

    # The same share twice does not count twice.
    assert ceremony.recover(("ada", "ada", "bo"), *target, keys=("ada", "bo")) == 1
    assert "recovery.duplicate_share" in capsys.readouterr().err

    # The wrong officer's key for a share.
    assert ceremony.recover(("ada", "bo", "cy"), *target, keys=("ada", "bo", "di")) == 1
    assert "recovery.wrong_officer_key" in capsys.readouterr().err

    # A key that claims to be the officer's (the fingerprint label edited) does not open it.
    forged = tmp_path / "forged.share"
    document = json.loads(Path(ceremony.share("cy")).read_text())
    document["officer_key"] = json.loads(Path(ceremony.share("di")).read_text())["officer_key"]
    forged.write_text(json.dumps(document))
    argv = ["recovery", "recover", ceremony.share("ada"), ceremony.share("bo"), str(forged)]
    keys = [x for n in ("ada", "bo", "di") for x in ("--officer-key", ceremony.key(n))]
    assert cli.main([*argv, *keys, *target, *ceremony.mesh.target]) == 1
    assert "broker.recovery_share_invalid" in capsys.readouterr().err

    assert ceremony.keyring() == before and not new_key.exists()


def _tamper(document: dict[str, Any], field: str) -> None:
    share = document["share"]
    if field == "x":
        share["x"] = 4
    elif field == "threshold":
        share["threshold"] = 2
    else:
        raw = bytearray(base64.b64decode(share[field]))
        raw[-1] ^= 1
        share[field] = base64.b64encode(bytes(raw)).decode()


def test_a_tampered_share_is_refused(
    ceremony: Ceremony, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Any changed byte fails the share's HPKE (its info binds key id, threshold and index),
    even a relabelling applied to every share alike, such as a lowered threshold."""
    before = ceremony.keyring()
    new_key = tmp_path / "never.key"
    keys = [x for n in ("ada", "bo", "cy") for x in ("--officer-key", ceremony.key(n))]
    cases = [
        ("ciphertext", ("cy",), "broker.recovery_share_invalid"),
        ("enc", ("cy",), "broker.recovery_share_invalid"),
        ("x", ("cy",), "broker.recovery_share_invalid"),
        ("key_id", ("ada", "bo", "cy"), "broker.recovery_share_invalid"),
        ("threshold", ("ada", "bo", "cy"), "broker.recovery_share_invalid"),
        ("threshold", ("cy",), "recovery.mixed_shares"),
        ("key_id", ("cy",), "recovery.mixed_shares"),
    ]
    for number, (field, tampered, reason) in enumerate(cases):
        paths = []
        for name in ("ada", "bo", "cy"):
            document = json.loads(Path(ceremony.share(name)).read_text())
            if name in tampered:
                _tamper(document, field)
            path = tmp_path / f"{number}-{name}.share"
            path.write_text(json.dumps(document))
            paths.append(str(path))
        argv = ["recovery", "recover", *paths, *keys, "--new-key", str(new_key)]
        assert cli.main([*argv, *ceremony.mesh.target]) == 1, (field, tampered)
        assert reason in capsys.readouterr().err, (field, tampered)
    assert ceremony.keyring() == before and not new_key.exists()


def test_shares_of_another_key_are_refused(
    ceremony: Ceremony, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another mesh's shares, for the same officers, open fine and combine to a key, but
    not this mesh's: refused before anything is written."""
    from services.broker.officers import (
        SHARE_FORMAT,
        ShareFile,
        encode_share,
        load_officers,
    )

    officers = load_officers(ceremony.keys)
    foreign = make_recovery_shares(AeadKey.generate(), [o.public_key for o in officers], 3)
    paths = []
    for officer, share in list(zip(officers, foreign, strict=True))[:3]:
        path = tmp_path / f"foreign-{officer.name}.share"
        path.write_bytes(
            encode_share(
                ShareFile(
                    format=SHARE_FORMAT,
                    officer=officer.name,
                    officer_key=officer.fingerprint,
                    shares=5,
                    share=share,
                )
            )
        )
        paths.append(str(path))
    before = ceremony.keyring()
    keys = [x for n in OFFICERS[:3] for x in ("--officer-key", ceremony.key(n))]
    new_key = tmp_path / "never.key"
    argv = ["recovery", "recover", *paths, *keys, "--new-key", str(new_key)]
    assert cli.main([*argv, *ceremony.mesh.target]) == 1
    err = capsys.readouterr().err
    assert "recovery.wrong_key" in err and ceremony.data_key.key_id.hex() in err
    assert ceremony.keyring() == before and not new_key.exists()


def test_init_refusals(mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "officers"
    for name in OFFICERS[:3]:
        assert cli.main(["recovery", "officer-key", name, "--out", str(keys)]) == 0
    init = ["recovery", "init", "--officers", str(keys), *mesh.target]

    # An empty bucket: init reads the keyring, it never creates one.
    assert cli.main([*init, "--shares", "3", "--threshold", "2"]) == 2
    assert "broker.keyring_missing" in capsys.readouterr().err

    async def keyring(bus: Bus) -> tuple[bytes, int] | None:
        return await NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER)).get(KEYRING_KEY)

    assert mesh.run(keyring) is None
    assert not list(keys.glob("*.share"))

    refusals = [
        (["--shares", "3", "--threshold", "1"], "recovery.bad_parameters"),
        (["--shares", "3", "--threshold", "4"], "recovery.bad_parameters"),
        (["--shares", "4", "--threshold", "2"], "recovery.officer_count"),
    ]
    for argv, reason in refusals:
        assert cli.main([*init, *argv]) == 2
        assert reason in capsys.readouterr().err
    assert cli.main(["recovery", "officer-key", "ada", "--out", str(keys)]) == 2
    assert "recovery.file_exists" in capsys.readouterr().err


def test_an_unreachable_nats_is_exit_2(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "officers"
    for name in OFFICERS[:2]:
        assert cli.main(["recovery", "officer-key", name, "--out", str(keys)]) == 0
    nowhere = ["--nats", f"nats://127.0.0.1:{free_port()}", "--timeout", "0.5"]
    init = ["recovery", "init", "--shares", "2", "--threshold", "2", "--officers", str(keys)]
    assert cli.main([*init, *nowhere, *mesh.target]) == 2
    assert "bus." in capsys.readouterr().err

    # recover: the shares check out offline, then the mesh cannot be reached.
    from services.broker.officers import SHARE_FORMAT, ShareFile, encode_share, load_officers

    found = load_officers(keys)
    shares = make_recovery_shares(AeadKey.generate(), [o.public_key for o in found], 2)
    argv, officer_keys = ["recovery", "recover"], []
    for officer, share in zip(found, shares, strict=True):
        path = tmp_path / f"{officer.name}.share"
        document = ShareFile(
            format=SHARE_FORMAT,
            officer=officer.name,
            officer_key=officer.fingerprint,
            shares=2,
            share=share,
        )
        path.write_bytes(encode_share(document))
        argv.append(str(path))
        officer_keys += ["--officer-key", str(keys / f"{officer.name}.key")]
    new_key = tmp_path / "never.key"
    extra = [*officer_keys, "--new-key", str(new_key), *nowhere, *mesh.target]
    assert cli.main([*argv, *extra]) == 2
    assert "bus." in capsys.readouterr().err
    assert not new_key.exists()
