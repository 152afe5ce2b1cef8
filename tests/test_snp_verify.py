"""SNP verification against the test PKI: each chain override gives its reason; policy; binding."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.collector.simulator.snp import DEFAULT_TCB, SnpSimulator, build_report
from services.mesh.errors import CollateralError
from services.testing.amd_pki import AmdTestPki, CertOverride, der_ia5, der_integer
from services.verifier.families.base import (
    TRUST_CLAIMS,
    TV_AFFIRMING,
    TV_CONTRAINDICATED,
    TV_NO_CLAIM,
    Appraisal,
    Status,
    VerifyOptions,
)
from services.verifier.families.snp import (
    Product,
    SigningKey,
    SnpPolicy,
    SnpVerifier,
    TcbVersion,
    parse_evidence,
    verify,
)
from services.verifier.families.snp import certs as snp_certs
from services.verifier.families.snp.certtable import VCEK_GUID, encode_cert_table
from services.verifier.families.snp.parse import REPORT_SIZE
from services.verifier.trust import TrustStore

NOW = datetime(2025, 3, 1, tzinfo=UTC)
NONCE = bytes(range(64))
OTHER_TCB = TcbVersion(bootloader=1, tee=0, snp=1, microcode=1)


def _store(pki: AmdTestPki, root: Path) -> TrustStore:
    return TrustStore.load(None, test_dir=pki.write_trust_dir(root))


def _appraise(
    sim: SnpSimulator,
    store: TrustStore,
    *,
    snp_policy: SnpPolicy | None = None,
    attach: bool = True,
    now: datetime = NOW,
    expected: bytes | None = NONCE,
    **fields: object,
) -> Appraisal:
    evidence = sim.evidence(NONCE, attach_certs=attach, **fields)
    options = VerifyOptions(
        now=now,
        trust=store,
        collateral={} if attach else sim.collateral(),
        expected_report_data=expected,
    )
    return SnpVerifier(snp_policy).appraise(evidence, options)


def _codes(appraisal: Appraisal) -> list[str]:
    return [r.code for r in appraisal.reasons]


@pytest.fixture(scope="module")
def milan(tmp_path_factory: pytest.TempPathFactory) -> tuple[AmdTestPki, TrustStore]:
    pki = AmdTestPki(Product.MILAN, now=NOW)
    return pki, _store(pki, tmp_path_factory.mktemp("milan"))


@pytest.mark.parametrize("product", list(Product))
@pytest.mark.parametrize("signing_key", [SigningKey.VCEK, SigningKey.VLEK], ids=["vcek", "vlek"])
@pytest.mark.parametrize("attach", [True, False], ids=["cert-table", "collateral"])
def test_simulated_evidence_affirms(
    product: Product, signing_key: SigningKey, attach: bool, tmp_path: Path
) -> None:
    pki = AmdTestPki(product, now=NOW)
    store = _store(pki, tmp_path)
    for version in (3, 5) if product is Product.TURIN else (2, 3, 5):
        sim = SnpSimulator(pki, signing_key=signing_key, version=version)
        appraisal = _appraise(sim, store, attach=attach)
        assert appraisal.status is Status.AFFIRMING, appraisal.reasons
        assert appraisal.verified
        claims = appraisal.claims
        assert claims["product"] == product.value and claims["version"] == version
        assert claims["signing_key"] == signing_key.name.lower()
        assert claims["trust_anchor"] == f"test:amd:{product.value}"
        assert claims["report_data"] == NONCE.hex()
        assert ("fmc" in claims["tcb"]["reported"]) is (product is Product.TURIN)
        assert set(appraisal.trust_vector) == set(TRUST_CLAIMS)
        assert appraisal.trust_vector["hardware"] == TV_AFFIRMING
        assert appraisal.trust_vector["executables"] == TV_NO_CLAIM
        assert all(c.ok for c in appraisal.checks), appraisal.checks


@dataclass(frozen=True)
class Case:
    """One chain-builder mutation and the reason it must produce."""

    name: str
    reason: str
    chain: dict[str, CertOverride] = field(default_factory=dict)
    vek: CertOverride = field(default_factory=CertOverride)
    signing_key: SigningKey = SigningKey.VCEK


CASES = [
    Case("ask-wrong-key", "snp.vcek_chain_invalid", chain={"ask": CertOverride(wrong_key=True)}),
    Case("ask-expired", "snp.cert_expired", chain={"ask": CertOverride(expired=True)}),
    Case(
        "ask-not-yet-valid",
        "snp.cert_not_yet_valid",
        chain={"ask": CertOverride(not_yet_valid=True)},
    ),
    Case("ark-expired", "snp.cert_expired", chain={"ark": CertOverride(expired=True)}),
    Case("vcek-wrong-issuer", "snp.vcek_chain_invalid", vek=CertOverride(wrong_issuer=True)),
    Case("vcek-wrong-key", "snp.report_signature_invalid", vek=CertOverride(wrong_key=True)),
    Case("vcek-expired", "snp.cert_expired", vek=CertOverride(expired=True)),
    Case("vcek-not-yet-valid", "snp.cert_not_yet_valid", vek=CertOverride(not_yet_valid=True)),
    Case(
        "vcek-missing-bl-spl",
        "snp.vcek_oid_invalid",
        vek=CertOverride(drop_oids=frozenset({snp_certs.OID_BL_SPL})),
    ),
    Case(
        "vcek-missing-ucode-spl",
        "snp.vcek_oid_invalid",
        vek=CertOverride(drop_oids=frozenset({snp_certs.OID_UCODE_SPL})),
    ),
    Case(
        "vcek-missing-product",
        "snp.vcek_oid_invalid",
        vek=CertOverride(drop_oids=frozenset({snp_certs.OID_PRODUCT_NAME})),
    ),
    Case(
        "vcek-missing-hwid",
        "snp.signing_key_mismatch",
        vek=CertOverride(drop_oids=frozenset({snp_certs.OID_HWID})),
    ),
    Case(
        "vcek-spl-wrong-type",
        "snp.vcek_oid_invalid",
        vek=CertOverride(replace_oids={snp_certs.OID_SNP_SPL: der_ia5("8")}),
    ),
    Case(
        "vcek-spl-out-of-range",
        "snp.vcek_oid_invalid",
        vek=CertOverride(replace_oids={snp_certs.OID_SNP_SPL: der_integer(256)}),
    ),
    Case(
        "vcek-wrong-product",
        "snp.product_mismatch",
        vek=CertOverride(replace_oids={snp_certs.OID_PRODUCT_NAME: der_ia5("Genoa-B0")}),
    ),
    Case("vcek-wrong-tcb", "snp.tcb_mismatch", vek=CertOverride(tcb=OTHER_TCB)),
    Case("vcek-wrong-hwid", "snp.chip_id_mismatch", vek=CertOverride(hwid=b"\x42" * 64)),
    Case(
        "asvk-wrong-key",
        "snp.vlek_chain_invalid",
        chain={"asvk": CertOverride(wrong_key=True)},
        signing_key=SigningKey.VLEK,
    ),
    Case(
        "asvk-expired",
        "snp.cert_expired",
        chain={"asvk": CertOverride(expired=True)},
        signing_key=SigningKey.VLEK,
    ),
    Case(
        "vlek-wrong-issuer",
        "snp.vlek_chain_invalid",
        vek=CertOverride(wrong_issuer=True),
        signing_key=SigningKey.VLEK,
    ),
    Case(
        "vlek-wrong-key",
        "snp.report_signature_invalid",
        vek=CertOverride(wrong_key=True),
        signing_key=SigningKey.VLEK,
    ),
    Case(
        "vlek-expired",
        "snp.cert_expired",
        vek=CertOverride(expired=True),
        signing_key=SigningKey.VLEK,
    ),
    Case(
        "vlek-missing-csp-id",
        "snp.signing_key_mismatch",
        vek=CertOverride(drop_oids=frozenset({snp_certs.OID_CSP_ID})),
        signing_key=SigningKey.VLEK,
    ),
    Case(
        "vlek-missing-tee-spl",
        "snp.vlek_oid_invalid",
        vek=CertOverride(drop_oids=frozenset({snp_certs.OID_TEE_SPL})),
        signing_key=SigningKey.VLEK,
    ),
    Case(
        "vlek-wrong-tcb",
        "snp.tcb_mismatch",
        vek=CertOverride(tcb=OTHER_TCB),
        signing_key=SigningKey.VLEK,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("attach", [True, False], ids=["cert-table", "collateral"])
def test_chain_overrides_give_their_reason(case: Case, attach: bool, tmp_path: Path) -> None:
    pki = AmdTestPki(Product.MILAN, now=NOW, **case.chain)
    sim = SnpSimulator(pki, signing_key=case.signing_key, vek_override=case.vek)
    appraisal = _appraise(sim, _store(pki, tmp_path), attach=attach)
    assert appraisal.status is Status.CONTRAINDICATED
    assert not appraisal.verified
    assert case.reason in _codes(appraisal), appraisal.reasons
    assert appraisal.trust_vector["hardware"] == TV_CONTRAINDICATED
    assert any(not c.ok for c in appraisal.checks)


def test_turin_fmc_and_short_hwid(tmp_path: Path) -> None:
    pki = AmdTestPki(Product.TURIN, now=NOW)
    store = _store(pki, tmp_path)
    sim = SnpSimulator(pki)
    assert snp_certs.load_vek(sim.vek_der(), SigningKey.VCEK).hwid == sim.chip_id[:8]
    assert _appraise(sim, store).status is Status.AFFIRMING
    wrong_fmc = replace_tcb(DEFAULT_TCB[Product.TURIN], fmc=9)
    bad = SnpSimulator(pki, vek_override=CertOverride(tcb=wrong_fmc))
    assert "snp.tcb_mismatch" in _codes(_appraise(bad, store))
    no_fmc = SnpSimulator(
        pki, vek_override=CertOverride(drop_oids=frozenset({snp_certs.OID_FMC_SPL}))
    )
    assert "snp.tcb_mismatch" in _codes(_appraise(no_fmc, store))


def replace_tcb(tcb: TcbVersion, **parts: int) -> TcbVersion:
    values = {**tcb.as_dict(), **parts}
    return TcbVersion(**values)


def test_report_from_another_product_is_refused(tmp_path: Path) -> None:
    pki = AmdTestPki(Product.MILAN, now=NOW)
    sim = SnpSimulator(pki)
    appraisal = _appraise(sim, _store(pki, tmp_path), cpuid_mod_id=0x11)
    assert "snp.product_mismatch" in _codes(appraisal)


def test_masked_chip_id_skips_the_hwid_comparison(
    milan: tuple[AmdTestPki, TrustStore],
) -> None:
    pki, store = milan
    appraisal = _appraise(SnpSimulator(pki), store, chip_id=bytes(64))
    assert appraisal.status is Status.AFFIRMING
    assert any(c.name == "chip_id" and "masked" in c.detail for c in appraisal.checks)


def test_unsigned_and_mask_chip_key_reports(milan: tuple[AmdTestPki, TrustStore]) -> None:
    pki, store = milan
    sim = SnpSimulator(pki)
    for fields in ({"signing_key": SigningKey.NONE}, {"mask_chip_key": True}):
        appraisal = _appraise(sim, store, **fields)
        assert appraisal.status is Status.CONTRAINDICATED and not appraisal.verified
        assert _codes(appraisal) == ["snp.report_unsigned"]


def test_signature_algorithm_must_be_ecdsa_p384(milan: tuple[AmdTestPki, TrustStore]) -> None:
    pki, store = milan
    appraisal = _appraise(SnpSimulator(pki), store, signature_algo=2)
    assert "snp.unsupported_signature_algo" in _codes(appraisal)
    assert not appraisal.verified


def test_missing_vek_and_malformed_collateral(milan: tuple[AmdTestPki, TrustStore]) -> None:
    pki, store = milan
    sim = SnpSimulator(pki)
    report = sim.report(NONCE)
    missing = SnpVerifier().appraise(report, VerifyOptions(NOW, store))
    assert _codes(missing) == ["snp.vcek_missing"]
    garbage = SnpVerifier().appraise(report, VerifyOptions(NOW, store, {"vcek.der": b"\x30\x00"}))
    assert _codes(garbage) == ["snp.vcek_malformed"]
    vlek = SnpSimulator(pki, signing_key=SigningKey.VLEK)
    wrong_name = SnpVerifier().appraise(
        vlek.report(NONCE), VerifyOptions(NOW, store, sim.collateral())
    )
    assert _codes(wrong_name) == ["snp.vlek_missing"]


def test_pem_collateral_and_table_precedence(milan: tuple[AmdTestPki, TrustStore]) -> None:
    pki, store = milan
    sim = SnpSimulator(pki)
    pem = SnpVerifier().appraise(
        sim.report(NONCE), VerifyOptions(NOW, store, {"vcek.der": sim.vek.pem})
    )
    assert pem.status is Status.AFFIRMING
    other = SnpSimulator(pki, chip_id=b"\x07" * 64)
    table_wins = SnpVerifier().appraise(
        sim.evidence(NONCE), VerifyOptions(NOW, store, other.collateral())
    )
    assert table_wins.status is Status.AFFIRMING
    foreign_table = encode_cert_table([(VCEK_GUID, other.vek_der())])
    refused = SnpVerifier().appraise(
        sim.report(NONCE) + foreign_table, VerifyOptions(NOW, store, sim.collateral())
    )
    assert {"snp.chip_id_mismatch", "snp.report_signature_invalid"} <= set(_codes(refused))


@pytest.mark.parametrize("signing_key", [SigningKey.VCEK, SigningKey.VLEK], ids=["vcek", "vlek"])
def test_crl_collateral(signing_key: SigningKey, milan: tuple[AmdTestPki, TrustStore]) -> None:
    pki, store = milan
    sim = SnpSimulator(pki, signing_key=signing_key)
    own, other = ("ask", "asvk") if signing_key is SigningKey.VCEK else ("asvk", "ask")
    cases = {
        pki.crl(): [],
        pki.crl(revoke=(other,)): [],
        pki.crl(revoke=(own,)): ["snp.cert_revoked"],
        pki.crl(wrong_issuer=True): ["snp.crl_invalid"],
        pki.crl(next_update=NOW - timedelta(hours=1)): ["snp.crl_stale"],
        b"\x30\x03\x02\x01\x00": ["snp.crl_malformed"],
    }
    for crl, reasons in cases.items():
        appraisal = SnpVerifier().appraise(
            sim.evidence(NONCE), VerifyOptions(NOW, store, {"crl.der": crl})
        )
        assert _codes(appraisal) == reasons
        assert appraisal.verified is (not reasons)
    unchecked = SnpVerifier().appraise(sim.evidence(NONCE), VerifyOptions(NOW, store))
    assert any(c.name == "revocation" and "not checked" in c.detail for c in unchecked.checks)


def test_report_data_binding(milan: tuple[AmdTestPki, TrustStore]) -> None:
    pki, store = milan
    sim = SnpSimulator(pki)
    ok = _appraise(sim, store, expected=NONCE)
    assert ok.status is Status.AFFIRMING
    assert any(c.name == "report_data" and c.ok for c in ok.checks)
    for expected in (b"\x00" * 64, NONCE[:32], NONCE + b"\x00"):
        bad = _appraise(sim, store, expected=expected)
        assert bad.status is Status.CONTRAINDICATED
        assert _codes(bad) == ["snp.report_data_mismatch"]
        assert bad.verified
        assert bad.trust_vector["instance-identity"] == TV_CONTRAINDICATED
        assert NONCE.hex() not in bad.reasons[0].message
    unchecked = _appraise(sim, store, expected=None)
    assert unchecked.status is Status.AFFIRMING


def test_validity_uses_the_injected_clock(milan: tuple[AmdTestPki, TrustStore]) -> None:
    pki, store = milan
    sim = SnpSimulator(pki)
    later = _appraise(sim, store, now=NOW + timedelta(days=365 * 8))
    assert "snp.cert_expired" in _codes(later)
    earlier = _appraise(sim, store, now=NOW - timedelta(days=90))
    assert "snp.cert_not_yet_valid" in _codes(earlier)
    naive = _appraise(sim, store, now=NOW.replace(tzinfo=None))
    assert naive.status is Status.AFFIRMING


def test_verify_collects_signature_and_tcb_failures(
    milan: tuple[AmdTestPki, TrustStore],
) -> None:
    pki, store = milan
    sim = SnpSimulator(pki)
    data = bytearray(sim.evidence(NONCE))
    data[0x180] ^= 0x01
    result = verify(parse_evidence(bytes(data)), VerifyOptions(NOW, store))
    assert {r.code for r in result.failures} == {
        "snp.tcb_mismatch",
        "snp.report_signature_invalid",
    }
    assert result.trust_anchor == "test:amd:milan"


def test_chain_checks_are_cached(milan: tuple[AmdTestPki, TrustStore]) -> None:
    pki, store = milan
    sim = SnpSimulator(pki)
    snp_certs.clear_caches()
    assert _appraise(sim, store).verified
    vek = snp_certs.load_vek(sim.vek_der(), SigningKey.VCEK)
    assert snp_certs.load_vek(sim.vek_der(), SigningKey.VCEK) is vek
    issued = hashlib.sha256(vek.der).digest()
    assert snp_certs._ISSUED_CACHE.get(
        issued + hashlib.sha256(pki.ask.tbs_certificate_bytes).digest()
    )


def test_an_oversized_vek_is_parsed_each_time_never_kept(
    milan: tuple[AmdTestPki, TrustStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Evidence may carry any certificate up to the table's bound; kept, 2,048 of 60 KiB each
    held 131 MiB in the verifier."""
    sim = SnpSimulator(milan[0])
    der = sim.vek_der()
    snp_certs.clear_caches()
    monkeypatch.setattr(snp_certs, "MAX_CACHED_VEK_BYTES", len(der) - 1)
    first = snp_certs.load_vek(der, SigningKey.VCEK)
    assert snp_certs.load_vek(der, SigningKey.VCEK) is not first
    assert first.der == der
    monkeypatch.setattr(snp_certs, "MAX_CACHED_VEK_BYTES", len(der))
    kept = snp_certs.load_vek(der, SigningKey.VCEK)
    assert snp_certs.load_vek(der, SigningKey.VCEK) is kept


