"""SNP parsing: exact sizes, spec offsets, reserved ranges, versions, certificate table."""

from __future__ import annotations

import struct
import uuid
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.mesh.errors import ParseError
from services.verifier.families.snp import (
    AttestationReport,
    Product,
    SigningKey,
    TcbVersion,
    encode_cert_table,
    encode_report,
    parse_cert_table,
    parse_evidence,
    parse_report,
)
from services.verifier.families.snp.certtable import (
    ARK_GUID,
    ASK_GUID,
    CRL_GUID,
    VCEK_GUID,
    VLEK_GUID,
)
from services.verifier.families.snp.parse import (
    REPORT_SIZE,
    SIGNED_SIZE,
    GuestPolicy,
    PlatformInfo,
    TcbLayout,
    encode_signature,
)

MILAN = dict(cpuid_fam_id=0x19, cpuid_mod_id=0x01, cpuid_step=0x01)
TURIN = dict(cpuid_fam_id=0x1A, cpuid_mod_id=0x02, cpuid_step=0x00)


def _report(version: int = 3, **fields: object) -> bytes:
    base: dict[str, object] = {"version": version}
    if version == 2:
        base.update(cpuid_fam_id=None, cpuid_mod_id=None, cpuid_step=None)
    if version >= 5:
        base.update(launch_mit_vector=0, current_mit_vector=0)
    base.update(fields)
    return encode_report(AttestationReport(**base))  # type: ignore[arg-type]


def test_field_offsets_follow_the_spec() -> None:
    data = bytearray(_report(5, **MILAN))
    struct.pack_into("<I", data, 0x04, 7)
    struct.pack_into("<Q", data, 0x08, 0x3_0000 | 0x1F)
    data[0x10:0x20] = b"F" * 16
    data[0x20:0x30] = b"I" * 16
    struct.pack_into("<I", data, 0x30, 2)
    struct.pack_into("<Q", data, 0x40, 0x21)
    struct.pack_into("<I", data, 0x48, 0b00111)
    data[0x50:0x90] = b"R" * 64
    data[0x90:0xC0] = b"M" * 48
    data[0xC0:0xE0] = b"H" * 32
    data[0xE0:0x110] = b"K" * 48
    data[0x110:0x140] = b"A" * 48
    data[0x140:0x160] = b"D" * 32
    data[0x160:0x180] = b"E" * 32
    data[0x180:0x188] = bytes([3, 0, 0, 0, 0, 0, 8, 115])
    data[0x1A0:0x1E0] = b"C" * 64
    data[0x1E8:0x1EB] = bytes([21, 55, 1])
    data[0x1EC:0x1EF] = bytes([20, 54, 1])
    struct.pack_into("<QQ", data, 0x1F8, 0xAA, 0xBB)
    report = parse_report(bytes(data))
    assert (report.version, report.guest_svn, report.policy) == (5, 7, 0x3001F)
    assert (report.family_id, report.image_id, report.vmpl) == (b"F" * 16, b"I" * 16, 2)
    assert report.platform_info == 0x21
    assert report.author_key_en and report.mask_chip_key
    assert report.signing_key is SigningKey.VLEK
    assert report.report_data == b"R" * 64 and report.measurement == b"M" * 48
    assert report.host_data == b"H" * 32 and report.id_key_digest == b"K" * 48
    assert report.author_key_digest == b"A" * 48 and report.report_id == b"D" * 32
    assert report.report_id_ma == b"E" * 32 and report.chip_id == b"C" * 64
    assert report.reported_tcb == TcbVersion(bootloader=3, tee=0, snp=8, microcode=115)
    assert (report.current_major, report.current_minor, report.current_build) == (1, 55, 21)
    assert (report.committed_major, report.committed_minor, report.committed_build) == (1, 54, 20)
    assert (report.launch_mit_vector, report.current_mit_vector) == (0xAA, 0xBB)
    assert report.product_hint is Product.MILAN
    assert encode_report(report) == bytes(data)


@pytest.mark.parametrize("size", [0, 1, REPORT_SIZE - 1, REPORT_SIZE + 1, 4096])
def test_report_size_is_exact(size: int) -> None:
    with pytest.raises(ParseError) as info:
        parse_report(bytes(size))
    assert info.value.reason == "snp.bad_size"


@pytest.mark.parametrize("version", [0, 1, 6, 0xFFFF_FFFF])
def test_unknown_versions_are_rejected(version: int) -> None:
    data = bytearray(_report(3, **MILAN))
    struct.pack_into("<I", data, 0, version)
    with pytest.raises(ParseError) as info:
        parse_report(bytes(data))
    assert info.value.reason == "snp.unsupported_version"


