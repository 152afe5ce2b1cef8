"""az-snp-vtpm and az-tdx-vtpm on simulated CVMs: every evidence version, every broken link."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.testing.amd_pki import AmdTestPki, CertOverride
from services.testing.azure_hcl import AzureSnpCvm, AzureTdxCvm, runtime_data
from services.testing.intel_pki import IntelTestPki, TdFields, tcb_level
from services.testing.tpm_pki import QuoteKnobs, TestTpm
from services.verifier.families.azure import AzSnpVtpmVerifier, AzTdxVtpmVerifier
from services.verifier.families.base import Appraisal, Status, VerifyOptions
from services.verifier.families.dcap import DcapPolicy
from services.verifier.families.snp import SnpPolicy
from services.verifier.trust import TrustStore

NOW = datetime(2025, 6, 1, 12, tzinfo=UTC)
REPORT_DATA = hashlib.sha512(b"nonce" + b"public key").digest()
AMD = AmdTestPki(now=NOW)
SNP = AzureSnpCvm(AMD)
INTEL = IntelTestPki(now=NOW)
PLATFORM = INTEL.platform()
TDX_COLLATERAL = INTEL.collateral(
    [tcb_level(PLATFORM.components, 11, "UpToDate", tdx=(0, 0, 2) + (0,) * 13)]
)
TDX = AzureTdxCvm(INTEL, PLATFORM)


@pytest.fixture(scope="module")
def amd_store(tmp_path_factory: pytest.TempPathFactory) -> TrustStore:
    root: Path = tmp_path_factory.mktemp("roots")
    return TrustStore.load(None, test_dir=AMD.write_trust_dir(root))


def snp(evidence: bytes, store: TrustStore, *, expected: bytes | None = REPORT_DATA,
        verifier: AzSnpVtpmVerifier | None = None) -> Appraisal:  # fmt: skip
    options = VerifyOptions(now=NOW, trust=store, expected_report_data=expected)
    return (verifier or AzSnpVtpmVerifier()).appraise(evidence, options)


def tdx(evidence: bytes, *, collateral: dict[str, bytes] | None = None,
        verifier: AzTdxVtpmVerifier | None = None) -> Appraisal:  # fmt: skip
    options = VerifyOptions(
        now=NOW,
        trust=INTEL.trust_store(),
        collateral=TDX_COLLATERAL if collateral is None else collateral,
        expected_report_data=REPORT_DATA,
    )
    return (verifier or AzTdxVtpmVerifier()).appraise(evidence, options)


def codes(appraisal: Appraisal) -> list[str]:
    return [r.code for r in appraisal.reasons]


@pytest.mark.parametrize("version", [0, 1, 2])
def test_snp_cvm_every_version(version: int, amd_store: TrustStore) -> None:
    result = snp(SNP.evidence(REPORT_DATA, version=version), amd_store)
    assert result.status is Status.AFFIRMING and result.verified, result.reasons
    claims = result.claims
    assert claims["trust_anchor"] == "test:amd:milan"
    assert claims["nonce"] == REPORT_DATA.hex()
    assert claims["evidence_version"] == version
    ak = TestTpm(label="azure:snp").ak_public
    assert claims["hcl_ak_sha256"] == hashlib.sha256(ak).hexdigest()
    assert claims["report_data"].startswith(hashlib.sha256(SNP.runtime(
        REPORT_DATA if version == 2 else bytes(64))).hexdigest())  # fmt: skip
    assert all(value == 2 for name, value in result.trust_vector.items()
               if name in ("instance-identity", "hardware", "configuration"))  # fmt: skip


def test_snp_runtime_data_not_bound(amd_store: TrustStore) -> None:
    runtime = SNP.runtime()
    hcl = SNP.hcl_report(runtime, bound=runtime + b" ")
    result = snp(SNP.evidence(REPORT_DATA, hcl=hcl), amd_store)
    assert codes(result) == ["az.runtime_data_mismatch"] and not result.verified


def test_snp_runtime_data_with_another_ak(amd_store: TrustStore) -> None:
    other = TestTpm(label="azure:impostor").ak
    runtime = runtime_data(other.public_key())  # type: ignore[arg-type]
    result = snp(SNP.evidence(REPORT_DATA, hcl=SNP.hcl_report(runtime)), amd_store)
    assert codes(result) == ["tpm.signature_invalid"] and not result.verified
    assert result.claims["hcl_ak_sha256"] != result.claims.get("nonce")


def test_snp_runtime_data_without_ak(amd_store: TrustStore) -> None:
    runtime = json.dumps({"keys": [], "user-data": "00"}).encode()
    result = snp(SNP.evidence(REPORT_DATA, hcl=SNP.hcl_report(runtime)), amd_store)
    assert codes(result) == ["az.runtime_data_invalid"]


def test_snp_wrong_nonce_and_user_data(amd_store: TrustStore) -> None:
    wrong = snp(SNP.evidence(b"\x01" * 64), amd_store)
    assert codes(wrong) == ["tpm.nonce_mismatch"] and wrong.verified
    runtime = SNP.runtime(user_data=b"\x02" * 64)
    v2 = snp(SNP.evidence(REPORT_DATA, version=2, hcl=SNP.hcl_report(runtime)), amd_store)
    assert codes(v2) == ["az.user_data_mismatch"]
    assert v2.status is Status.CONTRAINDICATED and v2.trust_vector["instance-identity"] == 96


def test_snp_report_checks_come_from_the_snp_family(amd_store: TrustStore, tmp_path: Path) -> None:
    vmpl = snp(SNP.evidence(REPORT_DATA, vmpl=2), amd_store)
    assert codes(vmpl) == ["snp.vmpl_too_high"] and vmpl.verified
    debug = snp(SNP.evidence(REPORT_DATA, policy=0x30000 | 1 << 19), amd_store)
    assert codes(debug) == ["snp.debug_enabled"] and debug.trust_vector["runtime-opaque"] == 96
    relaxed = AzSnpVtpmVerifier(snp_policy=SnpPolicy(allow_debug=True, max_vmpl=0))
    assert snp(SNP.evidence(REPORT_DATA, policy=0x30000 | 1 << 19), amd_store,
               verifier=relaxed).status is not Status.CONTRAINDICATED  # fmt: skip
    old = AmdTestPki(now=NOW, ask=CertOverride(expired=True))
    old_store = TrustStore.load(None, test_dir=old.write_trust_dir(tmp_path))
    expired = AzureSnpCvm(old, label="old")
    assert "snp.cert_expired" in codes(snp(expired.evidence(REPORT_DATA), old_store))


def test_snp_signed_by_another_vtpm_key(amd_store: TrustStore) -> None:
    knobs = QuoteKnobs(signer=TestTpm(label="azure:rogue").ak)
    result = snp(SNP.evidence(REPORT_DATA, knobs=knobs), amd_store)
    assert codes(result) == ["tpm.signature_invalid"]


def test_snp_evidence_to_the_tdx_verifier_and_back(amd_store: TrustStore) -> None:
    document = json.loads(SNP.evidence(REPORT_DATA))
    document["td_quote"] = document.pop("vcek")
    result = tdx(json.dumps(document).encode())
    assert codes(result) == ["az.hcl_report_type"]
    swapped = json.loads(TDX.evidence(REPORT_DATA))
    swapped["vcek"] = swapped.pop("td_quote")
    assert codes(snp(json.dumps(swapped).encode(), amd_store)) == ["az.hcl_report_type"]


@pytest.mark.parametrize("version", [0, 1, 2])
def test_tdx_cvm_every_version(version: int) -> None:
    result = tdx(TDX.evidence(REPORT_DATA, version=version))
    assert result.status is Status.AFFIRMING and result.verified, result.reasons
    claims = result.claims
    assert claims["tcb_status"] == "UpToDate"
    assert claims["mrtd"] == TdFields().mr_td.hex()
    assert claims["nonce"] == REPORT_DATA.hex()
    assert claims["trust_anchor"] == "test:intel:sgx_root_ca"
    assert any(c.name == "td_report" and c.ok for c in result.checks)


def test_tdx_quote_of_another_td_report() -> None:
    other = TdFields(mr_td=b"\x99" * 48)
    result = tdx(TDX.evidence(REPORT_DATA, quote_fields=other))
    assert "az.td_report_mismatch" in codes(result) and not result.verified


def test_tdx_runtime_data_not_bound() -> None:
    runtime = TDX.runtime()
    evidence = TDX.evidence(REPORT_DATA, quote_fields=TdFields(report_data=bytes(64)),
                            runtime=runtime)  # fmt: skip
    result = tdx(evidence)
    assert {"az.td_report_mismatch", "az.runtime_data_mismatch"} <= set(codes(result))


def test_tdx_quote_checks_come_from_the_tdx_family() -> None:
    missing = tdx(TDX.evidence(REPORT_DATA), collateral={})
    assert codes(missing) == ["tdx.collateral_missing"] and not missing.verified
    debug_fields = TdFields(td_attributes=bytes.fromhex("0100001000000000"))
    debug = tdx(TDX.evidence(REPORT_DATA, fields=debug_fields))
    assert "tdx.debug_enabled" in codes(debug) and debug.status is Status.CONTRAINDICATED
    allowed = tdx(TDX.evidence(REPORT_DATA, fields=debug_fields),
                  verifier=AzTdxVtpmVerifier(DcapPolicy(allow_debug=True)))  # fmt: skip
    assert allowed.status is Status.WARNING and allowed.trust_vector["runtime-opaque"] == 96
    wrong = tdx(TDX.evidence(b"\x03" * 64))
    assert codes(wrong) == ["tpm.nonce_mismatch"] and wrong.verified


def test_tdx_cvm_service_td_rule_is_the_tdx_familys() -> None:
    """A TD 1.5 quote with a bound service TD is refused here too, unless the DCAP policy
    allows that service TD; an unbound one (all zeros) is unaffected."""
    service_td = b"\x6d" * 48
    bound = TdFields(tee_tcb_svn2=bytes(16), mr_servicetd=service_td)
    evidence = TDX.evidence(REPORT_DATA, fields=bound, quote_version=5)
    refused = tdx(evidence)
    assert refused.status is Status.CONTRAINDICATED and refused.verified
    assert codes(refused) == ["tdx.service_td_bound"]
    assert refused.claims["mrservicetd"] == service_td.hex()
    assert refused.trust_vector["configuration"] == 96
    policy = DcapPolicy(allowed_service_tds=frozenset({service_td.hex()}))
    allowed = tdx(evidence, verifier=AzTdxVtpmVerifier(policy))
    assert allowed.status is Status.AFFIRMING and allowed.reasons == []
    unbound = TdFields(tee_tcb_svn2=bytes(16))
    plain = tdx(TDX.evidence(REPORT_DATA, fields=unbound, quote_version=5))
    assert plain.status is Status.AFFIRMING and plain.claims["mrservicetd"] == "00" * 48


def test_tdx_quote_flips_are_contraindicated() -> None:
    document = json.loads(TDX.evidence(REPORT_DATA, version=2))
    quote = base64.urlsafe_b64decode(document["td_quote"])
    accepted = []
    for offset in range(0, 48 + 584, 7):  # header and TD report body: what the AK signs
        flipped = bytearray(quote)
        flipped[offset] ^= 0x01
        document["td_quote"] = base64.urlsafe_b64encode(bytes(flipped)).decode()
        result = tdx(json.dumps(document).encode())
        if result.status is not Status.CONTRAINDICATED or result.verified:
            accepted.append(offset)
    assert accepted == []
