"""HCL report, runtime data and Azure evidence: exact layout, every rejection, properties."""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.mesh.errors import ParseError
from services.testing.amd_pki import rsa_key
from services.testing.azure_hcl import AzureSnpCvm, runtime_data, td_report
from services.testing.intel_pki import TdFields
from services.verifier.families.azure import (
    AzSnpVtpmVerifier,
    AzTdxVtpmVerifier,
    HashType,
    ReportType,
    encode_hcl_report,
    parse_hcl_report,
)
from services.verifier.families.azure.evidence import parse_evidence
from services.verifier.families.azure.hcl import REQUEST_OFFSET, VARIABLE_DATA_OFFSET
from services.verifier.families.azure.runtime import parse_runtime_data
from services.verifier.families.azure.tdx import td_report_fields
from services.verifier.families.base import Status, VerifyOptions
from services.verifier.trust import TrustStore

AK = rsa_key("azure:hcl").public_key()
RUNTIME = runtime_data(AK)
HW = bytes(range(256)) * 4 + bytes(160)
HCL = encode_hcl_report(HW, RUNTIME)
OPTIONS = VerifyOptions(now=datetime(2025, 1, 1, tzinfo=UTC), trust=TrustStore())
SNP_EVIDENCE = AzureSnpCvm(label="hcl").evidence(bytes(64))


def test_layout_and_offsets() -> None:
    assert HCL[:4] == b"HCLA" and len(HCL) == 2600
    assert REQUEST_OFFSET == 0x4C0 and VARIABLE_DATA_OFFSET == 0x4D4
    report = parse_hcl_report(HCL)
    assert report.version == 1 and report.report_type is ReportType.SNP
    assert report.hash_type is HashType.SHA256
    assert report.snp_report == HW and report.variable_data == RUNTIME
    assert HCL[VARIABLE_DATA_OFFSET : VARIABLE_DATA_OFFSET + 8] == b'{"keys":'
    (report_size,) = struct.unpack_from("<I", HCL, 8)
    assert report_size == VARIABLE_DATA_OFFSET + len(RUNTIME)
    tdx = parse_hcl_report(
        encode_hcl_report(HW[:1024], RUNTIME, report_type=ReportType.TDX, version=2)
    )
    assert tdx.td_report == HW[:1024] and tdx.version == 2
    sha384 = parse_hcl_report(encode_hcl_report(HW, RUNTIME, hash_type=HashType.SHA384))
    assert len(sha384.runtime_data_digest()) == 48


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"HCLA", "az.hcl_malformed"),
        (b"XCLA" + HCL[4:], "az.hcl_malformed"),
        (_patch(HCL, 4, "<I", 3), "az.hcl_unsupported_version"),
        (_patch(HCL, 12, "<I", 1), "az.hcl_malformed"),
        (_patch(HCL, 16, "<I", 5), "az.hcl_status"),
        (_patch(HCL, 20, "<I", 1), "az.hcl_malformed"),
        (_patch(HCL, REQUEST_OFFSET + 8, "<I", 3), "az.hcl_report_type"),
        (_patch(HCL, REQUEST_OFFSET + 12, "<I", 9), "az.hcl_malformed"),
        (_patch(HCL, REQUEST_OFFSET, "<I", 7), "az.hcl_malformed"),
        (_patch(HCL, 8, "<I", 7), "az.hcl_malformed"),
        (HCL[:-200] + b"\x01" + HCL[-199:], "az.hcl_malformed"),
        (HCL[: VARIABLE_DATA_OFFSET + 10], "az.hcl_malformed"),
        (HCL + bytes(20000), "az.hcl_malformed"),
        (encode_hcl_report(b"\x01" * 1184, RUNTIME, report_type=ReportType.TDX),
         "az.hcl_malformed"),
    ],
    ids=["short", "signature", "version", "request-type", "status", "reserved", "report-type",
         "hash-type", "data-size", "report-size", "trailing", "truncated", "huge", "td-padding"],
)  # fmt: skip
def test_hcl_rejections(data: bytes, code: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_hcl_report(data)
    assert info.value.reason == code


def test_runtime_data() -> None:
    runtime = parse_runtime_data(RUNTIME)
    assert runtime.ak.public_numbers() == AK.public_numbers()
    assert runtime.user_data == bytes(64)
    assert runtime.vm_configuration["secure-boot"] is True
    document = json.loads(RUNTIME)
    mutations: list[Callable[[dict[str, Any]], object]] = [
        lambda d: d.update(keys=[]),
        lambda d: d["keys"][0].update(kty="EC"),
        lambda d: d["keys"][0].update(n="***"),
        lambda d: d["keys"][0].update(n="AQAB"),
        lambda d: d["keys"][0].update(e="AA"),
        lambda d: d.update({"user-data": "xyz"}),
        lambda d: d["keys"].append(dict(d["keys"][0])),
    ]
    for mutate in mutations:
        changed = json.loads(RUNTIME)
        mutate(changed)
        with pytest.raises(ParseError) as info:
            parse_runtime_data(json.dumps(changed).encode())
        assert info.value.reason == "az.runtime_data_invalid"
    assert document == json.loads(RUNTIME)


def test_td_report_fields() -> None:
    fields = TdFields()
    report = td_report(fields, b"\x42" * 64)
    parsed = td_report_fields(report)
    assert parsed["mrtd"] == fields.mr_td.hex()
    assert parsed["rtmr3"] == fields.rtmrs[3].hex()
    assert parsed["report_data"] == ("42" * 64)
    with pytest.raises(ParseError):
        td_report_fields(b"\x00" + report[1:])


def test_evidence_versions_and_rejections() -> None:
    document = json.loads(SNP_EVIDENCE)
    assert parse_evidence(SNP_EVIDENCE, tdx=False).version == 1
    for change in ({"version": 7}, {"hcl_report": "@@@"}, {"vcek": "a"},
                   {"tpm_quote": {"message": "0g", "signature": "", "pcrs": []}}):  # fmt: skip
        changed = {**document, **change}
        with pytest.raises(ParseError) as info:
            parse_evidence(json.dumps(changed).encode(), tdx=False)
        assert info.value.reason == "az.evidence_invalid"
    with pytest.raises(ParseError):
        parse_evidence(json.dumps({"quote": {}, "report": [256], "vcek": ""}).encode(), tdx=False)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_random_bytes_only_raise_parse_errors(data: bytes) -> None:
    for parser in (parse_hcl_report, parse_runtime_data):
        with contextlib.suppress(ParseError):
            parser(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0))
def test_mutated_hcl_reports_only_raise_parse_errors(patch: bytes, at: int) -> None:
    offset = at % len(HCL)
    with contextlib.suppress(ParseError):
        parse_hcl_report(HCL[:offset] + patch + HCL[offset + len(patch) :])


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=32), st.integers(min_value=0))
def test_appraise_never_raises_on_mutated_evidence(patch: bytes, at: int) -> None:
    offset = at % len(SNP_EVIDENCE)
    mutated = SNP_EVIDENCE[:offset] + patch + SNP_EVIDENCE[offset + len(patch) :]
    for verifier in (AzSnpVtpmVerifier(), AzTdxVtpmVerifier()):
        assert verifier.appraise(mutated, OPTIONS).status is Status.CONTRAINDICATED


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_appraise_never_raises_on_garbage(data: bytes) -> None:
    for verifier in (AzSnpVtpmVerifier(), AzTdxVtpmVerifier()):
        assert verifier.appraise(data, OPTIONS).status is Status.CONTRAINDICATED