@pytest.mark.parametrize(
    ("version", "offsets"),
    [
        (2, [0x4C, 0x4F, 0x188, 0x18A, 0x19F, 0x1EB, 0x1EF, 0x1F8, 0x207, 0x29F, 0x330, 0x49F]),
        (3, [0x4C, 0x18B, 0x19F, 0x1EB, 0x1EF, 0x1F8, 0x200, 0x29F, 0x330, 0x49F]),
        (5, [0x4C, 0x18B, 0x1EB, 0x1EF, 0x208, 0x29F, 0x330, 0x49F]),
    ],
)
def test_reserved_ranges_must_be_zero(version: int, offsets: list[int]) -> None:
    clean = _report(version, **({} if version == 2 else MILAN))
    parse_report(clean)
    for offset in offsets:
        data = bytearray(clean)
        data[offset] = 0x01
        with pytest.raises(ParseError) as info:
            parse_report(bytes(data))
        assert info.value.reason == "snp.reserved_nonzero", hex(offset)


def test_key_info_reserved_bits_and_signing_keys() -> None:
    data = bytearray(_report(3, **MILAN))
    struct.pack_into("<I", data, 0x48, 1 << 5)
    with pytest.raises(ParseError) as info:
        parse_report(bytes(data))
    assert info.value.reason == "snp.reserved_nonzero"
    for value in range(2, 7):
        struct.pack_into("<I", data, 0x48, value << 2)
        with pytest.raises(ParseError) as info:
            parse_report(bytes(data))
        assert info.value.reason == "snp.unknown_signing_key"
    struct.pack_into("<I", data, 0x48, 7 << 2)
    assert parse_report(bytes(data)).signing_key is SigningKey.NONE


def test_tcb_reserved_bytes_must_be_zero() -> None:
    data = bytearray(_report(3, **MILAN))
    data[0x180 + 3] = 1
    with pytest.raises(ParseError) as info:
        parse_report(bytes(data))
    assert info.value.reason == "snp.reserved_nonzero"


def test_turin_tcb_layout_has_the_fmc_first() -> None:
    tcb = TcbVersion(bootloader=2, tee=3, snp=4, microcode=5, fmc=1)
    assert tcb.encode() == bytes([1, 2, 3, 4, 0, 0, 0, 5])
    data = _report(3, reported_tcb=tcb, current_tcb=tcb, committed_tcb=tcb, launch_tcb=tcb, **TURIN)
    report = parse_report(data)
    assert report.tcb_layout is TcbLayout.TURIN and report.product_hint is Product.TURIN
    assert report.reported_tcb == tcb and report.reported_tcb.as_dict()["fmc"] == 1
    with pytest.raises(ParseError):
        TcbVersion.decode(tcb.encode(), TcbLayout.MILAN_GENOA)
    with pytest.raises(ParseError):
        TcbVersion.decode(bytes([0, 0, 0, 0, 1, 0, 0, 0]), TcbLayout.TURIN)
    with pytest.raises(ParseError):
        encode_report(AttestationReport(reported_tcb=tcb))


def test_cpuid_family_must_be_sev_snp_in_v3() -> None:
    with pytest.raises(ParseError) as info:
        parse_report(_report(3, cpuid_fam_id=0x17, cpuid_mod_id=0x31, cpuid_step=0))
    assert info.value.reason == "snp.unknown_cpu_family"
    genoa = parse_report(_report(3, cpuid_fam_id=0x19, cpuid_mod_id=0x11, cpuid_step=1))
    assert genoa.product_hint is Product.GENOA
    unknown_model = parse_report(_report(3, cpuid_fam_id=0x19, cpuid_mod_id=0x30, cpuid_step=0))
    assert unknown_model.product_hint is None


def test_version_2_has_no_cpuid_and_version_4_uses_the_v3_layout() -> None:
    v2 = parse_report(_report(2))
    assert v2.cpuid_fam_id is None and v2.product_hint is None
    assert v2.tcb_layout is TcbLayout.MILAN_GENOA
    with pytest.raises(ParseError):
        encode_report(AttestationReport(version=2))
    v4 = parse_report(_report(4, **MILAN))
    assert v4.cpuid_mod_id == 1 and v4.launch_mit_vector is None


def test_signature_encoding_is_little_endian() -> None:
    r, s = 0x0102, 0x0304
    report = parse_report(_report(3, signature=encode_signature(r, s), **MILAN))
    assert report.signature_rs == (r, s)
    assert report.raw[0x2A0:0x2A2] == b"\x02\x01" and report.raw[0x2E8:0x2EA] == b"\x04\x03"
    assert report.signed_bytes == report.raw[:SIGNED_SIZE]


def test_policy_and_platform_flags() -> None:
    policy = GuestPolicy(0x000B_0000 | 0x0102)
    assert policy.debug and policy.smt and not policy.migrate_ma and not policy.single_socket
    assert (policy.abi_major, policy.abi_minor) == (1, 2)
    assert GuestPolicy(1 << 18).migrate_ma and GuestPolicy(1 << 20).single_socket
    assert GuestPolicy(1 << 40).reserved_bits == 1 << 40
    flags = PlatformInfo(0b1010_0011).as_dict()
    assert flags["smt_enabled"] and flags["tsme_enabled"] and flags["alias_check_complete"]
    assert flags["tio_enabled"] and not flags["ecc_enabled"]


