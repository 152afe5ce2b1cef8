"""``attestmesh refvalues set`` and ``attestmesh policy set`` sign with the operator key."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from services import cli
from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.keys import SigningKey, TrustedKeys
from services.mesh.natskv import NatsKeyValue
from services.mesh.server import NatsServer
from services.policy import documents, refvalues
from services.policy.engine import default_policy
from services.policy.release_policy import POLICY_KEY

MEASUREMENT = "ab" * 48


async def _stored(url: str, bucket: str, key: str) -> bytes | None:
    bus = await Bus.connect(url, "test-read")
    try:
        entry = await NatsKeyValue(await bus.key_value(bucket)).get(key)
        return entry[0] if entry else None
    finally:
        await bus.close()


def test_the_cli_signs_what_it_writes(
    nats_server: NatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    operator = SigningKey.load_or_create("operator", keys)
    trusted = TrustedKeys.from_pem("operator", operator.public_pem())
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"nats_url": nats_server.url, "keys_dir": str(keys), "data_dir": str(tmp_path)})
    )
    values = tmp_path / "refs.json"
    values.write_text(json.dumps({"measurement": [MEASUREMENT.upper()]}))
    policy_file = tmp_path / "policy" / "release.rego"
    policy_file.parent.mkdir()
    policy_file.write_text(default_policy())

    assert cli.main(["refvalues", "set", "snp", str(values), "--config", str(config)]) == 0
    assert cli.main(["policy", "set", str(policy_file), "--config", str(config)]) == 0
    raw = asyncio.run(_stored(nats_server.url, subjects.BUCKET_REFVALUES, "snp"))
    assert raw is not None
    document = documents.open_signed(
        raw, trusted, bucket=subjects.BUCKET_REFVALUES, key="snp", kind="refvalues"
    )
    assert refvalues.validate(document.payload) == {"measurement": [MEASUREMENT]}
    raw = asyncio.run(_stored(nats_server.url, subjects.BUCKET_POLICIES, POLICY_KEY))
    assert raw is not None
    policy = documents.open_signed(
        raw, trusted, bucket=subjects.BUCKET_POLICIES, key=POLICY_KEY, kind="policy"
    )
    assert policy.payload.decode() == default_policy()
    capsys.readouterr()

    # A policy that does not compile never reaches KV; nor does anything without a key.
    broken = tmp_path / "broken.rego"
    broken.write_text("package attestmesh.release\nallow if {")
    assert cli.main(["policy", "set", str(broken), "--config", str(config)]) == 1
    assert "policy.compile_failed" in capsys.readouterr().err
    missing = ["--operator-key", str(tmp_path / "absent.key")]
    refs = ["refvalues", "set", "snp", str(values), "--config", str(config)]
    assert cli.main([*refs, *missing]) == 2
    assert "keys.missing" in capsys.readouterr().err
    again = asyncio.run(_stored(nats_server.url, subjects.BUCKET_POLICIES, POLICY_KEY))
    assert again == raw
