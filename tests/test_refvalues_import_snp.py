"""``attestmesh refvalues import-snp``: expected SEV-SNP launch measurements computed from an
OVMF image and launch options, checked against the ``sev-snp-measure`` command itself and
stored as operator-signed ``snp`` ``measurement`` values; bad inputs are one clear error."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services import cli
from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.keys import SigningKey, TrustedKeys
from services.mesh.natskv import NatsKeyValue
from services.mesh.server import NatsServer
from services.policy import documents, refvalues, snplaunch
from services.policy.refvalues import Entry
from services.testing.ovmf import build_ovmf

IMPORT = ["refvalues", "import-snp"]
KERNEL = ["--kernel", "{images}/vmlinuz"]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """An OVMF with SEV metadata and kernel hashes, one without, a kernel and an initrd."""
    directory = tmp_path / "images"
    directory.mkdir()
    (directory / "OVMF.fd").write_bytes(build_ovmf())
    (directory / "OVMF-nohashes.fd").write_bytes(build_ovmf(kernel_hashes=False, fill=0x41))
    (directory / "vmlinuz").write_bytes(b"MZ kernel " * 500)
    (directory / "initrd.img").write_bytes(b"\x1f\x8b initrd " * 300)
    return directory


def _measure_command() -> list[str]:
    """The package's own command, as installed beside this interpreter."""
    beside = Path(sys.executable).parent / "sev-snp-measure"
    found = str(beside) if beside.exists() else shutil.which("sev-snp-measure")
    return [found] if found else [sys.executable, "-m", "sevsnpmeasure.cli"]


def _their_digest(*options: str) -> str:
    done = subprocess.run(
        [*_measure_command(), "--mode", "snp", *options],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


CASES = [
    (["--vcpus", "1", "--vcpu-type", "EPYC-v4"], {}),
    (
        ["--vcpus", "4", "--vcpu-type", "EPYC-Genoa", "--guest-features", "0x21"],
        {"guest_features": 0x21},
    ),
    (
        ["--vcpus", "2", "--vcpu-type", "EPYC-Milan", "--kernel", "vmlinuz"],
        {"kernel": "vmlinuz", "initrd": "initrd.img", "append": "console=ttyS0 quiet"},
    ),
    (["--vcpus", "8", "--vcpu-type", "EPYC-Rome", "--vmm-type", "ec2"], {"vmm_type": "ec2"}),
]


@pytest.mark.parametrize(("options", "extra"), CASES)
def test_our_digest_is_the_one_sev_snp_measure_prints(
    images: Path, options: list[str], extra: dict[str, object]
) -> None:
    vcpus, vcpu_type = int(options[1]), options[3]
    kernel = extra.get("kernel")
    launch = snplaunch.Launch(
        ovmf=images / "OVMF.fd",
        vcpus=vcpus,
        vcpu_type=vcpu_type,
        vmm_type=str(extra.get("vmm_type", "QEMU")),
        kernel=None if kernel is None else images / str(kernel),
        initrd=images / str(extra["initrd"]) if "initrd" in extra else None,
        append=str(extra["append"]) if "append" in extra else None,
        guest_features=int(str(extra.get("guest_features", 1))),
    )
    theirs = [*options]
    if kernel is not None:
        theirs[theirs.index("vmlinuz")] = str(images / "vmlinuz")
        theirs += ["--initrd", str(images / "initrd.img"), "--append", "console=ttyS0 quiet"]
    ours = snplaunch.launch_digest(launch)
    assert len(ours) == 96 and ours == ours.lower()
    assert ours == _their_digest("--ovmf", str(images / "OVMF.fd"), *theirs)


def test_every_input_changes_the_digest(images: Path) -> None:
    base = snplaunch.Launch(ovmf=images / "OVMF.fd", vcpus=2, vcpu_type="EPYC-v4")
    (images / "OVMF-other.fd").write_bytes(build_ovmf(fill=0x91))
    variants = [
        base,
        snplaunch.Launch(ovmf=images / "OVMF-other.fd", vcpus=2, vcpu_type="EPYC-v4"),
        snplaunch.Launch(ovmf=base.ovmf, vcpus=3, vcpu_type="EPYC-v4"),
        snplaunch.Launch(ovmf=base.ovmf, vcpus=2, vcpu_type="EPYC-Milan"),
        snplaunch.Launch(ovmf=base.ovmf, vcpus=2, vcpu_type="EPYC-v4", guest_features=0),
        snplaunch.Launch(ovmf=base.ovmf, vcpus=2, vcpu_type="EPYC-v4", kernel=images / "vmlinuz"),
        snplaunch.Launch(
            ovmf=base.ovmf, vcpus=2, vcpu_type="EPYC-v4", kernel=images / "vmlinuz", append="x"
        ),
    ]
    digests = [snplaunch.launch_digest(v) for v in variants]
    assert len(set(digests)) == len(digests)


def _config(tmp_path: Path, url: str) -> tuple[Path, TrustedKeys]:
    keys = tmp_path / "keys"
    operator = SigningKey.load_or_create("operator", keys)
    operator.publish_to(keys / "trusted")
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"nats_url": url, "keys_dir": str(keys), "data_dir": str(tmp_path)})
    )
    return config, TrustedKeys.from_pem("operator", operator.public_pem())


