"""The sealing key from the environment and from a mounted Kubernetes Secret: what each
accepts, everything each refuses (never echoing a key), and how configuration picks one."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
from pathlib import Path

import msgspec
import pytest

from services import admincli, app, cli, sealingopts
from services.broker.k8ssecret import KubernetesSecretSource
from services.broker.keysources import ENV_KEY, EnvKeySource, from_config, new_key_file
from services.broker.sealing import KEY_FILE_NAME, AeadKey, KeyFileSource, StaticKeySource
from services.broker.snpkey import SnpDerivedKeySource
from services.broker.store import INDEX_KEY, data_key_id, open_keyring
from services.mesh import config as config_mod
from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.config import Config
from services.mesh.errors import ConfigError, SealingError
from services.mesh.natskv import NatsKeyValue
from services.mesh.server import NatsServer

RAW = bytes(range(100, 132))
ENCODED = base64.b64encode(RAW).decode()
TIMESTAMP = "..2026_03_01_12_00_00.123456789"


def refused(source: object, reason: str) -> SealingError:
    with pytest.raises(SealingError) as caught:
        source.sealing_key()  # type: ignore[attr-defined]
    assert caught.value.reason == reason, caught.value
    return caught.value


# --- environment -----------------------------------------------------------------------


def test_env_key_is_base64_of_32_bytes() -> None:
    key = EnvKeySource({ENV_KEY: ENCODED}).sealing_key()
    assert key.key_id == AeadKey(RAW).key_id
    # A Secret made from a file often carries a trailing newline; that alone is tolerated.
    assert EnvKeySource({ENV_KEY: f" {ENCODED}\n"}).sealing_key().key_id == key.key_id


@pytest.mark.parametrize(
    "value",
    [
        base64.b64encode(RAW[:31]).decode(),  # 31 bytes
        base64.b64encode(RAW + b"!").decode(),  # 33 bytes
        ENCODED.rstrip("="),  # unpadded
        base64.urlsafe_b64encode(bytes([0xFB] * 32)).decode(),  # the URL-safe alphabet
        ENCODED[:-2] + "B=",  # non-canonical: padding bits set
        RAW.hex(),  # hex, not base64
        ENCODED[:20] + "*" + ENCODED[21:],
        ENCODED[:20] + "é" + ENCODED[21:],
        ENCODED + "\n" * 300,  # oversized
        "AAAA" * 11,  # 33 zero bytes
    ],
)
def test_env_key_anything_else_is_refused_without_echoing_it(value: str) -> None:
    error = refused(EnvKeySource({ENV_KEY: value}), "broker.sealing_key_invalid")
    assert ENV_KEY in error.detail
    assert value.strip() not in str(error) and RAW.hex() not in str(error)
    assert repr(EnvKeySource({ENV_KEY: value})) == f"EnvKeySource({ENV_KEY!r})"


def test_env_key_missing_says_which_variable() -> None:
    for environ in ({}, {ENV_KEY: ""}):
        error = refused(EnvKeySource(environ), "broker.sealing_key_missing")
        assert ENV_KEY in error.detail


def test_the_key_variable_never_becomes_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_KEY, ENCODED)
    config = config_mod.load(None)
    assert ENCODED not in json.dumps(msgspec.to_builtins(config))
    assert ENV_KEY not in config_mod.ENVIRONMENT


# --- Kubernetes Secret -----------------------------------------------------------------


def project(mount: Path, data: bytes = RAW, *, mode: int = 0o440) -> Path:
    """A Secret volume as kubelet's atomic writer lays it out; returns the real key file."""
    mount.mkdir(mode=0o755, exist_ok=True)
    stamped = mount / TIMESTAMP
    stamped.mkdir(mode=0o755)
    real = stamped / KEY_FILE_NAME
    real.write_bytes(data)
    real.chmod(mode)
    (mount / "..data").symlink_to(TIMESTAMP)
    (mount / KEY_FILE_NAME).symlink_to(f"..data/{KEY_FILE_NAME}")
    return real


@pytest.mark.parametrize("mode", [0o400, 0o440, 0o444, 0o644, 0o600])
def test_secret_in_kubelets_layout_is_accepted(tmp_path: Path, mode: int) -> None:
    project(tmp_path / "sealing", mode=mode)
    key = KubernetesSecretSource(tmp_path / "sealing").sealing_key()
    assert key.key_id == AeadKey(RAW).key_id


def test_secret_update_by_link_swap_is_followed(tmp_path: Path) -> None:
    mount = tmp_path / "sealing"
    project(mount)
    newer = mount / "..2026_04_01_00_00_00.000000001"
    newer.mkdir(mode=0o755)
    (newer / KEY_FILE_NAME).write_bytes(RAW[::-1])
    (mount / "..data_tmp").symlink_to(newer.name)
    os.replace(mount / "..data_tmp", mount / "..data")
    assert KubernetesSecretSource(mount).sealing_key().key_id == AeadKey(RAW[::-1]).key_id


