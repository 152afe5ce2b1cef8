"""End-to-end DCAP verification against the test PKI: every check, knob and policy rule."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from services.mesh.errors import ConfigError, PolicyError
from services.testing.intel_pki import (
    DAY,
    CertOverride,
    DocOverride,
    IntelTestPki,
    TdFields,
    enclave_report,
    quote_collateral_v3,
    sgx_quote,
    tcb_level,
    td_quote,
)
from services.verifier import registry
from services.verifier.families.base import Appraisal, Status, VerifyOptions
from services.verifier.families.dcap import DcapPolicy
from services.verifier.families.sgx import SgxVerifier
from services.verifier.families.tdx import TdxVerifier
from services.verifier.trust import TrustStore

NOW = datetime(2025, 6, 1, 12, tzinfo=UTC)
PKI = IntelTestPki(now=NOW)
PLATFORM = PKI.platform()
HIGH = PLATFORM.components
LOW = (1,) * 8 + (0,) * 8
TDX_LEVELS = [
    tcb_level(HIGH, 11, "UpToDate", tdx=(0, 0, 2) + (0,) * 13),
    tcb_level(HIGH, 11, "OutOfDate", tdx=(0,) * 16, advisories=["INTEL-SA-00960"]),
    tcb_level(LOW, 5, "OutOfDate", tdx=(0,) * 16, advisories=["INTEL-SA-00837"]),
]
SGX_LEVELS = [tcb_level(HIGH, 11, "UpToDate"), tcb_level(LOW, 5, "OutOfDate")]
TDX_COLLATERAL = PKI.collateral(TDX_LEVELS)
SGX_COLLATERAL = PKI.collateral(SGX_LEVELS, tdx=False)
TD_QUOTE = td_quote(PLATFORM)
SGX_QUOTE = sgx_quote(PLATFORM)


def appraise(
    quote: bytes = TD_QUOTE,
    collateral: dict[str, bytes] | None = None,
    *,
    sgx: bool = False,
    pki: IntelTestPki = PKI,
    trust: TrustStore | None = None,
    now: datetime = NOW,
    policy: DcapPolicy | None = None,
    expected_report_data: bytes | None = None,
) -> Appraisal:
    if collateral is None:
        collateral = SGX_COLLATERAL if sgx else TDX_COLLATERAL
    options = VerifyOptions(
        now=now,
        trust=trust if trust is not None else pki.trust_store(),
        collateral=collateral,
        expected_report_data=expected_report_data,
    )
    verifier = SgxVerifier(policy) if sgx else TdxVerifier(policy)
    return verifier.appraise(quote, options)


def codes(appraisal: Appraisal) -> list[str]:
    return [r.code for r in appraisal.reasons]


def test_tdx_quote_affirmed_with_claims_and_checks() -> None:
    result = appraise()
    assert result.status == Status.AFFIRMING and result.verified, result.reasons
    fields = TdFields()
    claims = result.claims
    assert claims["mrtd"] == fields.mr_td.hex() and claims["rtmr3"] == fields.rtmrs[3].hex()
    assert claims["report_data"] == fields.report_data.hex()
    assert claims["tcb_status"] == "UpToDate" and claims["advisories"] == []
    assert claims["fmspc"] == "50806f000000" and claims["debug"] is False
    assert claims["trust_anchor"] == "test:intel:sgx_root_ca"
    assert claims["pck_ca"] == "platform" and claims["tcb_evaluation_data_number"] == 17
    assert {c.name for c in result.checks} >= {
        "parse", "quote_signature", "pck_chain", "qe_report_signature", "qe_report_data",
        "tcb_info", "qe_identity", "pck_crl", "root_crl", "pck_revocation", "tcb_level",
    }  # fmt: skip
    assert all(c.ok for c in result.checks)
    assert result.trust_vector["hardware"] == 2 and result.trust_vector["instance-identity"] == 2
    assert result.to_json()["family"] == "tdx"


def test_tdx_v5_td15_quote() -> None:
    quote = td_quote(PLATFORM, TdFields(tee_tcb_svn2=bytes(16)), version=5)
    result = appraise(quote)
    assert result.status == Status.AFFIRMING, result.reasons
    assert result.claims["mrservicetd"] == "00" * 48 and result.claims["quote_version"] == 5


SERVICE_TD = bytes.fromhex("5e") * 47 + b"\x01"


def td15_quote(mr_servicetd: bytes, fields: TdFields | None = None) -> bytes:
    """A v5 quote with a TD 1.5 body carrying ``mr_servicetd``."""
    base = fields or TdFields()
    return td_quote(PLATFORM, replace(base, tee_tcb_svn2=bytes(16), mr_servicetd=mr_servicetd),
                    version=5)  # fmt: skip


@pytest.mark.parametrize(
    "mr_servicetd", [SERVICE_TD, bytes(47) + b"\x01", b"\xff" * 48], ids=["5e", "01", "ff"]
)
def test_bound_service_td_is_contraindicated(mr_servicetd: bytes) -> None:
    result = appraise(td15_quote(mr_servicetd))
    assert result.status == Status.CONTRAINDICATED and result.verified
    assert codes(result) == ["tdx.service_td_bound"]
    assert mr_servicetd.hex() in result.reasons[0].message
    assert result.claims["mrservicetd"] == mr_servicetd.hex()
    assert result.claims["tcb_status"] is None and result.claims["advisories"] == []
    assert result.trust_vector["runtime-opaque"] == 96
    assert result.trust_vector["configuration"] == 96


def test_allowed_service_td_is_not_refused() -> None:
    policy = DcapPolicy(allowed_service_tds=frozenset({SERVICE_TD.hex().upper()}))
    allowed = appraise(td15_quote(SERVICE_TD), policy=policy)
    assert allowed.status == Status.AFFIRMING and allowed.reasons == []
    assert allowed.claims["tcb_status"] == "UpToDate"
    assert allowed.claims["mrservicetd"] == SERVICE_TD.hex()
    assert allowed.trust_vector["runtime-opaque"] == 2
    other = SERVICE_TD[:-1] + b"\x02"
    refused = appraise(td15_quote(other), policy=policy)
    assert codes(refused) == ["tdx.service_td_bound"]
    assert refused.status == Status.CONTRAINDICATED
    assert appraise(td15_quote(bytes(48)), policy=policy).status == Status.AFFIRMING


def test_service_td_rule_stacks_with_the_others() -> None:
    """An allowed service TD leaves every other rule in force; a refused one is one more reason."""
    old = TdFields(tee_tcb_svn=bytes([4, 1, 1]) + bytes(13))
    policy = DcapPolicy(allowed_service_tds=frozenset({SERVICE_TD.hex()}))
    warned = appraise(td15_quote(SERVICE_TD, old), policy=policy)
    assert warned.status == Status.WARNING and warned.claims["tcb_status"] == "OutOfDate"
    both = set(codes(appraise(td15_quote(SERVICE_TD, old) + b"x")))
    assert {"tdx.service_td_bound", "tdx.trailing_data"} <= both


def test_td10_bodies_have_no_service_td() -> None:
    for quote in (td_quote(PLATFORM, version=5), TD_QUOTE):
        result = appraise(quote)
        assert result.status == Status.AFFIRMING and "mrservicetd" not in result.claims


def test_v4_quote_cannot_carry_a_td15_body() -> None:
    """Quote v4 implies a TD 1.0 body; 64 more body bytes are a malformed quote, not a TD 1.5."""
    quote = td_quote(PLATFORM, TdFields(tee_tcb_svn2=bytes(16), mr_servicetd=SERVICE_TD))
    result = appraise(quote)
    assert result.status == Status.CONTRAINDICATED and not result.verified
    assert result.claims == {}


@pytest.mark.parametrize(
    "settings",
    [
        {"allowed_service_tds": ["5e" * 47]},
        {"allowed_service_tds": ["5e" * 48 + "00"]},
        {"allowed_service_tds": ["zz" * 48]},
        {"allowed_service_tds": ["5e" * 47 + "0\n"]},
        {"allowed_service_tds": [" " + "5e" * 47 + "0"]},
        {"allowed_service_tds": ["00" * 48]},
        {"allowed_service_tds": "5e" * 48},
        {"allowed_service_tds": [48]},
        {"allow_service_td": True},
        {"out_of_dat": "contraindicated"},
    ],
)
def test_invalid_service_td_settings_refuse_to_start(settings: dict[str, Any]) -> None:
    with pytest.raises(PolicyError) as caught:
        DcapPolicy.from_mapping(settings)
    assert caught.value.reason == "dcap.policy_invalid"
    for family in ("tdx", "sgx"):
        with pytest.raises(ConfigError):
            registry.get(family, settings)


def test_service_td_setting_from_configuration() -> None:
    verifier = registry.get("tdx", {"allowed_service_tds": [SERVICE_TD.hex().upper()]})
    assert isinstance(verifier, TdxVerifier)
    assert verifier.policy.allowed_service_tds == frozenset({SERVICE_TD.hex()})
    options = VerifyOptions(now=NOW, trust=PKI.trust_store(), collateral=TDX_COLLATERAL)
    assert verifier.appraise(td15_quote(SERVICE_TD), options).status == Status.AFFIRMING


@pytest.mark.parametrize("version", [3, 4])
def test_sgx_quote_affirmed(version: int) -> None:
    report = enclave_report(mr_enclave=b"\x01" * 32, isv_prod_id=7, isv_svn=2)
    result = appraise(sgx_quote(PLATFORM, report, version=version), sgx=True)
    assert result.status == Status.AFFIRMING and result.verified, result.reasons
    assert result.claims["mrenclave"] == "01" * 32
    assert result.claims["isvprodid"] == 7 and result.claims["isvsvn"] == 2


def test_status_warnings_carry_advisories() -> None:
    module = (0, 0, 1) + (0,) * 13
    quote = td_quote(PLATFORM, TdFields(tee_tcb_svn=bytes([4, 1]) + bytes(module[2:])))
    result = appraise(quote)
    assert result.status == Status.WARNING and result.verified
    assert result.claims["tcb_status"] == "OutOfDate"
    assert result.claims["advisories"] == ["INTEL-SA-00960"]
    assert codes(result) == ["tdx.tcb_out_of_date", "tdx.advisory"]
    assert "INTEL-SA-00960" in result.reasons[1].message
    assert result.trust_vector["hardware"] == 32


def test_module_and_qe_status_fold_in() -> None:
    old_module = td_quote(PLATFORM, TdFields(tee_tcb_svn=bytes([3, 1, 2]) + bytes(13)))
    result = appraise(old_module)
    assert result.claims["tcb_status"] == "OutOfDate"
    assert result.claims["advisories"] == ["INTEL-SA-01036"]
    old_qe = PKI.platform(label="old-qe", qe_svn=3)
    result = appraise(td_quote(old_qe))
    assert result.claims["tcb_status"] == "OutOfDate"
    assert result.claims["advisories"] == ["INTEL-SA-00615"]


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("SWHardeningNeeded", Status.WARNING),
        ("ConfigurationNeeded", Status.WARNING),
        ("ConfigurationAndSWHardeningNeeded", Status.WARNING),
        ("OutOfDateConfigurationNeeded", Status.WARNING),
        ("Revoked", Status.CONTRAINDICATED),
    ],
)
def test_each_tcb_status_maps_to_its_tier(status: str, expected: Status) -> None:
    collateral = PKI.collateral([tcb_level(HIGH, 11, status, advisories=["INTEL-SA-1"])],
                                tdx=False)  # fmt: skip
    result = appraise(SGX_QUOTE, collateral, sgx=True)
    assert result.status == expected and result.claims["tcb_status"] == status


def test_no_matching_level_is_contraindicated_but_verified() -> None:
    collateral = PKI.collateral([tcb_level((9,) * 16, 11, "UpToDate", tdx=(0,) * 16)])
    result = appraise(TD_QUOTE, collateral)
    assert result.status == Status.CONTRAINDICATED and result.verified
    assert result.claims["tcb_status"] is None and "tdx.tcb_level_not_found" in codes(result)


@pytest.mark.parametrize(
    ("item", "override", "code"),
    [
        ("tcb_info", DocOverride(expired=True), "tdx.tcb_info_expired"),
        ("tcb_info", DocOverride(not_yet_valid=True), "tdx.tcb_info_not_yet_valid"),
        ("tcb_info", DocOverride(wrong_signer=True), "tdx.tcb_info_signature_invalid"),
        ("tcb_info", DocOverride(tamper=True), "tdx.tcb_info_signature_invalid"),
        ("qe_identity", DocOverride(expired=True), "tdx.qe_identity_expired"),
        ("qe_identity", DocOverride(not_yet_valid=True), "tdx.qe_identity_not_yet_valid"),
        ("qe_identity", DocOverride(wrong_signer=True), "tdx.qe_identity_signature_invalid"),
        ("qe_identity", DocOverride(tamper=True), "tdx.qe_identity_signature_invalid"),
        ("pck_crl", DocOverride(expired=True), "tdx.pck_crl_expired"),
        ("pck_crl", DocOverride(not_yet_valid=True), "tdx.pck_crl_expired"),
        ("pck_crl", DocOverride(wrong_signer=True), "tdx.pck_crl_invalid"),
        ("root_crl", DocOverride(expired=True), "tdx.root_crl_expired"),
        ("root_crl", DocOverride(wrong_signer=True), "tdx.root_crl_invalid"),
    ],
)
def test_bad_collateral_is_contraindicated(item: str, override: DocOverride, code: str) -> None:
    collateral = PKI.collateral(TDX_LEVELS, overrides={item: override})
    result = appraise(TD_QUOTE, collateral)
    assert result.status == Status.CONTRAINDICATED and not result.verified
    assert code in codes(result), result.reasons


@pytest.mark.parametrize("name", sorted(TDX_COLLATERAL))
def test_missing_collateral_is_contraindicated(name: str) -> None:
    collateral = {k: v for k, v in TDX_COLLATERAL.items() if k != name}
    result = appraise(TD_QUOTE, collateral)
    assert result.status == Status.CONTRAINDICATED and not result.verified
    assert "tdx.collateral_missing" in codes(result)


def test_revoked_pck_and_revoked_ca() -> None:
    revoked = appraise(TD_QUOTE, PKI.collateral(TDX_LEVELS, revoked=[PLATFORM.pck]))
    assert revoked.status == Status.CONTRAINDICATED and not revoked.verified
    assert "tdx.pck_revoked" in codes(revoked) and revoked.claims["tcb_status"] is None
    other = appraise(TD_QUOTE, PKI.collateral(TDX_LEVELS, revoked=[PKI.tcb_cert]))
    assert other.status == Status.AFFIRMING, "another serial of another issuer"
    ca = appraise(TD_QUOTE, PKI.collateral(TDX_LEVELS, revoked_by_root=[PKI.ca_cert]))
    assert "tdx.pck_ca_revoked" in codes(ca) and not ca.verified
    signer = appraise(TD_QUOTE, PKI.collateral(TDX_LEVELS, revoked_by_root=[PKI.tcb_cert]))
    assert {"tdx.tcb_info_signer_revoked", "tdx.qe_identity_signer_revoked"} <= set(codes(signer))


@pytest.mark.parametrize(
    ("knob", "code"),
    [
        ({"platform_ca": CertOverride(wrong_issuer=True)}, "tdx.pck_chain_invalid"),
        ({"platform_ca": CertOverride(expired=True)}, "tdx.pck_chain_expired"),
        ({"tcb_signing": CertOverride(expired=True)}, "tdx.tcb_info_chain_expired"),
        ({"tcb_signing": CertOverride(not_yet_valid=True)}, "tdx.qe_identity_chain_expired"),
        ({"tcb_signing": CertOverride(wrong_issuer=True)}, "tdx.tcb_info_chain_invalid"),
    ],
)
def test_bad_certificates_are_contraindicated(knob: dict[str, CertOverride], code: str) -> None:
    pki = IntelTestPki(now=NOW, **knob)
    platform = pki.platform()
    result = appraise(td_quote(platform), pki.collateral(TDX_LEVELS), pki=pki)
    assert result.status == Status.CONTRAINDICATED and not result.verified
    assert code in codes(result), result.reasons


def test_pck_leaf_problems() -> None:
    expired = PKI.platform(label="expired-pck", pck=CertOverride(expired=True))
    assert "tdx.pck_chain_expired" in codes(appraise(td_quote(expired)))
    forged = PKI.platform(label="forged-pck", pck=CertOverride(wrong_issuer=True))
    assert "tdx.pck_chain_invalid" in codes(appraise(td_quote(forged)))
    no_ext = PKI.platform(label="bad-ext", pck=CertOverride(extension=b"\x30\x00"))
    assert "tdx.pck_chain_invalid" in codes(appraise(td_quote(no_ext)))


def test_chain_to_another_root_is_untrusted() -> None:
    stranger = IntelTestPki(now=NOW)
    result = appraise(TD_QUOTE, trust=stranger.trust_store())
    assert "tdx.pck_root_untrusted" in codes(result) and not result.verified
    empty = appraise(TD_QUOTE, trust=TrustStore())
    assert "tdx.no_trust_anchor" in codes(empty) and not empty.verified


def test_collateral_for_another_platform_or_tee() -> None:
    other_fmspc = PKI.tcb_info(TDX_LEVELS, fmspc=bytes.fromhex("00906ea10000"))
    result = appraise(TD_QUOTE, {**TDX_COLLATERAL, "tcb_info.json": other_fmspc})
    assert "tdx.tcb_info_mismatch" in codes(result) and not result.verified
    result = appraise(
        TD_QUOTE, {**TDX_COLLATERAL, "tcb_info.json": SGX_COLLATERAL["tcb_info.json"]}
    )
    assert "tdx.tcb_info_mismatch" in codes(result)
    sgx_identity = SGX_COLLATERAL["qe_identity.json"]
    result = appraise(TD_QUOTE, {**TDX_COLLATERAL, "qe_identity.json": sgx_identity})
    assert "tdx.qe_identity_mismatch" in codes(result)
    impostor_qe = PKI.qe_identity(mrsigner=b"\x01" * 32)
    result = appraise(TD_QUOTE, {**TDX_COLLATERAL, "qe_identity.json": impostor_qe})
    assert "tdx.qe_identity_mismatch" in codes(result) and not result.verified


def test_wrong_family_and_garbage_never_raise() -> None:
    assert codes(appraise(SGX_QUOTE)) == ["tdx.wrong_tee_type"]
    assert codes(appraise(TD_QUOTE, sgx=True)) == ["sgx.wrong_tee_type"]
    for junk in (b"", b"\x04\x00", bytes(5000)):
        result = appraise(junk)
        assert result.status == Status.CONTRAINDICATED and not result.verified
        assert result.claims == {}


def test_debug_policy() -> None:
    debug = td_quote(PLATFORM, TdFields(td_attributes=bytes.fromhex("0100001000000000")))
    result = appraise(debug)
    assert result.status == Status.CONTRAINDICATED and result.verified
    assert "tdx.debug_enabled" in codes(result) and result.claims["debug"] is True
    assert result.claims["tcb_status"] is None
    assert result.trust_vector["configuration"] == 96
    allowed = appraise(debug, policy=DcapPolicy(allow_debug=True))
    assert allowed.status == Status.WARNING and allowed.claims["tcb_status"] == "UpToDate"
    sgx_debug = sgx_quote(PLATFORM, enclave_report(attributes=bytes([0x07]) + bytes(15)))
    assert "sgx.debug_enabled" in codes(appraise(sgx_debug, sgx=True))


def test_report_data_binding() -> None:
    wanted = TdFields().report_data
    assert appraise(expected_report_data=wanted).status == Status.AFFIRMING
    wrong = appraise(expected_report_data=bytes(64))
    assert wrong.status == Status.CONTRAINDICATED and wrong.verified
    assert codes(wrong) == ["tdx.report_data_mismatch"]


def test_trailing_bytes_policy() -> None:
    assert appraise(TD_QUOTE + bytes(100)).status == Status.AFFIRMING
    junk = appraise(TD_QUOTE + b"junk")
    assert junk.status == Status.CONTRAINDICATED and junk.verified
    assert codes(junk) == ["tdx.trailing_data"]
    loose = appraise(TD_QUOTE + b"junk", policy=DcapPolicy(allow_trailing_data=True))
    assert loose.status == Status.WARNING


def test_policy_knobs_tighten_and_loosen() -> None:
    old = td_quote(PLATFORM, TdFields(tee_tcb_svn=bytes([4, 1, 1]) + bytes(13)))
    strict = appraise(old, policy=DcapPolicy(out_of_date=Status.CONTRAINDICATED))
    assert strict.status == Status.CONTRAINDICATED
    relaxed = appraise(old, policy=DcapPolicy(out_of_date=Status.AFFIRMING))
    assert relaxed.status == Status.AFFIRMING
    rejected = appraise(old, policy=DcapPolicy(rejected_advisories=frozenset({"INTEL-SA-00960"})))
    assert "tdx.advisory_rejected" in codes(rejected)
    assert rejected.status == Status.CONTRAINDICATED
    fresh = appraise(policy=DcapPolicy(min_tcb_evaluation_data_number=18))
    assert codes(fresh) == ["tdx.tcb_evaluation_too_old"]
    cautious = appraise(policy=DcapPolicy(up_to_date=Status.WARNING))
    assert cautious.status == Status.WARNING


def test_every_violation_is_reported() -> None:
    debug = td_quote(PLATFORM, TdFields(td_attributes=bytes.fromhex("0100001000000000")))
    expired = {"tcb_info": DocOverride(expired=True)}
    collateral = PKI.collateral(TDX_LEVELS, revoked=[PLATFORM.pck], overrides=expired)
    found = set(codes(appraise(debug + b"x", collateral, expected_report_data=bytes(64))))
    assert {"tdx.pck_revoked", "tdx.tcb_info_expired", "tdx.debug_enabled",
            "tdx.trailing_data", "tdx.report_data_mismatch"} <= found  # fmt: skip


def test_cached_platform_results_follow_the_clock() -> None:
    assert appraise().status == Status.AFFIRMING
    later = appraise(now=NOW + 40 * DAY)
    assert later.status == Status.CONTRAINDICATED and "tdx.tcb_info_expired" in codes(later)
    earlier = appraise(now=NOW - 2 * DAY)
    assert "tdx.tcb_info_not_yet_valid" in codes(earlier)
    assert appraise(now=NOW + timedelta(hours=1)).status == Status.AFFIRMING


def test_quote_signature_and_qe_binding() -> None:
    tampered = bytearray(TD_QUOTE)
    tampered[200] ^= 1
    assert codes(appraise(bytes(tampered))) == ["tdx.quote_signature_invalid"]
    key_at = 48 + 584 + 4 + 64
    swapped = bytearray(TD_QUOTE)
    swapped[key_at + 10] ^= 1
    found = codes(appraise(bytes(swapped)))
    assert "tdx.qe_report_data_mismatch" in found
    assert {"tdx.quote_signature_invalid", "tdx.attestation_key_invalid"} & set(found)


HAS_DCAP_QVL = importlib.util.find_spec("dcap_qvl") is not None


def _dcap_qvl(quote: bytes, collateral: dict[str, bytes], pki: IntelTestPki) -> Any:
    dcap_qvl = importlib.import_module("dcap_qvl")
    root = pki.root_cert.public_bytes(serialization.Encoding.DER)
    parts = dcap_qvl.QuoteCollateralV3(**quote_collateral_v3(collateral))
    try:
        return dcap_qvl.verify_with_root_ca(quote, parts, root, int(NOW.timestamp()))
    except ValueError as exc:
        return str(exc)


SCENARIOS = [
    (platform, module_svn, qe_svn)
    for platform in ("UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "OutOfDate",
                     "ConfigurationAndSWHardeningNeeded", "OutOfDateConfigurationNeeded")
    for module_svn in (4, 3)
    for qe_svn in (4, 3)
]  # fmt: skip


@pytest.mark.skipif(not HAS_DCAP_QVL, reason="dcap-qvl (dev extra) is not installed")
@pytest.mark.parametrize(("platform", "module_svn", "qe_svn"), SCENARIOS)
def test_synthetic_statuses_agree_with_dcap_qvl(
    platform: str, module_svn: int, qe_svn: int
) -> None:
    levels = [tcb_level(HIGH, 11, platform, tdx=(0,) * 16, advisories=["INTEL-SA-P"])]
    collateral = PKI.collateral(levels)
    machine = PKI.platform(label=f"qe{qe_svn}", qe_svn=qe_svn)
    quote = td_quote(machine, TdFields(tee_tcb_svn=bytes([module_svn, 1]) + bytes(14)))
    ours = appraise(quote, collateral)
    theirs = _dcap_qvl(quote, collateral, PKI)
    assert not isinstance(theirs, str), theirs
    assert ours.claims["tcb_status"] == theirs.status
    assert ours.claims["advisories"] == list(theirs.advisory_ids)


@pytest.mark.skipif(not HAS_DCAP_QVL, reason="dcap-qvl (dev extra) is not installed")
@pytest.mark.parametrize(("major", "expected"), [(1, "UpToDate"), (0, "OutOfDate")])
def test_tdx_module_bytes_rule_agrees_with_dcap_qvl(major: int, expected: str) -> None:
    """TEE_TCB_SVN[0..1] take part in level matching only when the module major version is 0."""
    levels = [tcb_level(HIGH, 11, "UpToDate", tdx=(9, 0) + (0,) * 14),
              tcb_level(HIGH, 11, "OutOfDate", tdx=(0,) * 16)]  # fmt: skip
    collateral = PKI.collateral(levels)
    quote = td_quote(PLATFORM, TdFields(tee_tcb_svn=bytes([4, major, 2]) + bytes(13)))
    ours = appraise(quote, collateral)
    theirs = _dcap_qvl(quote, collateral, PKI)
    assert ours.claims["tcb_status"] == theirs.status == expected


SERVICE_TD_SCENARIOS = [
    (platform, mr_servicetd, shape)
    for platform in ("UpToDate", "OutOfDate", "ConfigurationNeeded", "Revoked")
    for mr_servicetd in (bytes(48), SERVICE_TD, bytes(47) + b"\x80")
    for shape in ("v5-td15", "v5-td10", "v4")
]  # fmt: skip


@pytest.mark.skipif(not HAS_DCAP_QVL, reason="dcap-qvl (dev extra) is not installed")
@pytest.mark.parametrize(
    ("platform", "mr_servicetd", "shape"),
    SERVICE_TD_SCENARIOS,
    ids=[f"{p}-{m.hex()[-4:]}-{s}" for p, m, s in SERVICE_TD_SCENARIOS],
)
def test_service_td_rule_agrees_with_dcap_qvl(
    platform: str, mr_servicetd: bytes, shape: str
) -> None:
    """dcap-qvl fails a TD 1.5 quote with a non-zero MRSERVICETD ("Invalid MR service TD"),
    after the TCB status (a Revoked platform fails first); a TD 1.0 body has no such field.
    Ours: contraindicated and no TCB status, the same outcome."""
    levels = [tcb_level(HIGH, 11, platform, tdx=(0,) * 16, advisories=["INTEL-SA-P"])]
    collateral = PKI.collateral(levels)
    fields = TdFields(mr_servicetd=mr_servicetd)
    if shape == "v5-td15":
        quote = td_quote(PLATFORM, replace(fields, tee_tcb_svn2=bytes(16)), version=5)
    else:
        quote = td_quote(PLATFORM, fields, version=5 if shape == "v5-td10" else 4)
    ours = appraise(quote, collateral)
    theirs = _dcap_qvl(quote, collateral, PKI)
    bound = shape == "v5-td15" and any(mr_servicetd)
    assert ("tdx.service_td_bound" in codes(ours)) is bound
    if platform == "Revoked":
        assert isinstance(theirs, str) and "TCB status is invalid" in theirs, theirs
        assert ours.status == Status.CONTRAINDICATED
    elif isinstance(theirs, str):
        assert bound and "Invalid MR service TD" in theirs, theirs
        assert ours.status == Status.CONTRAINDICATED and ours.claims["tcb_status"] is None
    else:
        assert not bound
        assert ours.claims["tcb_status"] == theirs.status
        assert ours.claims["advisories"] == list(theirs.advisory_ids)


@pytest.mark.skipif(not HAS_DCAP_QVL, reason="dcap-qvl (dev extra) is not installed")
@pytest.mark.parametrize("platform", ["UpToDate", "OutOfDate"])
def test_allowed_service_td_matches_dcap_qvl_without_the_check(platform: str) -> None:
    """dcap-qvl's opt-in (``allow_service_td``) only skips this check, and its Python binding
    does not expose it; so an allowed service TD must get the verdict dcap-qvl gives the same
    TD without one."""
    levels = [tcb_level(HIGH, 11, platform, tdx=(0,) * 16, advisories=["INTEL-SA-P"])]
    collateral = PKI.collateral(levels)
    policy = DcapPolicy(allowed_service_tds=frozenset({SERVICE_TD.hex()}))
    ours = appraise(td15_quote(SERVICE_TD), collateral, policy=policy)
    theirs = _dcap_qvl(td15_quote(bytes(48)), collateral, PKI)
    assert not isinstance(theirs, str), theirs
    assert ours.claims["tcb_status"] == theirs.status == platform
    assert ours.claims["advisories"] == list(theirs.advisory_ids)
    assert "Invalid MR service TD" in _dcap_qvl(td15_quote(SERVICE_TD), collateral, PKI)


@settings(max_examples=120, deadline=None)
@given(
    st.sampled_from(["td", "sgx"]),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=3),
)
def test_mutated_quotes_never_raise(kind: str, edits: list[tuple[int, int]]) -> None:
    data = bytearray(TD_QUOTE if kind == "td" else SGX_QUOTE)
    for offset, value in edits:
        data[offset % len(data)] = value
    result = appraise(bytes(data), sgx=kind == "sgx")
    if bytes(data) != (TD_QUOTE if kind == "td" else SGX_QUOTE):
        assert result.status == Status.CONTRAINDICATED or result.verified
