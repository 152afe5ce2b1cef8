"""TPM2 structure parsing: exact layouts, bounds, property tests (bytes in -> ParseError only)."""

from __future__ import annotations

import base64
import contextlib
import json
import struct
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.mesh.errors import ParseError
from services.testing.tpm_pki import EventLogBuilder, QuoteKnobs, TestTpm
from services.verifier.families.base import Status, VerifyOptions
from services.verifier.families.tpm import (
    HashAlg,
    SigAlg,
    TpmVerifier,
    encode_attest,
    encode_signature,
    parse_attest,
    parse_evidence,
    parse_signature,
)
from services.verifier.families.tpm.eventlog import parse_event_log, replay
from services.verifier.trust import TrustStore

TPM = TestTpm()
ECC = TestTpm(ecc=True, label="ecc")
ATTEST, SIGNATURE = TPM.quote(b"nonce")
EVIDENCE = TPM.evidence(b"nonce")
OPTIONS = VerifyOptions(now=datetime(2025, 1, 1, tzinfo=UTC), trust=TrustStore())


def test_attest_layout_and_round_trip() -> None:
    attest = parse_attest(ATTEST)
    assert ATTEST[:6] == bytes.fromhex("ff5443478018")
    assert attest.extra_data == b"nonce"
    assert attest.pcr_select[0].hash is HashAlg.SHA256
    assert attest.pcr_select[0].indices == tuple(range(24))
    assert attest.raw == ATTEST
    assert encode_attest(attest) == ATTEST


@pytest.mark.parametrize("tpm", [TPM, ECC], ids=["rsa", "ecc"])
def test_signature_round_trip(tpm: TestTpm) -> None:
    _, raw = tpm.quote(b"n", QuoteKnobs(sig_hash=HashAlg.SHA384))
    signature = parse_signature(raw)
    assert signature.hash is HashAlg.SHA384
    assert signature.sig_alg is (SigAlg.ECDSA if tpm is ECC else SigAlg.RSASSA)
    assert encode_signature(signature) == raw


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda b: b"\x00" + b[1:], "tpm.bad_magic"),
        (lambda b: b[:4] + b"\x80\x17" + b[6:], "tpm.not_a_quote"),
        (lambda b: b[:-1], "tpm.truncated"),
        (lambda b: b + b"\x00", "tpm.trailing_bytes"),
        (lambda b: b[:6] + b"\x00\x50" + b[8:], "tpm.size_exceeded"),
        (lambda b: b + bytes(2000), "tpm.size_exceeded"),
    ],
    ids=["magic", "type", "truncated", "trailing", "name-too-long", "too-large"],
)
def test_attest_rejections(mutate: object, code: str) -> None:
    assert callable(mutate)
    with pytest.raises(ParseError) as info:
        parse_attest(mutate(ATTEST))
    assert info.value.reason == code


def test_attest_field_bounds() -> None:
    attest = parse_attest(ATTEST)
    signer_end = 6 + 2 + len(attest.qualified_signer)
    safe_at = signer_end + 2 + len(attest.extra_data) + 16
    with pytest.raises(ParseError, match="clockInfo.safe"):
        parse_attest(ATTEST[:safe_at] + b"\x02" + ATTEST[safe_at + 1 :])
    count_at = safe_at + 1 + 8
    with pytest.raises(ParseError) as info:
        parse_attest(ATTEST[:count_at] + struct.pack(">I", 17) + ATTEST[count_at + 4 :])
    assert info.value.reason == "tpm.size_exceeded"
    with pytest.raises(ParseError) as info:
        parse_attest(ATTEST[: count_at + 4] + b"\x00\x0b\x05" + ATTEST[count_at + 7 :])
    assert info.value.reason == "tpm.size_exceeded"
    with pytest.raises(ParseError) as info:
        parse_attest(ATTEST[: count_at + 4] + b"\x00\x12" + ATTEST[count_at + 6 :])
    assert info.value.reason == "tpm.unsupported_hash"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\x00\x05\x00\x0b\x00\x00", "tpm.unsupported_signature"),
        (b"\x00\x14\x00\x99\x00\x00", "tpm.unsupported_hash"),
        (b"\x00\x14\x00\x0b\x02\x01" + bytes(513), "tpm.size_exceeded"),
        (b"\x00\x18\x00\x0b\x00\x01\x01", "tpm.truncated"),
        (SIGNATURE + b"\x00", "tpm.trailing_bytes"),
    ],
)
def test_signature_rejections(raw: bytes, code: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_signature(raw)
    assert info.value.reason == code


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"ak_public": "AAAA"}, "tpm.ak_public_invalid"),
        ({"ak_public": "not base64!"}, "tpm.evidence_invalid"),
        ({"tpm_quote": {"message": "", "signature": "", "pcrs": []}}, "tpm.truncated"),
        ({"tpm_quote": None}, "tpm.evidence_invalid"),
        ({"event_log": 5}, "tpm.evidence_invalid"),
    ],
)
def test_evidence_rejections(change: dict[str, object], code: str) -> None:
    document = json.loads(EVIDENCE)
    document.update(change)
    with pytest.raises(ParseError) as info:
        parse_evidence(json.dumps(document).encode())
    assert info.value.reason == code
    assert TpmVerifier().appraise(json.dumps(document).encode(), OPTIONS).status is (
        Status.CONTRAINDICATED
    )


