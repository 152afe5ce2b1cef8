"""/dev/sev-guest source against a fake driver speaking the real ioctl ABI (buffers by address)."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.collector.simulator.snp import SnpSimulator
from services.collector.sources.sev_guest import (
    SNP_GET_EXT_REPORT,
    SNP_GET_REPORT,
    ExtReportReq,
    GuestRequest,
    ReportReq,
    ReportResp,
    SevGuestSource,
    iowr,
)
from services.collector.sources.tdx_guest import TDX_CMD_GET_REPORT0, TdxReportReq
from services.mesh import events
from services.mesh.errors import AttestmeshError, ConfigError, ParseError
from services.testing.amd_pki import AmdTestPki
from services.testing.fakes import FakeSevGuest
from services.verifier.families.base import Status, VerifyOptions
from services.verifier.families.snp import SnpVerifier, parse_report
from services.verifier.families.snp.certtable import CRL_GUID, encode_cert_table, parse_cert_table
from services.verifier.trust import TrustStore

NOW = datetime(2025, 3, 1, tzinfo=UTC)
REPORT_DATA = hashlib.sha512(b"nonce || key").digest()


@pytest.fixture(scope="module")
def amd(tmp_path_factory: pytest.TempPathFactory) -> tuple[SnpSimulator, TrustStore]:
    pki = AmdTestPki(now=NOW)
    store = TrustStore.load(None, test_dir=pki.write_trust_dir(tmp_path_factory.mktemp("roots")))
    return SnpSimulator(pki), store


@pytest.fixture(scope="module")
def sim(amd: tuple[SnpSimulator, TrustStore]) -> SnpSimulator:
    return amd[0]


def sev(fake: FakeSevGuest, **options: Any) -> SevGuestSource:
    return SevGuestSource(fake.path, device=fake, **options)


def test_ioctl_numbers_and_struct_layouts_match_the_kernel_headers() -> None:
    assert (SNP_GET_REPORT, SNP_GET_EXT_REPORT) == (0xC0205300, 0xC0205302)
    assert TDX_CMD_GET_REPORT0 == 0xC4405401
    assert ctypes.sizeof(GuestRequest) == 32
    assert (GuestRequest.req_data.offset, GuestRequest.resp_data.offset) == (8, 16)
    assert GuestRequest.exitinfo2.offset == 24
    assert ctypes.sizeof(ReportReq) == 96
    assert (ReportReq.vmpl.offset, ReportReq.rsvd.offset) == (64, 68)
    assert ctypes.sizeof(ReportResp) == 4000
    assert ctypes.sizeof(ExtReportReq) == 112
    assert (ExtReportReq.certs_address.offset, ExtReportReq.certs_len.offset) == (96, 104)
    assert ctypes.sizeof(TdxReportReq) == 1088
    arg = GuestRequest(exitinfo2=0x0000_0001_0000_0016)
    assert (arg.fw_error, arg.vmm_error) == (0x16, 1)
    with pytest.raises(ValueError):
        iowr("S", 0, 1 << 14)


def test_extended_report_verifies_with_the_hosts_certificates(
    amd: tuple[SnpSimulator, TrustStore],
) -> None:
    sim, store = amd
    fake = FakeSevGuest(sim)
    evidence = sev(fake).collect(REPORT_DATA)
    assert isinstance(evidence, events.SnpEvidence)
    assert evidence.certificates == sim.cert_table()
    options = VerifyOptions(now=NOW, trust=store, expected_report_data=REPORT_DATA)
    appraisal = SnpVerifier().appraise(events.evidence_bytes(evidence), options)
    assert appraisal.status == Status.AFFIRMING and appraisal.verified, appraisal.reasons
    assert fake.requests == [(SNP_GET_EXT_REPORT, 8192)] and not fake.open_fds


def test_plain_report_verifies_with_collateral(amd: tuple[SnpSimulator, TrustStore]) -> None:
    sim, store = amd
    fake = FakeSevGuest(sim)
    evidence = sev(fake, certificates=False, vmpl=1).collect(REPORT_DATA)
    assert isinstance(evidence, events.SnpEvidence) and evidence.certificates is None
    assert parse_report(evidence.report).vmpl == 1
    options = VerifyOptions(
        now=NOW, trust=store, collateral=sim.collateral(), expected_report_data=REPORT_DATA
    )
    appraisal = SnpVerifier().appraise(evidence.report, options)
    assert appraisal.status == Status.AFFIRMING, appraisal.reasons
    assert fake.requests == [(SNP_GET_REPORT, None)]


def big_table(sim: SnpSimulator, extra: int) -> bytes:
    entries = list(parse_cert_table(sim.cert_table()).entries)
    return encode_cert_table([*entries, (CRL_GUID, b"\x30" * extra)])


def test_small_certificate_buffer_is_retried_with_the_length_the_kernel_asks_for(
    sim: SnpSimulator,
) -> None:
    table = big_table(sim, 3000)
    fake = FakeSevGuest(sim, certs=table)
    evidence = sev(fake, certs_buffer=4096).collect(REPORT_DATA)
    assert isinstance(evidence, events.SnpEvidence) and evidence.certificates == table
    assert fake.requests == [(SNP_GET_EXT_REPORT, 4096), (SNP_GET_EXT_REPORT, 8192)]
    assert not fake.open_fds


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 4000), min_size=1, max_size=3))
def test_any_table_up_to_the_kernel_limit_comes_back_exactly(
    sim: SnpSimulator, sizes: list[int]
) -> None:
    table = encode_cert_table(
        (uuid.UUID(int=i + 1), bytes([i + 1]) * n) for i, n in enumerate(sizes)
    )
    _, certs = sev(FakeSevGuest(sim, certs=table), certs_buffer=4096).get_extended_report(
        REPORT_DATA
    )
    assert certs == table


@pytest.mark.parametrize(
    ("needed", "reason"),
    [(5 * 4096, "collector.certs_too_large"), (4096, "collector.device_error"),
     (4096 + 100, "collector.device_error")],
    ids=["over-16KiB", "not-larger", "not-page-aligned"],
)  # fmt: skip
def test_unreasonable_certificate_lengths_are_refused(
    sim: SnpSimulator, needed: int, reason: str
) -> None:
    fake = FakeSevGuest(sim, certs=big_table(sim, 3000))
    fake.needed_len = needed
    with pytest.raises(AttestmeshError) as caught:
        sev(fake, certs_buffer=4096).collect(REPORT_DATA)
    assert caught.value.reason == reason and not fake.open_fds


def test_host_without_certificates(sim: SnpSimulator) -> None:
    evidence = sev(FakeSevGuest(sim, certs=b"")).collect(REPORT_DATA)
    assert isinstance(evidence, events.SnpEvidence) and evidence.certificates is None


def test_malformed_certificate_table_is_refused(sim: SnpSimulator) -> None:
    with pytest.raises(ParseError) as caught:
        sev(FakeSevGuest(sim, certs=b"\x01" * 100)).collect(REPORT_DATA)
    assert caught.value.reason == "collector.bad_cert_table"


@pytest.mark.parametrize("certificates", [True, False])
def test_ioctl_failure_carries_errno_and_firmware_codes(
    sim: SnpSimulator, certificates: bool
) -> None:
    fake = FakeSevGuest(sim)
    fake.fail = (errno.EIO, 0x16, 2)
    with pytest.raises(AttestmeshError) as caught:
        sev(fake, certificates=certificates).collect(REPORT_DATA)
    assert caught.value.reason == "collector.device_error"
    assert "EIO" in caught.value.detail
    assert "fw_error=0x00000016 vmm_error=0x00000002" in caught.value.detail
    assert not fake.open_fds


def test_firmware_status_is_checked(sim: SnpSimulator) -> None:
    fake = FakeSevGuest(sim, current_vmpl=1)
    with pytest.raises(AttestmeshError) as caught:
        sev(fake, vmpl=0).collect(REPORT_DATA)
    assert caught.value.reason == "collector.report_status"
    assert "INVALID_PARAM" in caught.value.detail
    fake.status = 0x99
    with pytest.raises(AttestmeshError) as caught:
        sev(fake, vmpl=1).collect(REPORT_DATA)
    assert "0x99 (unknown)" in caught.value.detail


@pytest.mark.parametrize("size", [0, 1183, 1185, 3968, 0xFFFFFFFF])
def test_report_size_must_be_exact(sim: SnpSimulator, size: int) -> None:
    fake = FakeSevGuest(sim)
    fake.report_size = size
    with pytest.raises(ParseError) as caught:
        sev(fake).collect(REPORT_DATA)
    assert caught.value.reason == "collector.bad_report"


@pytest.mark.parametrize("code", [errno.ENOENT, errno.EACCES])
def test_unavailable_device(sim: SnpSimulator, code: int) -> None:
    fake = FakeSevGuest(sim)
    fake.open_errno = code
    with pytest.raises(ConfigError) as caught:
        sev(fake).collect(REPORT_DATA)
    assert caught.value.reason == "collector.device_unavailable"


def test_real_ioctl_path_on_a_device_that_is_not_sev_guest() -> None:
    source = SevGuestSource("/dev/null", certificates=False)
    with pytest.raises(AttestmeshError) as caught:
        source.collect(REPORT_DATA)
    assert caught.value.reason == "collector.device_error" and "ENOTTY" in caught.value.detail
    with pytest.raises(ConfigError):
        SevGuestSource(Path("/nonexistent/sev-guest")).collect(REPORT_DATA)


@pytest.mark.parametrize(
    ("options", "data"),
    [({"vmpl": 4}, REPORT_DATA), ({"certs_buffer": 5000}, REPORT_DATA),
     ({"certs_buffer": 8 * 4096}, REPORT_DATA), ({}, REPORT_DATA[:32])],
)  # fmt: skip
def test_bad_configuration_touches_no_device(
    sim: SnpSimulator, options: dict[str, Any], data: bytes
) -> None:
    fake = FakeSevGuest(sim)
    with pytest.raises(ConfigError):
        sev(fake, **options).collect(data)
    assert fake.opens == 0
