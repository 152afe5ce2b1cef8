"""/dev/tdx_guest TDREPORT getter against a fake driver, and why TDX needs configfs-tsm."""

from __future__ import annotations

import errno
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.collector.sources.tdx_guest import (
    REPORTDATA_OFFSET,
    TdxGuestDevice,
    check_tdreport,
    quote_unavailable,
)
from services.mesh.errors import AttestmeshError, ConfigError, ParseError, VerificationError
from services.testing.fakes import FakeTdxGuest, tdreport
from services.testing.intel_pki import TdFields

REPORT_DATA = hashlib.sha512(b"nonce || key").digest()


def device(fake: FakeTdxGuest) -> TdxGuestDevice:
    return TdxGuestDevice(fake.path, device=fake)


def test_tdreport_binds_report_data_and_carries_the_td_measurements() -> None:
    fields = TdFields(mr_td=b"\x42" * 48)
    fake = FakeTdxGuest(fields=fields)
    report = device(fake).get_report(REPORT_DATA)
    assert len(report) == 1024 and report[0] == 0x81
    assert report[REPORTDATA_OFFSET : REPORTDATA_OFFSET + 64] == REPORT_DATA
    td_info = report[512:]
    assert td_info[16:64] == fields.mr_td
    assert report[80:128] == hashlib.sha384(td_info).digest()
    assert not fake.open_fds


def test_wrong_report_type_is_refused() -> None:
    fake = FakeTdxGuest()
    fake.report_type = 0x00
    with pytest.raises(ParseError) as caught:
        device(fake).get_report(REPORT_DATA)
    assert caught.value.reason == "collector.bad_report"


def test_stale_report_data_is_refused() -> None:
    fake = FakeTdxGuest()
    fake.echo = bytes(64)
    with pytest.raises(VerificationError) as caught:
        device(fake).get_report(REPORT_DATA)
    assert caught.value.reason == "collector.report_data_mismatch"


def test_ioctl_errno_and_missing_device() -> None:
    fake = FakeTdxGuest()
    fake.fail = errno.EIO
    with pytest.raises(AttestmeshError) as caught:
        device(fake).get_report(REPORT_DATA)
    assert caught.value.reason == "collector.device_error" and "EIO" in caught.value.detail
    assert not fake.open_fds
    with pytest.raises(ConfigError) as missing:
        TdxGuestDevice("/nonexistent/tdx_guest", device=fake).get_report(REPORT_DATA)
    assert missing.value.reason == "collector.device_unavailable"
    with pytest.raises(ConfigError):
        device(fake).get_report(REPORT_DATA[:63])


def test_real_ioctl_path_on_a_device_that_is_not_tdx_guest() -> None:
    with pytest.raises(AttestmeshError) as caught:
        TdxGuestDevice("/dev/null").get_report(REPORT_DATA)
    assert caught.value.reason == "collector.device_error" and "ENOTTY" in caught.value.detail


@given(st.binary(min_size=0, max_size=1100))
def test_tdreport_check_never_fails_open(raw: bytes) -> None:
    try:
        check_tdreport(raw, REPORT_DATA)
    except (ParseError, VerificationError):
        return
    assert len(raw) == 1024 and raw[0] == 0x81 and raw[128:192] == REPORT_DATA
    check_tdreport(tdreport(REPORT_DATA), REPORT_DATA)


def test_quote_unavailable_says_what_to_do() -> None:
    error = quote_unavailable()
    assert error.reason == "collector.tdx_quote_unavailable"
    assert "configfs-tsm" in error.detail and "/sys/kernel/config/tsm/report" in error.detail