def test_build_report_is_parseable_for_all_versions(milan: tuple[AmdTestPki, TrustStore]) -> None:
    pki = milan[0]
    sim = SnpSimulator(pki)
    for version in (2, 3, 4, 5):
        report = build_report(sim.vek.signing_key, report_data=NONCE, version=version)
        assert parse_evidence(report).report.version == version


# ---- properties: never an exception for bad input ----


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2500))
def test_appraise_never_raises_on_random_bytes(data: bytes) -> None:
    appraisal = SnpVerifier().appraise(data, VerifyOptions(NOW, TrustStore()))
    assert appraisal.status is Status.CONTRAINDICATED and not appraisal.verified


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_appraise_never_raises_on_mutated_evidence(
    milan: tuple[AmdTestPki, TrustStore], data: st.DataObject
) -> None:
    pki, store = milan
    sim = SnpSimulator(pki)
    original = sim.evidence(NONCE)
    vcek_start = REPORT_SIZE + 4 * 24
    vcek_end = vcek_start + len(sim.vek_der())
    evidence = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        offset = data.draw(st.integers(0, len(evidence) - 1))
        evidence[offset] = data.draw(st.integers(0, 255))
    authenticated = (
        evidence[:REPORT_SIZE] != original[:REPORT_SIZE]
        or evidence[vcek_start:vcek_end] != original[vcek_start:vcek_end]
    )
    appraisal = SnpVerifier().appraise(bytes(evidence), VerifyOptions(NOW, store))
    if authenticated:
        assert appraisal.status is Status.CONTRAINDICATED and not appraisal.verified


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=1500))
def test_vek_loader_raises_only_collateral_error(data: bytes) -> None:
    try:
        snp_certs.load_vek(data, SigningKey.VCEK)
    except CollateralError as exc:
        assert exc.reason.startswith("snp.")


def test_mutated_vek_der_raises_only_collateral_error(
    milan: tuple[AmdTestPki, TrustStore],
) -> None:
    pki, store = milan
    sim = SnpSimulator(pki)
    der = sim.vek_der()
    report = sim.report(NONCE)
    for offset in range(0, len(der), 3):
        mutated = bytearray(der)
        mutated[offset] ^= 0xFF
        appraisal = SnpVerifier().appraise(
            report, VerifyOptions(NOW, store, {"vcek.der": bytes(mutated)})
        )
        assert appraisal.status is Status.CONTRAINDICATED and not appraisal.verified, offset
