"""configfs-tsm source against a fake kernel: evidence that verifies, and every refusal."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.collector.simulator.snp import SnpSimulator
from services.collector.sources.configfs_tsm import MAX_OUTBLOB, ConfigfsTsmSource, read_provider
from services.collector.sources.pseudofs import parse_count, parse_name
from services.mesh import events
from services.mesh.errors import AttestmeshError, ConfigError, ParseError, VerificationError
from services.testing.amd_pki import AmdTestPki
from services.testing.fakes import (
    Backend,
    FakeConfigfsTsm,
    dcap_collateral,
    snp_backend,
    tdx_backend,
)
from services.testing.intel_pki import IntelTestPki
from services.verifier.families.base import Status, VerifyOptions
from services.verifier.families.snp import SnpVerifier, parse_report
from services.verifier.families.tdx import TdxVerifier
from services.verifier.trust import TrustStore

NOW = datetime(2025, 3, 1, tzinfo=UTC)
REPORT_DATA = hashlib.sha512(b"nonce || ephemeral public key").digest()


@pytest.fixture(scope="module")
def amd(tmp_path_factory: pytest.TempPathFactory) -> tuple[SnpSimulator, TrustStore]:
    pki = AmdTestPki(now=NOW)
    store = TrustStore.load(None, test_dir=pki.write_trust_dir(tmp_path_factory.mktemp("roots")))
    return SnpSimulator(pki), store


@pytest.fixture(scope="module")
def sim(amd: tuple[SnpSimulator, TrustStore]) -> SnpSimulator:
    return amd[0]


def fake_snp(tmp_path: Path, sim: SnpSimulator, **options: Any) -> FakeConfigfsTsm:
    return FakeConfigfsTsm(tmp_path / "tsm/report", "sev_guest", snp_backend(sim), **options)


def source(fake: FakeConfigfsTsm, **options: Any) -> ConfigfsTsmSource:
    return ConfigfsTsmSource(fake.root, files=fake, **options)


def test_snp_report_with_certificates_verifies(
    tmp_path: Path, amd: tuple[SnpSimulator, TrustStore]
) -> None:
    sim, store = amd
    fake = fake_snp(tmp_path, sim)
    tsm = source(fake)
    assert tsm.family == "snp" and not tsm.simulated
    evidence = tsm.collect(REPORT_DATA)
    assert isinstance(evidence, events.SnpEvidence)
    assert evidence.certificates == sim.cert_table()
    options = VerifyOptions(now=NOW, trust=store, expected_report_data=REPORT_DATA)
    appraisal = SnpVerifier().appraise(events.evidence_bytes(evidence), options)
    assert appraisal.status == Status.AFFIRMING and appraisal.verified, appraisal.reasons
    assert len(fake.removed) == 2 and not fake.live and not fake.paths


def test_tdx_quote_verifies(tmp_path: Path) -> None:
    pki = IntelTestPki(now=NOW)
    platform = pki.platform()
    fake = FakeConfigfsTsm(tmp_path / "report", "tdx_guest", tdx_backend(platform))
    tsm = source(fake)
    assert tsm.family == "tdx"
    evidence = tsm.collect(REPORT_DATA)
    assert isinstance(evidence, events.TdxEvidence)
    options = VerifyOptions(
        now=NOW,
        trust=TrustStore.load(None, test_dir=pki.write_trust_dir(tmp_path / "roots").parents[1]),
        collateral=dcap_collateral(pki, platform, tdx=True),
        expected_report_data=REPORT_DATA,
    )
    appraisal = TdxVerifier().appraise(evidence.quote, options)
    assert appraisal.status == Status.AFFIRMING and appraisal.verified, appraisal.reasons
    assert not fake.live


@settings(max_examples=10, deadline=None)
@given(report_data=st.binary(min_size=64, max_size=64))
def test_any_report_data_is_bound(
    report_data: bytes, sim: SnpSimulator, tmp_path_factory: pytest.TempPathFactory
) -> None:
    fake = fake_snp(tmp_path_factory.mktemp("tsm"), sim)
    evidence = source(fake, family="snp").collect(report_data)
    assert isinstance(evidence, events.SnpEvidence)
    assert parse_report(evidence.report).report_data == report_data
    assert not fake.live


@settings(max_examples=25, deadline=None)
@given(report_data=st.binary(max_size=200).filter(lambda b: len(b) != 64))
def test_report_data_must_be_64_bytes(
    report_data: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    fake = FakeConfigfsTsm(tmp_path_factory.mktemp("tsm"), "sev_guest")
    with pytest.raises(ConfigError) as caught:
        source(fake, family="snp").collect(report_data)
    assert caught.value.reason == "collector.report_data_size"
    assert not fake.reports


def test_privlevel_is_written_and_reported(tmp_path: Path, sim: SnpSimulator) -> None:
    fake = fake_snp(tmp_path, sim, privlevel_floor=1)
    evidence = source(fake, privlevel=2).collect(REPORT_DATA)
    assert isinstance(evidence, events.SnpEvidence)
    assert parse_report(evidence.report).vmpl == 2
    with pytest.raises(ConfigError) as caught:
        source(fake, privlevel=0).collect(REPORT_DATA)
    assert caught.value.reason == "collector.privlevel" and "floor 1" in caught.value.detail
    assert not fake.live


@pytest.mark.parametrize(
    ("options", "reason"),
    [({"privlevel": 4}, "collector.privlevel"), ({"family": "tdx", "privlevel": 0},
     "collector.privlevel"), ({"family": "nitro"}, "collector.unknown_provider")],
)  # fmt: skip
def test_bad_configuration(tmp_path: Path, options: dict[str, Any], reason: str) -> None:
    fake = FakeConfigfsTsm(tmp_path, "sev_guest")
    with pytest.raises(ConfigError) as caught:
        source(fake, **options)
    assert caught.value.reason == reason


def test_race_with_another_writer_is_detected(tmp_path: Path, sim: SnpSimulator) -> None:
    fake = fake_snp(tmp_path, sim, racer=b"\x66" * 64)
    with pytest.raises(AttestmeshError) as caught:
        source(fake, family="snp").collect(REPORT_DATA)
    assert caught.value.reason == "collector.configfs_race"
    assert not fake.live


class DroppingPrivlevel(FakeConfigfsTsm):
    """A kernel that accepts a privlevel write without counting it."""

    def write(self, fd: int, data: bytes) -> int:
        if self.paths[fd].name == "privlevel":
            return len(data)
        return super().write(fd, data)


def test_uncounted_write_is_detected(tmp_path: Path, sim: SnpSimulator) -> None:
    fake = DroppingPrivlevel(tmp_path, "sev_guest", snp_backend(sim))
    with pytest.raises(AttestmeshError) as caught:
        source(fake, family="snp", privlevel=0).collect(REPORT_DATA)
    assert caught.value.reason == "collector.configfs_write_lost"


def test_symlinked_attribute_is_not_followed(tmp_path: Path, sim: SnpSimulator) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"not for the verifier")

    def plant(entry: Path) -> None:
        (entry / "outblob").unlink()
        (entry / "outblob").symlink_to(secret)

    fake = fake_snp(tmp_path, sim, on_mkdir=plant)
    with pytest.raises(AttestmeshError) as caught:
        source(fake, family="snp").collect(REPORT_DATA)
    assert caught.value.reason == "collector.unsafe_path"
    assert secret.read_bytes() == b"not for the verifier"
    assert not fake.live and not fake.paths


def test_fifo_attribute_is_refused_without_blocking(tmp_path: Path, sim: SnpSimulator) -> None:
    def plant(entry: Path) -> None:
        (entry / "auxblob").unlink()
        os.mkfifo(entry / "auxblob")

    fake = fake_snp(tmp_path, sim, on_mkdir=plant)
    with pytest.raises(AttestmeshError) as caught:
        source(fake, family="snp").collect(REPORT_DATA)
    assert caught.value.reason == "collector.unsafe_path"
    assert "not a regular file" in caught.value.detail and not fake.live


def test_oversized_outblob_is_refused(tmp_path: Path) -> None:
    huge: Backend = lambda inblob, _: (b"\x01" * (MAX_OUTBLOB + 1), None)  # noqa: E731
    fake = FakeConfigfsTsm(tmp_path, "tdx_guest", huge)
    with pytest.raises(ParseError) as caught:
        source(fake).collect(REPORT_DATA)
    assert caught.value.reason == "collector.blob_too_large"
    assert not fake.live


@pytest.mark.parametrize(
    ("backend", "error", "reason"),
    [
        (lambda inblob, _: (b"garbage", None), ParseError, "collector.bad_report"),
        (lambda inblob, _: (SnpSimulator().report(bytes(64)), None), VerificationError,
         "collector.report_data_mismatch"),
        (lambda inblob, _: (SnpSimulator().report(inblob), b"\x01" * 30), ParseError,
         "collector.bad_cert_table"),
    ],
    ids=["garbage", "other-report-data", "bad-cert-table"],
)  # fmt: skip
def test_wrong_outblob_is_refused(
    tmp_path: Path, backend: Backend, error: type[Exception], reason: str
) -> None:
    fake = FakeConfigfsTsm(tmp_path, "sev_guest", backend)
    with pytest.raises(error) as caught:
        source(fake).collect(REPORT_DATA)
    assert getattr(caught.value, "reason", None) == reason
    assert not fake.live


def test_certificates_absent_or_empty(tmp_path: Path, sim: SnpSimulator) -> None:
    bare: Backend = lambda inblob, vmpl: (sim.report(inblob, vmpl=vmpl), None)  # noqa: E731
    for index, omit in enumerate([(), ("auxblob",)]):
        fake = FakeConfigfsTsm(tmp_path / str(index), "sev_guest", bare, omit=omit)
        evidence = source(fake).collect(REPORT_DATA)
        assert isinstance(evidence, events.SnpEvidence) and evidence.certificates is None


def test_missing_outblob_is_a_configuration_error(tmp_path: Path, sim: SnpSimulator) -> None:
    fake = fake_snp(tmp_path, sim, omit=("outblob",))
    with pytest.raises(ConfigError) as caught:
        source(fake).collect(REPORT_DATA)
    assert caught.value.reason == "collector.missing_attribute" and not fake.live


def test_kernel_error_on_read_carries_errno(tmp_path: Path) -> None:
    def failing(inblob: bytes, vmpl: int) -> tuple[bytes, bytes | None]:
        raise OSError(errno.EIO, "firmware said no")

    fake = FakeConfigfsTsm(tmp_path, "sev_guest", failing)
    with pytest.raises(AttestmeshError) as caught:
        source(fake).collect(REPORT_DATA)
    assert caught.value.reason == "collector.device_error"
    assert "EIO" in caught.value.detail and not fake.live


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda root: FakeConfigfsTsm(root, None), "collector.configfs_no_provider"),
        (lambda root: FakeConfigfsTsm(root, "arm_cca_guest"), "collector.unknown_provider"),
    ],
)
def test_probe_failures(
    tmp_path: Path, make: Callable[[Path], FakeConfigfsTsm], reason: str
) -> None:
    fake = make(tmp_path / "report")
    with pytest.raises(ConfigError) as caught:
        source(fake)
    assert caught.value.reason == reason


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        ConfigfsTsmSource(tmp_path / "absent")
    assert caught.value.reason == "collector.configfs_unavailable"


def test_provider_change_is_refused(tmp_path: Path) -> None:
    fake = FakeConfigfsTsm(tmp_path, "sev_guest")
    with pytest.raises(ConfigError) as caught:
        source(fake, family="tdx").collect(REPORT_DATA)
    assert caught.value.reason == "collector.provider_mismatch" and not fake.live


def test_malformed_generation(tmp_path: Path, sim: SnpSimulator) -> None:
    fake = fake_snp(tmp_path, sim, on_mkdir=lambda entry: (entry / "generation").write_text("-1"))
    with pytest.raises(ParseError) as caught:
        source(fake, family="snp").collect(REPORT_DATA)
    assert caught.value.reason == "collector.bad_attribute"


class StuckRmdir(FakeConfigfsTsm):
    def rmdir(self, path: str, *, dir_fd: int) -> None:
        raise OSError(errno.EBUSY, "busy")


def test_cleanup_failure_surfaces_without_hiding_the_first_error(
    tmp_path: Path, sim: SnpSimulator
) -> None:
    fake = StuckRmdir(tmp_path / "a", "sev_guest", snp_backend(sim))
    with pytest.raises(AttestmeshError) as caught:
        read_provider(fake.root, fake)
    assert caught.value.reason == "collector.configfs_cleanup" and "EBUSY" in caught.value.detail
    racing = StuckRmdir(tmp_path / "b", "sev_guest", snp_backend(sim), racer=bytes(64))
    with pytest.raises(AttestmeshError) as caught:
        source(racing, family="snp").collect(REPORT_DATA)
    assert caught.value.reason == "collector.configfs_race"
    assert any("configfs_cleanup" in note for note in caught.value.__notes__)
    assert not fake.paths and not racing.paths


@given(st.binary(max_size=40))
def test_attribute_parsers_are_strict(raw: bytes) -> None:
    for parse in (parse_count, parse_name):
        try:
            parse(raw, "attribute")
        except ParseError as exc:
            assert exc.reason == "collector.bad_attribute"
    assert parse_count(b"17\n", "generation") == 17
    assert parse_name(b"sev_guest\n", "provider") == "sev_guest"
