"""Operator commands that need no server: ``policy check``, reference-value formats and
expiry, configuration precedence, and sealing keys that are never invented."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services import admincli, cli
from services.broker.sealing import KEY_FILE_NAME, KeyFileSource
from services.mesh import config as config_mod
from services.mesh import subjects
from services.mesh.errors import PolicyError, SealingError
from services.mesh.keys import SigningKey, TrustedKeys
from services.policy import claimformats, engine, refvalues, release_policy
from services.policy.engine import default_policy
from services.policy.loader import Loader
from services.policy.refvalues import Entry
from services.testing.memkv import MemoryKeyValue

MEASUREMENT = "ab" * 48

PASSING = """package attestmesh.release_test

import rego.v1

test_packaged_policy_denies_by_default if {
	not data.attestmesh.release.allow
}

test_arithmetic if {
	1 + 1 == 2
}
"""


def _policy_dir(tmp_path: Path, tests: str | None = PASSING) -> Path:
    directory = tmp_path / "policy"
    directory.mkdir()
    (directory / "release.rego").write_text(default_policy())
    if tests is not None:
        (directory / "release_test.rego").write_text(tests)
    return directory / "release.rego"


def test_policy_check_passes_and_counts_tests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["policy", "check", str(_policy_dir(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "[PASS] release_test.rego test_packaged_policy_denies_by_default" in out
    assert "2/2 tests passed" in out


def test_policy_check_fails_on_a_false_test(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    failing = PASSING + "\ntest_wrong if {\n\t1 == 2\n}\n"
    assert cli.main(["policy", "check", str(_policy_dir(tmp_path, failing))]) == 1
    captured = capsys.readouterr()
    assert "[FAIL] release_test.rego test_wrong" in captured.out
    assert "2/3 tests passed" in captured.out
    assert "policy.tests_failed" in captured.err


def test_policy_check_prints_the_compilers_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.rego"
    path.write_text("package attestmesh.release\nallow if {\n")
    assert cli.main(["policy", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "policy.compile_failed: broken.rego:2:" in err
    assert "unclosed" in err


def test_a_test_that_crashes_the_interpreter_fails_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """regopy dies on some ``with`` uses; that must be a failed test, not a crashed
    command, and must not take the other tests with it."""
    crashing = PASSING + (
        "\ntest_with if {\n\tnot data.attestmesh.release.allow with input as {}\n}\n"
    )
    assert cli.main(["policy", "check", str(_policy_dir(tmp_path, crashing))]) == 1
    out = capsys.readouterr().out
    assert "[CRASHED] release_test.rego test_with" in out
    assert "[PASS] release_test.rego test_arithmetic" in out


def test_policy_check_of_a_missing_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["policy", "check", str(tmp_path / "absent.rego")]) == 2
    assert "cli.unreadable" in capsys.readouterr().err


def test_resource_policy_check_runs_its_own_tests_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The packaged policies and their tests share a directory: each check runs its own."""
    packaged = Path(engine.__file__).parent / "policies"
    for name in ("release.rego", "resources.rego", "resources_test.rego"):
        (tmp_path / name).write_text((packaged / name).read_text())
    (tmp_path / "release_test.rego").write_text(PASSING)
    assert cli.main(["policy", "check", "--resource", str(tmp_path / "resources.rego")]) == 0
    out = capsys.readouterr().out
    assert "[PASS] resources_test.rego test_another_nodes" in out
    assert "release_test.rego" not in out and "5/5 tests passed" in out
    assert cli.main(["policy", "check", str(tmp_path / "release.rego")]) == 0
    out = capsys.readouterr().out
    assert "resources_test.rego" not in out and "2/2 tests passed" in out
    # Each kind compiles only as itself.
    assert cli.main(["policy", "check", "--resource", str(tmp_path / "release.rego")]) == 1
    assert "resource_policy.compile_failed" in capsys.readouterr().err
    assert cli.main(["policy", "check", str(tmp_path / "resources.rego")]) == 1
    assert "policy.compile_failed" in capsys.readouterr().err


def test_claim_formats() -> None:
    assert claimformats.normalise("snp", "measurement", MEASUREMENT.upper()) == MEASUREMENT
    assert claimformats.normalise("snp", "guest_svn", "3") == 3
    assert claimformats.normalise("nitro", "pcr0", "cd" * 48) == "cd" * 48
    assert claimformats.normalise("tpm", "pcr7", "ef" * 32) == "ef" * 32
    for family, claim, value in [
        ("snp", "measurement", "ab" * 32),  # 32 bytes: a SHA-256, not a launch digest
        ("snp", "measurement", "0x" + "ab" * 47),
        ("snp", "measurement", "zz" * 48),
        ("tdx", "mrtd", "ab" * 47 + "a"),
        ("snp", "guest_svn", "three"),
        ("sgx", "mrenclave", "ab" * 48),
        ("snp", "bad claim", "x"),
        ("cca", "platform_profile", "\x00"),
    ]:
        with pytest.raises(PolicyError) as caught:
            claimformats.normalise(family, claim, value)
        assert caught.value.reason in {"refvalues.bad_value", "refvalues.bad_claim"}


def test_expired_values_stop_counting_and_never_open_the_claim() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    values: refvalues.RefValues = {
        "measurement": [
            "11" * 48,
            Entry(value="22" * 48, expires=now + timedelta(hours=1), note="old image"),
        ],
        "host_data": [Entry(value="33" * 32, expires=now - timedelta(seconds=1))],
    }
    assert refvalues.effective(values, now) == {
        "measurement": ["11" * 48, "22" * 48],
        "host_data": [refvalues.ALL_EXPIRED],
    }
    later = now + timedelta(hours=2)
    assert refvalues.effective(values, later)["measurement"] == ["11" * 48]
    assert refvalues.next_expiry(values, now) == now + timedelta(hours=1)
    assert refvalues.next_expiry(values, later) is None
    raw = refvalues.encode(values)
    assert refvalues.validate(raw) == values
    naive = b'{"measurement": [{"value": "ab", "expires": "2026-01-01T00:00:00"}]}'
    with pytest.raises(PolicyError, match="time zone"):
        refvalues.validate(naive)