def test_evidence_pcrs_must_be_hex_and_unknown_fields_are_ignored() -> None:
    document = json.loads(EVIDENCE)
    document["future_field"] = {"anything": 1}
    assert parse_evidence(json.dumps(document).encode()).pcrs == tuple(TPM.pcrs)
    document["tpm_quote"]["pcrs"][0] = "zz"
    with pytest.raises(ParseError, match="not hex"):
        parse_evidence(json.dumps(document).encode())


def test_event_log_layout() -> None:
    log = EventLogBuilder(locality=3).measure(0, 0x8, b"v1").measure(7, 0x80000001, b"sb")
    parsed = parse_event_log(log.encode())
    assert parsed.digest_sizes == {HashAlg.SHA1: 20, HashAlg.SHA256: 32}
    assert parsed.startup_locality == 3
    assert [e.type_name for e in parsed.events] == [
        "EV_NO_ACTION", "EV_S_CRTM_VERSION", "EV_EFI_VARIABLE_DRIVER_CONFIG"]  # fmt: skip
    quoted = dict(enumerate(log.pcrs()))
    assert replay(parsed, HashAlg.SHA1, dict(enumerate(log.pcrs(HashAlg.SHA1)))).mismatched == []
    assert replay(parsed, HashAlg.SHA256, quoted).values[0][-1:] != b"\x00"
    with pytest.raises(ParseError, match="Spec ID"):
        parse_event_log(log.encode()[:32] + b"X" + log.encode()[33:])
    with pytest.raises(ParseError, match="bank"):
        replay(parsed, HashAlg.SHA384, quoted)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_parse_errors(data: bytes) -> None:
    for parser in (parse_attest, parse_signature, parse_event_log, parse_evidence):
        with contextlib.suppress(ParseError):
            parser(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(min_value=0))
def test_mutated_quotes_only_raise_parse_errors(patch: bytes, at: int) -> None:
    for blob, parser in ((ATTEST, parse_attest), (SIGNATURE, parse_signature)):
        offset = at % len(blob)
        mutated = blob[:offset] + patch + blob[offset + len(patch) :]
        with contextlib.suppress(ParseError):
            parser(mutated)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["message", "signature", "ak_public"]),
    st.binary(min_size=1, max_size=16),
    st.integers(min_value=0),
)
def test_appraise_never_raises(part: str, patch: bytes, at: int) -> None:
    document = json.loads(EVIDENCE)
    holder = document if part == "ak_public" else document["tpm_quote"]
    raw = base64.b64decode(holder[part])
    offset = at % len(raw)
    holder[part] = base64.b64encode(raw[:offset] + patch + raw[offset + len(patch) :]).decode()
    appraisal = TpmVerifier().appraise(json.dumps(document).encode(), OPTIONS)
    assert appraisal.status is not Status.AFFIRMING


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_appraise_never_raises_on_garbage(data: bytes) -> None:
    assert TpmVerifier().appraise(data, OPTIONS).status is Status.CONTRAINDICATED


def test_event_claims_are_capped_so_the_ear_fits_a_message() -> None:
    from services.verifier.families.tpm.eventlog import MAX_EVENT_CLAIMS, event_claims

    builder = EventLogBuilder()
    for index in range(MAX_EVENT_CLAIMS + 100):
        builder.measure(index % 8, 0xD, f"event {index}".encode())
    parsed = parse_event_log(builder.encode())
    assert len(parsed.events) == MAX_EVENT_CLAIMS + 100
    claims = event_claims(parsed, HashAlg.SHA256)
    assert len(claims) == MAX_EVENT_CLAIMS
    assert len(json.dumps(claims)) < 128 * 1024
