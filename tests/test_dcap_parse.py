"""DCAP quote, DER and PCS JSON parsing: exact layouts, every bound, and only ParseError."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.mesh.errors import ParseError
from services.testing.intel_pki import (
    IntelTestPki,
    Platform,
    TdFields,
    enclave_report,
    sgx_extension,
    sgx_quote,
    td_quote,
)
from services.verifier.families.dcap import der
from services.verifier.families.dcap.pck import parse_sgx_extensions
from services.verifier.families.dcap.pcs import (
    TcbStatus,
    parse_qe_identity_body,
    parse_tcb_info_body,
)
from services.verifier.families.dcap.quote import (
    HEADER_SIZE,
    TD10_REPORT_SIZE,
    BodyType,
    EnclaveReport,
    TdReport,
    parse_quote,
)

PKI = IntelTestPki()
PLATFORM: Platform = PKI.platform()
TD_V4 = td_quote(PLATFORM)
TD_V5_15 = td_quote(PLATFORM, TdFields(tee_tcb_svn2=b"\x07" * 16), version=5)
SGX_V3 = sgx_quote(PLATFORM)
QUOTES = {"td-v4": TD_V4, "td-v5-15": TD_V5_15, "sgx-v3": SGX_V3}
SETTINGS = settings(max_examples=150, deadline=None)


def test_td_v4_fields_round_trip() -> None:
    quote = parse_quote(TD_V4)
    assert quote.header.version == 4 and quote.is_tdx and quote.body_type == BodyType.TD10
    assert isinstance(quote.body, TdReport)
    fields = TdFields()
    assert quote.body.report_data == fields.report_data
    assert quote.body.rtmrs == fields.rtmrs
    assert quote.body.mr_td == fields.mr_td
    assert quote.body.tee_tcb_svn2 is None
    assert len(quote.signed) == HEADER_SIZE + TD10_REPORT_SIZE
    assert quote.length == len(TD_V4) and quote.trailing == b""
    assert quote.certification.pck_chain_pem == PLATFORM.chain_pem
    assert quote.certification.qe_report.isv_svn == PLATFORM.qe_svn


def test_td_v5_body_descriptor_is_signed() -> None:
    quote = parse_quote(TD_V5_15)
    assert quote.header.version == 5 and quote.body_type == BodyType.TD15
    assert isinstance(quote.body, TdReport)
    assert quote.body.tee_tcb_svn2 == b"\x07" * 16
    assert quote.signed[HEADER_SIZE : HEADER_SIZE + 6] == struct.pack("<HI", 3, 648)
    assert len(quote.signed) == HEADER_SIZE + 6 + 648


def test_sgx_v3_and_v4() -> None:
    report = enclave_report(report_data=b"\x42" * 64, isv_svn=9)
    for version in (3, 4):
        quote = parse_quote(sgx_quote(PLATFORM, report, version=version))
        assert isinstance(quote.body, EnclaveReport) and not quote.is_tdx
        assert quote.body.report_data == b"\x42" * 64 and quote.body.isv_svn == 9
        assert not quote.body.debug


def test_trailing_bytes_are_kept_apart() -> None:
    padded = parse_quote(TD_V4 + bytes(70))
    assert padded.trailing == bytes(70) and padded.trailing_is_padding
    assert padded.signed == parse_quote(TD_V4).signed
    junk = parse_quote(TD_V4 + b"\nextra bytes\n")
    assert junk.trailing == b"\nextra bytes\n" and not junk.trailing_is_padding


@pytest.mark.parametrize("name", sorted(QUOTES))
def test_every_truncation_is_a_parse_error(name: str) -> None:
    data = QUOTES[name]
    for size in range(0, len(data), 7):
        with pytest.raises(ParseError) as info:
            parse_quote(data[:size])
        assert info.value.reason.startswith("dcap.")


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [
        (0, 3, "dcap.unsupported_tee"),
        (0, 6, "dcap.unsupported_version"),
        (2, 3, "dcap.unsupported_key_type"),
        (4, 0x82, "dcap.unsupported_tee"),
    ],
)
def test_header_fields_are_checked(offset: int, value: int, reason: str) -> None:
    data = bytearray(TD_V4)
    data[offset] = value
    with pytest.raises(ParseError) as info:
        parse_quote(bytes(data))
    assert info.value.reason == reason


def test_v5_body_descriptor_is_checked() -> None:
    for body_type, size, reason in ((9, 648, "dcap.unsupported_body"),
                                    (1, 648, "dcap.unsupported_body"),
                                    (3, 584, "dcap.bad_size")):  # fmt: skip
        data = bytearray(TD_V5_15)
        data[HEADER_SIZE : HEADER_SIZE + 6] = struct.pack("<HI", body_type, size)
        with pytest.raises(ParseError) as info:
            parse_quote(bytes(data))
        assert info.value.reason == reason


def _sig_data_offset(data: bytes) -> int:
    return len(parse_quote(data).signed)


def test_signature_data_must_be_consumed_exactly() -> None:
    at = _sig_data_offset(TD_V4)
    (size,) = struct.unpack_from("<I", TD_V4, at)
    longer = TD_V4[:at] + struct.pack("<I", size + 1) + TD_V4[at + 4 :] + b"\0"
    with pytest.raises(ParseError) as info:
        parse_quote(longer)
    assert info.value.reason == "dcap.trailing_bytes"


def test_certification_types_are_checked() -> None:
    at = _sig_data_offset(TD_V4) + 4 + 128
    data = bytearray(TD_V4)
    data[at : at + 2] = struct.pack("<H", 5)
    with pytest.raises(ParseError) as info:
        parse_quote(bytes(data))
    assert info.value.reason == "dcap.unsupported_cert_data"


def test_oversized_input_is_refused() -> None:
    with pytest.raises(ParseError) as info:
        parse_quote(TD_V4 + bytes(1 << 20))
    assert info.value.reason == "dcap.too_large"


@SETTINGS
@given(st.binary(max_size=6000))
def test_random_bytes_only_raise_parse_error(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        parse_quote(data)


@SETTINGS
@given(
    st.sampled_from(sorted(QUOTES)),
    st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_mutated_quotes_parse_or_raise_parse_error(name: str, edits: list[tuple[int, int]]) -> None:
    data = bytearray(QUOTES[name])
    for offset, value in edits:
        data[offset % len(data)] = value
    try:
        quote = parse_quote(bytes(data))
    except ParseError:
        return
    assert quote.length + len(quote.trailing) == len(data)


def test_sgx_extension_of_a_test_pck() -> None:
    ext = parse_sgx_extensions(PLATFORM.pck)
    assert ext.tcb_components == PLATFORM.components
    assert ext.pce_svn == PLATFORM.pce_svn
    assert ext.fmspc == bytes.fromhex("50806f000000") and ext.pce_id == b"\0\0"
    assert ext.cpu_svn == bytes(PLATFORM.components) and ext.sgx_type == 0


def test_der_reader_bounds() -> None:
    assert der.oid(bytes.fromhex("2a864886f84d010d01")) == "1.2.840.113741.1.13.1"
    for bad in (b"\x30", b"\x30\x05\x02\x01", b"\x30\x85\x00\x00\x00\x00\x01", b"\x1f\x01\x00"):
        with pytest.raises(ParseError):
            der.read_all(bad)
    with pytest.raises(ParseError):
        der.unsigned(der.Tlv(der.TAG_INTEGER, b"\x80"))
    with pytest.raises(ParseError):
        der.oid_pairs(der.read_one(sgx_extension((1,) * 16, 1, bytes(6)), 0x30).value * 2)


@SETTINGS
@given(st.binary(max_size=300))
def test_der_random_bytes_only_raise_parse_error(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        der.oid_pairs(data)


def test_tcb_info_signed_bytes_are_the_exact_slice() -> None:
    inner = b'{"id":"SGX", "version":3,"issueDate":"2025-01-01T00:00:00Z",' \
        b'"nextUpdate":"2025-02-01T00:00:00Z","fmspc":"00A067110000","pceId":"0000",' \
        b'"tcbLevels":[{"tcb":{"sgxtcbcomponents":' + b"[" + b",".join(
            [b'{"svn":1}'] * 16) + b'],"pcesvn":7},"tcbDate":"x","tcbStatus":"OutOfDate",' \
        b'"advisoryIDs":["INTEL-SA-1"],"newField":true}]}'  # fmt: skip
    body = b'{ "tcbInfo" :  ' + inner + b' , "signature":"' + b"ab" * 64 + b'"}'
    signed = parse_tcb_info_body(body)
    assert signed.signed == inner
    info = signed.document
    assert info.id == "SGX" and info.fmspc == bytes.fromhex("00a067110000")
    assert info.levels[0].status == TcbStatus.OUT_OF_DATE
    assert info.levels[0].advisories == ("INTEL-SA-1",)


def test_tcb_info_v2_components() -> None:
    fields = ",".join(f'"sgxtcbcomp{i:02d}svn":{i}' for i in range(1, 17))
    inner = (
        '{"version":2,"issueDate":"2019-01-01T00:00:00Z","nextUpdate":"2019-02-01T00:00:00Z",'
        '"fmspc":"00906EA10000","pceId":"0000","tcbLevels":[{"tcb":{' + fields + ',"pcesvn":7},'
        '"tcbDate":"x","tcbStatus":"UpToDate"}]}'
    )
    info = parse_tcb_info_body(f'{{"tcbInfo":{inner},"signature":"{"00" * 64}"}}'.encode())
    assert info.document.version == 2 and info.document.levels[0].sgx_svns == tuple(range(1, 17))


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b'{"tcbInfo":{},"signature":"00"}',
        b'{"tcbInfo":{"version":9},"signature":"' + b"00" * 64 + b'"}',
        b'{"signature":"' + b"00" * 64 + b'"}',
    ],
)
def test_malformed_tcb_info_is_a_parse_error(body: bytes) -> None:
    with pytest.raises(ParseError) as info:
        parse_tcb_info_body(body)
    assert info.value.reason == "dcap.tcb_info_malformed"


def test_qe_identity_accepts_both_envelopes_but_not_both_at_once() -> None:
    body = PKI.qe_identity()
    signed = parse_qe_identity_body(body)
    assert signed.document.id == "TD_QE" and signed.document.isv_prod_id == 2
    legacy = body.replace(b'"enclaveIdentity"', b'"qeIdentity"')
    assert parse_qe_identity_body(legacy).signed == signed.signed
    both = body[:-1] + b',"qeIdentity":{}}'
    with pytest.raises(ParseError):
        parse_qe_identity_body(both)


@SETTINGS
@given(st.binary(max_size=400))
def test_pcs_random_bytes_only_raise_parse_error(data: bytes) -> None:
    for parse in (parse_tcb_info_body, parse_qe_identity_body):
        with contextlib.suppress(ParseError):
            parse(data)