@pytest.mark.skipif(os.geteuid() != 0, reason="root-owned files need root")
def test_secret_files_owned_by_root_with_an_fsgroup_are_accepted(tmp_path: Path) -> None:
    real = project(tmp_path / "sealing")
    os.chown(real, 0, 10001)
    assert KubernetesSecretSource(tmp_path / "sealing").sealing_key().key_id


@pytest.mark.parametrize("mode", [0o460, 0o442, 0o640 | 0o020, 0o666])
def test_secret_writable_by_group_or_other_is_refused(tmp_path: Path, mode: int) -> None:
    project(tmp_path / "sealing", mode=mode)
    refused(KubernetesSecretSource(tmp_path / "sealing"), "broker.sealing_key_insecure")


def test_secret_link_out_of_the_mount_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / KEY_FILE_NAME).write_bytes(RAW)
    for target in (str(outside / KEY_FILE_NAME), f"../outside/{KEY_FILE_NAME}"):
        mount = tmp_path / f"m{len(target)}"
        mount.mkdir()
        (mount / KEY_FILE_NAME).symlink_to(target)
        error = refused(KubernetesSecretSource(mount), "broker.sealing_key_insecure")
        assert "outside" in error.detail or "leads out" in error.detail


def test_secret_data_link_out_of_the_mount_is_refused(tmp_path: Path) -> None:
    """The visible link stays inside, but ``..data`` points at a directory elsewhere."""
    mount = tmp_path / "sealing"
    real = project(mount)
    (mount / "..data").unlink()
    (mount / "..data").symlink_to(str(real.parent))  # absolute, though it is the same place
    refused(KubernetesSecretSource(mount), "broker.sealing_key_insecure")
    (mount / "..data").unlink()
    (mount / "..data").symlink_to(f"../sealing/{TIMESTAMP}")
    refused(KubernetesSecretSource(mount), "broker.sealing_key_insecure")


def test_secret_link_loop_is_refused(tmp_path: Path) -> None:
    mount = tmp_path / "sealing"
    mount.mkdir()
    (mount / KEY_FILE_NAME).symlink_to("a")
    (mount / "a").symlink_to("b")
    (mount / "b").symlink_to(KEY_FILE_NAME)
    refused(KubernetesSecretSource(mount), "broker.sealing_key_insecure")


def test_secret_mount_writable_by_others_needs_sticky_or_read_only(tmp_path: Path) -> None:
    mount = tmp_path / "sealing"
    project(mount)
    mount.chmod(0o777)
    refused(KubernetesSecretSource(mount), "broker.sealing_key_insecure")
    mount.chmod(0o1777)  # kubelet's tmpfs: nobody may replace another's entries
    assert KubernetesSecretSource(mount).sealing_key().key_id == AeadKey(RAW).key_id
    (mount / TIMESTAMP).chmod(0o777)  # the directory holding the key never may be
    refused(KubernetesSecretSource(mount), "broker.sealing_key_insecure")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_secret_entries_owned_by_another_user_are_refused(tmp_path: Path) -> None:
    mount = tmp_path / "sealing"
    real = project(mount)
    for path in (real, mount / "..data", mount / TIMESTAMP):
        os.lchown(path, 65534, -1)
        refused(KubernetesSecretSource(mount), "broker.sealing_key_insecure")
        os.lchown(path, 0, -1)
    assert KubernetesSecretSource(mount).sealing_key()


def test_secret_mount_given_as_a_symlink_is_refused(tmp_path: Path) -> None:
    project(tmp_path / "sealing")
    (tmp_path / "alias").symlink_to(tmp_path / "sealing")
    refused(KubernetesSecretSource(tmp_path / "alias"), "broker.sealing_key_insecure")


@pytest.mark.parametrize("size", [0, 31, 33, 64, 5000])
def test_secret_of_the_wrong_size_is_refused(tmp_path: Path, size: int) -> None:
    project(tmp_path / "sealing", b"k" * size)
    error = refused(KubernetesSecretSource(tmp_path / "sealing"), "broker.sealing_key_invalid")
    assert f"{size} bytes" in error.detail


def test_base64_text_in_a_secret_is_refused_with_a_hint(tmp_path: Path) -> None:
    project(tmp_path / "sealing", (ENCODED + "\n").encode())
    error = refused(KubernetesSecretSource(tmp_path / "sealing"), "broker.sealing_key_invalid")
    assert "stringData" in error.detail
    assert ENCODED not in str(error)


def test_secret_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    mount = tmp_path / "sealing"
    mount.mkdir()
    os.mkfifo(mount / KEY_FILE_NAME, 0o400)
    refused(KubernetesSecretSource(mount), "broker.sealing_key_insecure")
    (mount / KEY_FILE_NAME).unlink()
    (mount / KEY_FILE_NAME).mkdir()
    refused(KubernetesSecretSource(mount), "broker.sealing_key_insecure")


def test_missing_secret_says_where_it_looked(tmp_path: Path) -> None:
    for mount in (tmp_path / "absent", tmp_path):
        error = refused(KubernetesSecretSource(mount), "broker.sealing_key_missing")
        assert str(mount / KEY_FILE_NAME) in error.detail
    mount = tmp_path / "dangling"
    mount.mkdir()
    (mount / KEY_FILE_NAME).symlink_to("..data/" + KEY_FILE_NAME)
    refused(KubernetesSecretSource(mount), "broker.sealing_key_missing")
    assert not (tmp_path / "absent").exists()


