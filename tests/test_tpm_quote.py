"""TPM quote verification against the test PKI: AK chains, schemes, PCRs, nonce, event logs."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.mesh.errors import PolicyError
from services.testing.tpm_pki import (
    CertOverride,
    EventLogBuilder,
    QuoteKnobs,
    TestTpm,
    TpmTestPki,
    with_pcrs,
)
from services.verifier.families.base import Appraisal, Status, VerifyOptions
from services.verifier.families.tpm import HashAlg, TpmPolicy, TpmVerifier
from services.verifier.families.tpm.evidence import encode_evidence
from services.verifier.trust import TrustStore

NOW = datetime(2025, 6, 1, 12, tzinfo=UTC)
PKI = TpmTestPki(now=NOW)
TPM = TestTpm()
ECC = TestTpm(ecc=True, label="ecc")
NONCE = hashlib.sha512(b"nonce" + b"key").digest()
AK_CERT = PKI.issue_ak_cert(TPM.ak.public_key())


def appraise(
    evidence: bytes,
    *,
    policy: TpmPolicy | None = None,
    trust: TrustStore | None = None,
    expected: bytes | None = NONCE,
    collateral: dict[str, bytes] | None = None,
) -> Appraisal:
    options = VerifyOptions(
        now=NOW,
        trust=trust if trust is not None else PKI.trust_store(),
        collateral=collateral or {},
        expected_report_data=expected,
    )
    return TpmVerifier(policy).appraise(evidence, options)


def codes(appraisal: Appraisal) -> list[str]:
    return [r.code for r in appraisal.reasons]


def test_certified_ak_is_affirming_with_claims() -> None:
    result = appraise(TPM.evidence(NONCE, ak_cert=AK_CERT))
    assert result.status is Status.AFFIRMING and result.verified, result.reasons
    claims = result.claims
    assert claims["ak_trust"] == "certificate"
    assert claims["trust_anchor"] == "test:tpm:test_root"
    assert claims["nonce"] == NONCE.hex()
    assert claims["pcr_bank"] == "sha256"
    assert claims["pcr5"] == (bytes([5]) * 32).hex()
    assert claims["firmware_version"] == "2024010100010002"
    assert claims["ak_public_sha256"] == hashlib.sha256(TPM.ak_public).hexdigest()
    assert result.trust_vector["hardware"] == 2 and result.trust_vector["instance-identity"] == 2
    assert any(c.name == "nonce" and "exact" in c.detail for c in result.checks)


def test_ak_certificate_as_collateral() -> None:
    result = appraise(TPM.evidence(NONCE), collateral={"ak_cert.der": AK_CERT})
    assert result.status is Status.AFFIRMING and result.claims["ak_trust"] == "certificate"


@pytest.mark.parametrize(
    ("override", "code"),
    [
        (CertOverride(wrong_issuer=True), "tpm.ak_cert_chain_invalid"),
        (CertOverride(expired=True), "tpm.ak_cert_expired"),
        (CertOverride(not_yet_valid=True), "tpm.ak_cert_not_yet_valid"),
        (CertOverride(wrong_key=True), "tpm.ak_cert_key_mismatch"),
        (CertOverride(ca=True), "tpm.ak_cert_not_for_signing"),
        (CertOverride(digital_signature=False), "tpm.ak_cert_not_for_signing"),
    ],
)
def test_wrong_ak_certificates(override: CertOverride, code: str) -> None:
    cert = PKI.issue_ak_cert(TPM.ak.public_key(), override)
    result = appraise(TPM.evidence(NONCE, ak_cert=cert))
    assert codes(result) == [code]
    assert result.status is Status.CONTRAINDICATED and not result.verified
    assert result.claims["ak_trust"] == "invalid"


@pytest.mark.parametrize(
    ("pki", "code"),
    [
        (TpmTestPki(now=NOW, intermediate=CertOverride(expired=True)), "tpm.ak_cert_expired"),
        (TpmTestPki(now=NOW, intermediate=CertOverride(wrong_issuer=True)),
         "tpm.ak_cert_chain_invalid"),
        (TpmTestPki(now=NOW, root=CertOverride(not_yet_valid=True)), "tpm.ak_cert_not_yet_valid"),
        (TpmTestPki(now=NOW, intermediate=CertOverride(ca=False)), "tpm.ak_cert_chain_invalid"),
    ],
)  # fmt: skip
def test_wrong_ak_ca_chains(pki: TpmTestPki, code: str) -> None:
    cert = pki.issue_ak_cert(TPM.ak.public_key())
    result = appraise(TPM.evidence(NONCE, ak_cert=cert), trust=pki.trust_store())
    assert code in codes(result) and result.status is Status.CONTRAINDICATED


def test_ak_certificate_from_an_untrusted_ca() -> None:
    result = appraise(TPM.evidence(NONCE, ak_cert=AK_CERT), trust=TrustStore())
    assert codes(result) == ["tpm.ak_cert_untrusted"]
    malformed = appraise(TPM.evidence(NONCE, ak_cert=b"\x30\x03\x02\x01\x01"))
    assert codes(malformed) == ["tpm.ak_cert_malformed"]


def test_test_anchor_can_be_refused() -> None:
    result = appraise(
        TPM.evidence(NONCE, ak_cert=AK_CERT), policy=TpmPolicy(allow_test_anchor=False)
    )
    assert codes(result) == ["tpm.test_anchor_not_allowed"] and result.verified


def test_trust_dir_round_trip(tmp_path: Path) -> None:
    store = TrustStore.load(None, test_dir=PKI.write_trust_dir(tmp_path))
    result = appraise(TPM.evidence(NONCE, ak_cert=AK_CERT), trust=store)
    assert result.status is Status.AFFIRMING
    assert result.claims["trust_anchor"] == "test:tpm:test_root"


KNOBS = {
    "rsassa": QuoteKnobs(),
    "rsapss": QuoteKnobs(pss=True),
    "sha384": QuoteKnobs(sig_hash=HashAlg.SHA384),
    "pss-sha512": QuoteKnobs(sig_hash=HashAlg.SHA512, pss=True),
    "sig-sha1": QuoteKnobs(sig_hash=HashAlg.SHA1),
    "bank-sha1": QuoteKnobs(bank=HashAlg.SHA1),
    "bank-sha384": QuoteKnobs(bank=HashAlg.SHA384, sig_hash=HashAlg.SHA384),
    "subset": QuoteKnobs(indices=(0, 4, 7, 11)),
}
SCHEMES = [
    pytest.param(tpm, knobs, id=f"{kind}-{name}")
    for kind, tpm in (("rsa", TPM), ("ecc", ECC))
    for name, knobs in KNOBS.items()
    if not (tpm is ECC and knobs.pss)  # RSAPSS needs an RSA AK
]


@pytest.mark.parametrize(("tpm", "knobs"), SCHEMES)
def test_signature_schemes_and_banks(tpm: TestTpm, knobs: QuoteKnobs) -> None:
    pin = frozenset({hashlib.sha256(tpm.ak_public).digest()})
    result = appraise(tpm.evidence(NONCE, knobs), policy=TpmPolicy(trusted_ak_sha256=pin))
    assert result.status is Status.AFFIRMING, result.reasons
    assert result.claims["pcr_bank"] == knobs.bank.label
    assert result.claims["signature_hash"] == knobs.sig_hash.label
    quoted = sorted(int(k[3:]) for k in result.claims if k[3:].isdigit() and k.startswith("pcr"))
    assert quoted == sorted(knobs.indices)


def test_selected_values_in_selection_order() -> None:
    knobs = QuoteKnobs(indices=(2, 3, 9))
    attest, signature = TPM.quote(NONCE, knobs)
    values = [TPM.pcrs[i] for i in knobs.indices]
    result = appraise(encode_evidence(TPM.ak_public, attest, signature, values))
    assert codes(result) == ["tpm.ak_not_anchored"]
    assert result.claims["pcr9"] == TPM.pcrs[9].hex()
    wrong = appraise(encode_evidence(TPM.ak_public, attest, signature, values[:2]))
    assert codes(wrong)[0] == "tpm.pcr_values_invalid"


def test_pcr_digest_mismatch() -> None:
    forged = list(TPM.pcrs)
    forged[7] = b"\x77" * 32
    result = appraise(TPM.evidence(NONCE, ak_cert=AK_CERT, pcrs=forged))
    assert codes(result) == ["tpm.pcr_digest_mismatch"] and not result.verified
    signed_wrong = appraise(TPM.evidence(NONCE, QuoteKnobs(digest=bytes(32)), ak_cert=AK_CERT))
    assert codes(signed_wrong) == ["tpm.pcr_digest_mismatch"]
    short = appraise(TPM.evidence(NONCE, ak_cert=AK_CERT, pcrs=[v[:20] for v in TPM.pcrs]))
    assert codes(short) == ["tpm.pcr_values_invalid"]


def test_wrong_signer_and_scheme() -> None:
    other = TestTpm(label="other")
    result = appraise(TPM.evidence(NONCE, QuoteKnobs(signer=other.ak), ak_cert=AK_CERT))
    assert codes(result) == ["tpm.signature_invalid"] and not result.verified
    attest, signature = ECC.quote(NONCE)
    mixed = appraise(encode_evidence(TPM.ak_public, attest, signature, ECC.pcrs))
    assert "tpm.signature_scheme_mismatch" in codes(mixed)


def test_nonce_binding() -> None:
    wrong = appraise(TPM.evidence(b"\x00" * 64, ak_cert=AK_CERT))
    assert codes(wrong) == ["tpm.nonce_mismatch"] and wrong.verified
    assert wrong.status is Status.CONTRAINDICATED
    compact = appraise(TPM.evidence(hashlib.sha256(NONCE).digest(), ak_cert=AK_CERT))
    assert compact.status is Status.AFFIRMING
    assert any(c.name == "nonce" and "compact" in c.detail for c in compact.checks)
    short = appraise(TPM.evidence(b"abc", ak_cert=AK_CERT), expected=b"abc".ljust(64, b"\0"))
    assert any(c.name == "nonce" and "zero-padded" in c.detail for c in short.checks)
    other = appraise(TPM.evidence(b"abd", ak_cert=AK_CERT), expected=b"abc".ljust(64, b"\0"))
    assert codes(other) == ["tpm.nonce_mismatch"]
    unchecked = appraise(TPM.evidence(b"anything", ak_cert=AK_CERT), expected=None)
    assert unchecked.status is Status.AFFIRMING


def test_reference_pcrs_and_banks() -> None:
    evidence = TPM.evidence(NONCE, ak_cert=AK_CERT)
    good = TpmPolicy(reference_pcrs={7: frozenset({TPM.pcrs[7]}), 0: frozenset({TPM.pcrs[0]})})
    result = appraise(evidence, policy=good)
    assert result.status is Status.AFFIRMING and result.trust_vector["executables"] == 2
    bad = appraise(evidence, policy=TpmPolicy(reference_pcrs={7: frozenset({b"\x01" * 32})}))
    assert codes(bad) == ["tpm.pcr_not_allowed"] and bad.trust_vector["executables"] == 96
    banks = appraise(evidence, policy=TpmPolicy(allowed_pcr_banks=frozenset({"sha384"})))
    assert codes(banks) == ["tpm.pcr_bank_not_allowed"]


def test_event_log_replays_to_the_quote() -> None:
    log = EventLogBuilder(locality=3)
    log.measure(0, 0x8, b"crtm").measure(7, 0x80000001, b"SecureBoot").measure(4, 0xD, b"grub")
    tpm = with_pcrs(TestTpm(label="logged"), log)
    cert = PKI.issue_ak_cert(tpm.ak.public_key())
    result = appraise(tpm.evidence(NONCE, ak_cert=cert, event_log=log.encode()))
    assert result.status is Status.AFFIRMING, result.reasons
    assert result.claims["event_log_pcrs"] == [0, 4, 7]
    events = result.claims["events"]
    assert events[0]["type"] == "EV_NO_ACTION"
    assert events[1] == {"pcr": 0, "type": "EV_S_CRTM_VERSION",
                         "digest": hashlib.sha256(b"crtm").hexdigest(), "size": 4,
                         "data": b"crtm".hex()}  # fmt: skip
    assert result.trust_vector["executables"] == 2
    other = EventLogBuilder(locality=3).measure(0, 0x8, b"evil crtm")
    forged = appraise(tpm.evidence(NONCE, ak_cert=cert, event_log=other.encode()))
    assert codes(forged) == ["tpm.eventlog_mismatch"] and forged.verified
    broken = appraise(tpm.evidence(NONCE, ak_cert=cert, event_log=log.encode()[:-3]))
    assert codes(broken) == ["tpm.eventlog_malformed"]
    required = appraise(tpm.evidence(NONCE, ak_cert=cert), policy=TpmPolicy(require_event_log=True))
    assert codes(required) == ["tpm.eventlog_missing"]


def test_policy_from_mapping() -> None:
    policy = TpmPolicy.from_mapping(
        {
            "trusted_ak_sha256": ["aa" * 32],
            "reference_pcrs": {"7": ["bb" * 32]},
            "allowed_pcr_banks": ["SHA256"],
            "require_event_log": True,
        }
    )
    assert policy.reference_pcrs == {7: frozenset({b"\xbb" * 32})}
    assert policy.allowed_pcr_banks == frozenset({"sha256"})
    bads: list[dict[str, Any]] = [
        {"nope": 1},
        {"trusted_ak_sha256": ["aa"]},
        {"reference_pcrs": {"40": []}},
        {"allowed_pcr_banks": ["md5"]},
        {"require_ak_cert": "yes"},
        {"reference_pcrs": {"1": ["zz"]}},
    ]
    for bad in bads:
        with pytest.raises(PolicyError):
            TpmPolicy.from_mapping(bad)