async def _stored_values(url: str, trusted: TrustedKeys) -> list[refvalues.Value]:
    bus = await Bus.connect(url, "test-read")
    try:
        raw = await NatsKeyValue(await bus.key_value(subjects.BUCKET_REFVALUES)).get("snp")
    finally:
        await bus.close()
    assert raw is not None
    document = documents.open_signed(
        raw[0], trusted, bucket=subjects.BUCKET_REFVALUES, key="snp", kind="refvalues"
    )
    return refvalues.validate(document.payload)["measurement"]


def test_import_snp_signs_the_computed_measurements_into_the_snp_values(
    nats_server: NatsServer, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, trusted = _config(tmp_path, nats_server.url)
    target = ["--config", str(config)]
    direct = ["--ovmf", str(images / "OVMF.fd"), "--vcpus", "4", "--vcpu-type", "EPYC-v4"]
    when = "2999-01-01T00:00:00Z"
    assert cli.main([*IMPORT, *direct, "--note", "image 7", "--expires", when, *target]) == 0
    out = capsys.readouterr().out
    expected = _their_digest(*direct)
    assert f"snp measurement {expected} (4 x EPYC-v4, QEMU, OVMF.fd)" in out
    assert "snp: 1 measurement value(s) added (version " in out
    (stored,) = asyncio.run(_stored_values(nats_server.url, trusted))
    assert isinstance(stored, Entry) and stored.value == expected
    assert stored.note == "image 7" and stored.expires is not None
    assert stored.expires.year == 2999

    launches = tmp_path / "launches" / "launches.json"
    launches.parent.mkdir()
    shutil.copy(images / "OVMF.fd", launches.parent / "OVMF.fd")
    shutil.copy(images / "vmlinuz", launches.parent / "vmlinuz")
    entries = [
        {"ovmf": "OVMF.fd", "vcpus": 4, "vcpu_type": "EPYC-v4"},  # the one stored: replaced
        {
            "ovmf": "OVMF.fd",
            "vcpus": 16,
            "vcpu_type": "EPYC-Genoa",
            "kernel": "vmlinuz",
            "append": "console=ttyS0",
            "note": "genoa direct boot",
        },
    ]
    launches.write_text(json.dumps({"launches": entries}))
    assert cli.main([*IMPORT, str(launches), "--note", "from file", *target]) == 0
    genoa = _their_digest(
        "--ovmf",
        str(images / "OVMF.fd"),
        "--vcpus",
        "16",
        "--vcpu-type",
        "EPYC-Genoa",
        "--kernel",
        str(images / "vmlinuz"),
        "--append",
        "console=ttyS0",
    )
    values = asyncio.run(_stored_values(nats_server.url, trusted))
    assert {(refvalues.value_of(v), v.note) for v in values if isinstance(v, Entry)} == {
        (expected, "from file"),
        (genoa, "genoa direct boot"),
    }
    assert len(values) == 2


BAD = [
    (["--ovmf", "{images}/absent.fd", "--vcpus", "1", "--vcpu-type", "EPYC"], "snp_file_missing"),
    (["--ovmf", "{images}/junk.fd", "--vcpus", "1", "--vcpu-type", "EPYC"], "snp_not_ovmf"),
    (["--ovmf", "{images}/short.fd", "--vcpus", "1", "--vcpu-type", "EPYC"], "snp_not_ovmf"),
    (["--ovmf", "{images}/tiny.fd", "--vcpus", "1", "--vcpu-type", "EPYC"], "snp_not_ovmf"),
    (["--ovmf", "{images}/OVMF.fd", "--vcpus", "1", "--vcpu-type", "EPYC-v9"], "snp_bad_vcpu_type"),
    (["--ovmf", "{images}/OVMF.fd", "--vcpus", "0", "--vcpu-type", "EPYC"], "snp_bad_vcpus"),
    (
        ["--ovmf", "{images}/OVMF.fd", "--vcpus", "1", "--vcpu-type", "EPYC", "--vmm-type", "kvm"],
        "snp_bad_vmm_type",
    ),
    (
        ["--ovmf", "{images}/OVMF.fd", "--vcpus", "1", "--vcpu-type", "EPYC", "--append", "x"],
        "snp_needs_kernel",
    ),
    (
        ["--ovmf", "{images}/OVMF-nohashes.fd", "--vcpus", "1", "--vcpu-type", "EPYC", *KERNEL],
        "snp_no_kernel_hashes",
    ),
    (["--ovmf", "{images}/OVMF.fd", "--vcpus", "1"], "cli.usage"),
    (["--ovmf", "{images}/OVMF.fd", "--vcpus", "1", "--vcpu-type", "EPYC", "x.json"], "cli.usage"),
    ([], "cli.usage"),
    (["{images}/absent.json"], "cli.unreadable"),
    (["{images}/junk.fd"], "snp_bad_file"),
    (["{images}/unknown.json"], "snp_bad_file"),
    (["{images}/deep.json"], "snp_bad_file"),
    (["{images}/none.json"], "snp_bad_file"),
]


def test_bad_inputs_are_one_clear_error_and_store_nothing(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (images / "junk.fd").write_bytes(b"\x00\x01" * 4096)
    (images / "short.fd").write_bytes(build_ovmf()[:-100])
    (images / "tiny.fd").write_bytes(b"\x90" * 4096)
    (images / "unknown.json").write_text(
        json.dumps({"launches": [{"ovmf": "OVMF.fd", "vcpus": 1, "vcpu_type": "EPYC", "x": 1}]})
    )
    (images / "deep.json").write_text("[" * 200 + "]" * 200)
    (images / "none.json").write_text(json.dumps({"launches": []}))
    # Nothing listens there: every refusal must come before connecting.
    config, _ = _config(tmp_path, "nats://127.0.0.1:1")
    for argv, reason in BAD:
        filled = [a.replace("{images}", str(images)) for a in argv]
        assert cli.main([*IMPORT, *filled, "--config", str(config)]) == 2, argv
        err = capsys.readouterr().err
        assert f"attestmesh: {reason if '.' in reason else 'refvalues.' + reason}:" in err, err
        assert "Traceback" not in err and len(err.splitlines()) == 1, err


def test_a_non_ovmf_file_from_the_real_command_line_is_no_traceback(
    images: Path, tmp_path: Path
) -> None:
    (images / "junk.fd").write_bytes(bytes(range(256)) * 32)
    config, _ = _config(tmp_path, "nats://127.0.0.1:1")
    launch = ["--ovmf", str(images / "junk.fd"), "--vcpus", "2", "--vcpu-type", "EPYC-v4"]
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", *IMPORT, *launch, "--config", str(config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("attestmesh: refvalues.snp_not_ovmf:")
    assert "Traceback" not in done.stderr and done.stdout == ""
