"""Gramine /dev/attestation source against a fake pseudo-filesystem quoting with the test PKI."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.collector.sources.gramine import MAX_QUOTE, GramineSource
from services.mesh import events
from services.mesh.errors import AttestmeshError, ConfigError, ParseError, VerificationError
from services.testing.fakes import FakeGramine, dcap_collateral
from services.testing.intel_pki import IntelTestPki, enclave_report, sgx_quote, td_quote
from services.verifier.families.base import Status, VerifyOptions
from services.verifier.families.sgx import SgxVerifier
from services.verifier.trust import TrustStore

NOW = datetime(2025, 3, 1, tzinfo=UTC)
REPORT_DATA = hashlib.sha512(b"nonce || key").digest()
PKI = IntelTestPki(now=NOW)
PLATFORM = PKI.platform()


def gramine(tmp_path: Path, **options: Any) -> tuple[FakeGramine, GramineSource]:
    fake = FakeGramine(tmp_path / "dev/attestation", PLATFORM, **options)
    return fake, GramineSource(fake.root, files=fake)


def test_sgx_quote_verifies(tmp_path: Path) -> None:
    fake, source = gramine(tmp_path)
    assert source.family == "sgx" and not source.simulated
    evidence = source.collect(REPORT_DATA)
    assert isinstance(evidence, events.SgxEvidence) and fake.report_data == REPORT_DATA
    options = VerifyOptions(
        now=NOW,
        trust=TrustStore.load(None, test_dir=PKI.write_trust_dir(tmp_path / "roots").parents[1]),
        collateral=dcap_collateral(PKI, PLATFORM, tdx=False),
        expected_report_data=REPORT_DATA,
    )
    appraisal = SgxVerifier().appraise(evidence.quote, options)
    assert appraisal.status == Status.AFFIRMING and appraisal.verified, appraisal.reasons
    assert appraisal.claims["report_data"] == REPORT_DATA.hex()
    assert not fake.paths


def test_attestation_type_other_than_dcap_is_refused_before_writing(tmp_path: Path) -> None:
    fake, source = gramine(tmp_path, attestation_type="none")
    assert source.attestation_type() == "none"
    with pytest.raises(ConfigError) as caught:
        source.collect(REPORT_DATA)
    assert caught.value.reason == "collector.gramine_not_dcap"
    assert fake.report_data == bytes(64) and not fake.paths


@pytest.mark.parametrize(
    ("quote", "error", "reason"),
    [
        (b"\x01" * (MAX_QUOTE + 1), ParseError, "collector.blob_too_large"),
        (b"\x03\x00" + bytes(100), ParseError, "collector.bad_report"),
        (sgx_quote(PLATFORM, enclave_report(report_data=bytes(64))), VerificationError,
         "collector.report_data_mismatch"),
        (td_quote(PLATFORM), ParseError, "collector.bad_report"),
    ],
    ids=["oversized", "garbage", "other-report-data", "tdx-quote"],
)  # fmt: skip
def test_wrong_quotes_are_refused(
    tmp_path: Path, quote: bytes, error: type[AttestmeshError], reason: str
) -> None:
    fake, source = gramine(tmp_path)
    fake.quote_override = quote
    with pytest.raises(error) as caught:
        source.collect(REPORT_DATA)
    assert caught.value.reason == reason and not fake.paths


def test_symlinked_quote_is_not_followed(tmp_path: Path) -> None:
    fake, source = gramine(tmp_path)
    (fake.root / "quote").unlink()
    (fake.root / "quote").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(AttestmeshError) as caught:
        source.collect(REPORT_DATA)
    assert caught.value.reason == "collector.unsafe_path"


def test_outside_gramine(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        GramineSource(tmp_path / "absent").collect(REPORT_DATA)
    assert caught.value.reason == "collector.gramine_unavailable"