def test_the_policy_service_drops_an_expired_value_by_itself(tmp_path: Path) -> None:
    """No KV change, no re-signing: the clock passing the expiry denies the old image."""
    operator = SigningKey.load_or_create("operator", tmp_path)
    trusted = TrustedKeys.from_pem("operator", operator.public_pem())
    start = datetime(2026, 1, 1, tzinfo=UTC)
    clock = [start]
    policies, refs = MemoryKeyValue(), MemoryKeyValue()
    old, new = "22" * 48, "11" * 48
    values: refvalues.RefValues = {
        "measurement": [new, Entry(value=old, expires=start + timedelta(minutes=5))]
    }

    async def scenario() -> list[bool]:
        await release_policy.store(policies, default_policy(), operator=operator)
        await refvalues.store(refs, "snp", values, operator=operator)
        loader = Loader(
            policies,
            refs,
            trusted,
            settings={"allow_simulated": True},
            clock=lambda: clock[0],
        )
        await loader.reload()
        seen = []
        for step in (timedelta(0), timedelta(minutes=6)):
            clock[0] = start + step
            loader.refresh()
            assert loader.engine is not None
            for measurement in (old, new):
                document = {
                    "family": "snp",
                    "status": "affirming",
                    "verified": True,
                    "claims": {"measurement": measurement},
                    "simulated": False,
                }
                seen.append(loader.engine.evaluate(document).allow)
        return seen

    assert asyncio.run(scenario()) == [True, True, False, True]
    assert subjects.BUCKET_REFVALUES == "refvalues"


def test_configuration_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Command line > environment > config file > defaults."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"nats_url": "nats://file:4222", "data_dir": str(tmp_path)}))
    monkeypatch.delenv("ATTESTMESH_NATS_URL", raising=False)
    monkeypatch.delenv("ATTESTMESH_DATA_DIR", raising=False)
    assert config_mod.load(None).nats_url == config_mod.DEFAULT_NATS_URL
    assert config_mod.load(path).nats_url == "nats://file:4222"
    monkeypatch.setenv("ATTESTMESH_NATS_URL", "nats://env:4222")
    assert config_mod.load(path).nats_url == "nats://env:4222"
    assert admincli.resolve(path, None, None).nats_url == "nats://env:4222"
    assert admincli.resolve(path, None, "nats://flag:4222").nats_url == "nats://flag:4222"
    assert admincli.resolve(None, tmp_path, "nats://flag:4222").data_dir == str(tmp_path)
    monkeypatch.setenv("ATTESTMESH_DATA_DIR", str(tmp_path / "elsewhere"))
    assert admincli.resolve(None, tmp_path, None).data_dir == str(tmp_path)


def test_a_missing_sealing_key_is_an_error_that_says_where(tmp_path: Path) -> None:
    source = KeyFileSource.in_data_dir(tmp_path / "broker", create=False)
    with pytest.raises(SealingError) as caught:
        source.sealing_key()
    assert caught.value.reason == "broker.sealing_key_missing"
    assert str(tmp_path / "broker" / KEY_FILE_NAME) in caught.value.detail
    assert not (tmp_path / "broker").exists()
    created = KeyFileSource.in_data_dir(tmp_path / "up", create=True).sealing_key()
    again = KeyFileSource.in_data_dir(tmp_path / "up", create=False).sealing_key()
    assert again.key_id == created.key_id


def test_a_change_never_re_signs_an_older_document_put_back(tmp_path: Path) -> None:
    """v1 allows VULN; the operator withdraws it (v2); a bucket writer puts v1 back. The
    operator's next ``refvalues add`` must refuse, not sign v1's values (VULN) anew."""
    from services.mesh.errors import PolicyError
    from services.mesh.keys import SigningKey, TrustedKeys
    from services.policy import refvalues
    from services.testing.memkv import MemoryKeyValue

    vuln, good, new = "aa" * 48, "bb" * 48, "cc" * 48
    operator = SigningKey.load_or_create("operator", tmp_path)
    trusted = TrustedKeys.from_pem("operator", operator.public_pem())
    kv = MemoryKeyValue()

    def add(current: refvalues.RefValues) -> refvalues.RefValues:
        return {**current, "measurement": [*current["measurement"], new]}

    async def scenario() -> None:
        await refvalues.store(kv, "snp", {"measurement": [vuln, good]}, operator=operator)
        v1 = await kv.get("snp")
        assert v1 is not None
        await refvalues.store(kv, "snp", {"measurement": [good]}, operator=operator)
        v2 = await kv.get("snp")
        assert v2 is not None
        await kv.update("snp", v1[0], v2[1])  # the older signed document, put back
        history = [v1[0], v2[0], v1[0]]
        with pytest.raises(PolicyError) as refused:
            await refvalues.modify(
                kv, "snp", add, operator=operator, trusted=trusted, history=history
            )
        assert refused.value.reason == "refvalues.rollback"
        # Without the put-back, the same change goes through.
        await kv.update("snp", v2[0], (await kv.get("snp") or (b"", 0))[1])
        _, values = await refvalues.modify(
            kv, "snp", add, operator=operator, trusted=trusted, history=[v1[0], v2[0]]
        )
        assert vuln not in values["measurement"] and new in values["measurement"]

    asyncio.run(scenario())
