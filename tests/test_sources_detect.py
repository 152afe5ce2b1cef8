"""Source detection against fake roots: best interface first, a clear error when none fits."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.collector.simulator.snp import SnpSimulator
from services.collector.sources.configfs_tsm import ConfigfsTsmSource
from services.collector.sources.detect import Roots, detect_source
from services.collector.sources.gramine import GramineSource
from services.collector.sources.sev_guest import SevGuestSource
from services.mesh import events
from services.mesh.errors import ConfigError
from services.testing.fakes import FakeConfigfsTsm, FakeGramine, FakeSevGuest, snp_backend
from services.testing.intel_pki import IntelTestPki

NOW = datetime(2025, 3, 1, tzinfo=UTC)
SIM = SnpSimulator()


def roots(tmp_path: Path, *present: str) -> Roots:
    """Fake roots under ``tmp_path``; device nodes in ``present`` exist (as plain files)."""
    result = Roots(
        configfs_tsm=tmp_path / "sys/kernel/config/tsm/report",
        sev_guest=tmp_path / "dev/sev-guest",
        tdx_guest=tmp_path / "dev/tdx_guest",
        attestation=tmp_path / "dev/attestation",
    )
    (tmp_path / "dev").mkdir()
    for name in present:
        getattr(result, name).touch()
    return result


def test_configfs_comes_first_and_works(tmp_path: Path) -> None:
    where = roots(tmp_path, "sev_guest", "tdx_guest")
    fake = FakeConfigfsTsm(where.configfs_tsm, "sev_guest", snp_backend(SIM))
    source = detect_source(roots=where, files=fake, vmpl=1)
    assert isinstance(source, ConfigfsTsmSource) and source.family == "snp"
    assert source.privlevel == 1
    evidence = source.collect(bytes(range(64)))
    assert isinstance(evidence, events.SnpEvidence) and evidence.certificates
    assert not fake.live


def test_configfs_tdx(tmp_path: Path) -> None:
    where = roots(tmp_path, "tdx_guest")
    fake = FakeConfigfsTsm(where.configfs_tsm, "tdx_guest")
    source = detect_source("tdx", roots=where, files=fake, vmpl=1)
    assert isinstance(source, ConfigfsTsmSource) and source.family == "tdx"
    assert source.privlevel is None


def test_sev_guest_when_configfs_has_no_provider(tmp_path: Path) -> None:
    where = roots(tmp_path, "sev_guest")
    fake = FakeConfigfsTsm(where.configfs_tsm, None)
    device = FakeSevGuest(SIM, path=str(where.sev_guest))
    source = detect_source(roots=where, files=fake, device=device)
    assert isinstance(source, SevGuestSource)
    assert isinstance(source.collect(bytes(64)), events.SnpEvidence)


def test_family_narrows_the_search(tmp_path: Path) -> None:
    where = roots(tmp_path, "sev_guest")
    fake = FakeGramine(where.attestation, IntelTestPki(now=NOW).platform())
    configfs = FakeConfigfsTsm(where.configfs_tsm, "sev_guest")
    assert isinstance(detect_source("sgx", roots=where, files=configfs), GramineSource)
    assert isinstance(detect_source("sgx", roots=where, files=fake), GramineSource)
    with pytest.raises(ConfigError) as caught:
        detect_source("tdx", roots=where, files=configfs)
    assert caught.value.reason == "collector.no_source"
    assert "provider for snp" in caught.value.detail


def test_tdx_guest_alone_cannot_quote(tmp_path: Path) -> None:
    where = roots(tmp_path, "tdx_guest")
    with pytest.raises(ConfigError) as caught:
        detect_source(roots=where)
    assert caught.value.reason == "collector.tdx_quote_unavailable"
    assert str(where.configfs_tsm) in caught.value.detail


def test_nothing_found_lists_every_place_looked(tmp_path: Path) -> None:
    where = roots(tmp_path)
    with pytest.raises(ConfigError) as caught:
        detect_source(roots=where)
    assert caught.value.reason == "collector.no_source"
    for path in (where.configfs_tsm, where.sev_guest, where.tdx_guest, where.attestation):
        assert str(path) in caught.value.detail


def test_gramine_without_dcap_is_skipped(tmp_path: Path) -> None:
    where = roots(tmp_path)
    fake = FakeGramine(where.attestation, IntelTestPki(now=NOW).platform(), attestation_type="none")
    with pytest.raises(ConfigError) as caught:
        detect_source("sgx", roots=where, files=fake)
    assert "attestation_type 'none'" in caught.value.detail


def test_unknown_family(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        detect_source("nitro", roots=roots(tmp_path))
    assert caught.value.reason == "collector.no_source" and "nitro" in caught.value.detail


def test_a_tpm_is_used_only_when_asked_for(tmp_path: Path) -> None:
    absent = tmp_path / "absent"
    no_tpm = tmp_path / "no-tpm"
    roots = Roots(
        configfs_tsm=absent,
        sev_guest=absent,
        tdx_guest=absent,
        attestation=absent,
        nsm=absent,
        tpm=no_tpm,
    )
    with pytest.raises(ConfigError) as err:
        detect_source("tpm", roots=roots)
    assert f"{no_tpm}: absent" in err.value.detail
    with pytest.raises(ConfigError) as err:
        detect_source(None, roots=roots)
    assert str(no_tpm) not in err.value.detail