# --- choosing a source -----------------------------------------------------------------


def test_configuration_picks_the_source(tmp_path: Path) -> None:
    file_source = from_config(Config(data_dir=str(tmp_path)), {})
    assert isinstance(file_source, KeyFileSource)
    assert file_source.path == tmp_path / KEY_FILE_NAME and not file_source.create
    named = from_config(Config(sealing_key_file=str(tmp_path / "k")), {})
    assert isinstance(named, KeyFileSource) and named.path == tmp_path / "k"
    env = from_config(Config(sealing_source="env"), {ENV_KEY: ENCODED})
    assert env.sealing_key().key_id == AeadKey(RAW).key_id
    secret = from_config(Config(sealing_source="k8s-secret", sealing_secret_dir="/m"), {})
    assert isinstance(secret, KubernetesSecretSource) and secret.mount == Path("/m")
    snp = from_config(Config(sealing_source="snp"), {})
    assert isinstance(snp, SnpDerivedKeySource) and snp.device == Path("/dev/sev-guest")
    with pytest.raises(SealingError) as caught:
        from_config(Config(sealing_source="k8s-secret"), {})
    assert caught.value.reason == "broker.sealing_key_missing"
    with pytest.raises(ConfigError):
        config_mod.load(None, sealing_source="vault")


def test_sealing_settings_follow_the_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Command line > ATTESTMESH_SEALING_* > config file > defaults."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"sealing_source": "k8s-secret", "sealing_secret_dir": "/file"}))
    for name in ("SOURCE", "KEY_FILE", "SECRET_DIR"):
        monkeypatch.delenv(f"ATTESTMESH_SEALING_{name}", raising=False)
    assert config_mod.load(None).sealing_source == "file"
    assert config_mod.load(path).sealing_secret_dir == "/file"
    monkeypatch.setenv("ATTESTMESH_SEALING_SECRET_DIR", "/env")
    monkeypatch.setenv("ATTESTMESH_SEALING_SOURCE", "env")
    assert config_mod.load(path).sealing_secret_dir == "/env"
    init = ["recovery", "init", "--shares", "2", "--threshold", "2", "--officers", "o"]
    args = cli._parser().parse_args(
        [*init, "--config", str(path), "--sealing-source", "k8s-secret"]
    )
    config = admincli.admin_config(args)
    assert (config.sealing_source, config.sealing_secret_dir) == ("k8s-secret", "/env")
    args = cli._parser().parse_args(
        ["broker", "--config", str(path), "--sealing-source", "file", "--sealing-key-file", "/k"]
    )
    assert sealingopts.overrides(args)["sealing_key_file"] == "/k"
    assert cli._config(args).sealing_key_file == "/k"


def test_snp_settings_come_from_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    settings = {"fields": ["measurement", "policy", "guest_svn"], "vmpl": 2, "guest_svn": 3}
    path.write_text(json.dumps({"sealing_source": "snp", "sealing_snp": settings}))
    source = from_config(config_mod.load(path), {})
    assert isinstance(source, SnpDerivedKeySource)
    assert (source.request.vmpl, source.request.guest_svn) == (2, 3)
    for bad in ({"vmpl": 4}, {"fields": ["measurement", "colour"]}, {"root_key": "vlek"}):
        path.write_text(json.dumps({"sealing_snp": bad}))
        with pytest.raises(ConfigError):
            config_mod.load(path)


def test_a_new_key_file_is_created_once_and_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "new.key"
    key = new_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert KeyFileSource(path, create=False).sealing_key().key_id == key.key_id
    with pytest.raises(SealingError) as caught:
        new_key_file(path)
    assert caught.value.reason == "broker.sealing_key_exists"
    assert KeyFileSource(path, create=False).sealing_key().key_id == key.key_id
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(SealingError) as caught:
        new_key_file(shared / "new.key")
    assert caught.value.reason == "broker.sealing_key_insecure"
    assert not (shared / "new.key").exists()


# --- the broker service ----------------------------------------------------------------


async def test_the_broker_service_takes_its_key_from_the_configured_source(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    config = Config(nats_url=nats_server.url, data_dir=str(tmp_path), sealing_source="env")
    with pytest.raises(SealingError) as caught:
        await app.broker(config, asyncio.Event(), environ={})
    assert caught.value.reason == "broker.sealing_key_missing"
    assert ENV_KEY in caught.value.detail

    stop = asyncio.Event()
    running = asyncio.create_task(app.broker(config, stop, environ={ENV_KEY: ENCODED}))
    bus = await Bus.connect(nats_server.url, "test")
    try:
        kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
        for _ in range(200):
            if await kv.get(INDEX_KEY) is not None or running.done():
                break
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(running, 15)
        data_key = await open_keyring(kv, StaticKeySource(RAW))
        assert await data_key_id(kv) == data_key.key_id
    finally:
        await bus.close()