def test_guids_are_the_ghcb_spec_values_in_rfc_byte_order() -> None:
    assert str(VCEK_GUID) == "63da758d-e664-4564-adc5-f4b93be8accd"
    assert str(VLEK_GUID) == "a8074bc2-a25a-483e-aae6-39c045a0b8a1"
    assert str(ASK_GUID) == "4ab7b379-bbac-4fe4-a02f-05aef327c782"
    assert str(ARK_GUID) == "c0b406a4-a803-4952-9743-3fb6014cd0ae"
    table = encode_cert_table([(VCEK_GUID, b"vcek")])
    assert table[:4] == bytes.fromhex("63da758d")


def test_cert_table_roundtrip_and_evidence_tail() -> None:
    entries = [(VCEK_GUID, b"v" * 10), (ASK_GUID, b"a" * 5), (CRL_GUID, b"c")]
    table = encode_cert_table(entries)
    parsed = parse_cert_table(table + bytes(100))
    assert parsed.entries == tuple(entries)
    assert parsed.vcek == b"v" * 10 and parsed.vlek is None
    assert parsed.names() == ["vcek", "ask", "crl"]
    evidence = parse_evidence(_report(3, **MILAN) + table)
    assert evidence.cert_table is not None and evidence.cert_table.vcek == b"v" * 10
    assert parse_evidence(_report(3, **MILAN)).cert_table is None
    assert parse_cert_table(b"").entries == ()


def _entry(guid: uuid.UUID, offset: int, length: int) -> bytes:
    return guid.bytes + struct.pack("<II", offset, length)


@pytest.mark.parametrize(
    "table",
    [
        _entry(VCEK_GUID, 48, 1),
        _entry(VCEK_GUID, 48, 4) + bytes(24) + b"abc",
        _entry(VCEK_GUID, 10, 4) + bytes(24) + b"abcd",
        _entry(VCEK_GUID, 48, 0) + bytes(24),
        _entry(VCEK_GUID, 72, 1) + _entry(VCEK_GUID, 73, 1) + bytes(24) + b"ab",
        _entry(uuid.UUID(int=0), 48, 1) + bytes(24) + b"a",
        b"\x00" * 23,
    ],
    ids=[
        "no-terminator",
        "past-end",
        "into-header",
        "empty-entry",
        "duplicate",
        "zero-guid",
        "short",
    ],
)
def test_malformed_cert_tables(table: bytes) -> None:
    with pytest.raises(ParseError) as info:
        parse_cert_table(table)
    assert info.value.reason == "snp.cert_table_malformed"


def test_evidence_size_bounds() -> None:
    with pytest.raises(ParseError) as info:
        parse_evidence(bytes(100))
    assert info.value.reason == "snp.bad_size"
    with pytest.raises(ParseError) as info:
        parse_evidence(bytes(REPORT_SIZE + 0x10001))
    assert info.value.reason == "snp.bad_size"


# ---- properties: parsers raise only ParseError, and accept exactly what they can re-encode ----

_VALID = [
    _report(2),
    _report(3, **MILAN),
    _report(
        5,
        **TURIN,
        reported_tcb=TcbVersion(1, 2, 3, 4, fmc=5),
        current_tcb=TcbVersion(1, 2, 3, 4, fmc=5),
        committed_tcb=TcbVersion(1, 2, 3, 4, fmc=5),
        launch_tcb=TcbVersion(1, 2, 3, 4, fmc=5),
    ),
]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3 * REPORT_SIZE))
def test_random_bytes_raise_only_parse_error(data: bytes) -> None:
    try:
        parse_evidence(data)
    except ParseError as exc:
        assert exc.reason.startswith("snp.")


@settings(max_examples=400)
@given(
    st.sampled_from(_VALID),
    st.lists(st.tuples(st.integers(0, REPORT_SIZE - 1), st.integers(0, 255)), max_size=6),
)
def test_mutated_reports_parse_exactly_or_fail_typed(
    base: bytes, edits: list[tuple[int, int]]
) -> None:
    data = bytearray(base)
    for offset, value in edits:
        data[offset] = value
    try:
        report = parse_report(bytes(data))
    except ParseError:
        return
    assert encode_report(report) == bytes(data)
    assert encode_report(replace(report, raw=b"")) == bytes(data)


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_random_cert_tables_raise_only_parse_error(data: bytes) -> None:
    try:
        table = parse_cert_table(data)
    except ParseError as exc:
        assert exc.reason == "snp.cert_table_malformed"
        return
    for _guid, blob in table.entries:
        assert blob


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.uuids().filter(lambda u: u.int != 0), st.binary(min_size=1, max_size=64), max_size=8
    )
)
def test_cert_table_encoding_roundtrips(entries: dict[uuid.UUID, bytes]) -> None:
    items = list(entries.items())
    assert parse_cert_table(encode_cert_table(items)).entries == tuple(items)
