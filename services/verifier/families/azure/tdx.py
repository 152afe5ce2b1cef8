"""az-tdx-vtpm: an Azure TDX confidential VM's HCL report, TD quote and vTPM quote.

The HCL report's TDREPORT is MAC'd for the local CPU only, so the signed statement is the TD
quote the quoting enclave made from it: that quote is verified by the tdx family's own code
(``appraise_quote``, with Intel collateral from ``options.collateral`` in the PCS layout, the
Intel SGX Root CA from the trust store), and every TD field the quote signs must equal the HCL
report's TDREPORT (``az.td_report_mismatch`` otherwise), so the runtime data is bound through the
quote's REPORTDATA. Then :mod:`.common`: runtime data, AK, vTPM quote, nonce in extraData.

Claims are the tdx family's, unprefixed (``mrtd``, ``rtmr0``.., ``report_data``,
``tcb_status``, ``advisories``, ``trust_anchor``...), plus those of :mod:`.common`; reasons keep
their prefixes (``tdx.*``, ``tpm.*``, ``az.*``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

from services.mesh.errors import ParseError
from services.verifier.families import hwid
from services.verifier.families.azure import common
from services.verifier.families.azure.evidence import parse_evidence
from services.verifier.families.azure.hcl import ReportType, parse_hcl_report
from services.verifier.families.azure.snp import failed
from services.verifier.families.base import Appraisal, Status, VerifyOptions, worst
from services.verifier.families.dcap import DcapPolicy, appraise_quote
from services.verifier.families.tpm.appraise import Findings
from services.verifier.families.tpm.policy import TpmPolicy

FAMILY = "az-tdx-vtpm"
TDX_REPORT_TYPE = 0x81

# TDREPORT offsets (Intel TDX module ABI): REPORTMACSTRUCT, TEE_TCB_INFO, TDINFO.
_FIELDS: dict[str, tuple[int, int]] = {
    "report_data": (128, 64),
    "tee_tcb_svn": (256 + 8, 16),
    "mrseam": (256 + 24, 48),
    "td_attributes": (512, 8),
    "xfam": (520, 8),
    "mrtd": (528, 48),
    "mrconfigid": (576, 48),
    "mrowner": (624, 48),
    "mrownerconfig": (672, 48),
    **{f"rtmr{i}": (720 + 48 * i, 48) for i in range(4)},
}


def td_report_fields(td_report: bytes) -> dict[str, str]:
    """The TDREPORT fields the TD quote also signs, as lowercase hex under the tdx claim names."""
    if td_report[0] != TDX_REPORT_TYPE:
        raise ParseError("az.hcl_malformed", f"TDREPORT type 0x{td_report[0]:02x} is not TDX")
    return {name: td_report[at : at + size].hex() for name, (at, size) in _FIELDS.items()}


class AzTdxVtpmVerifier:
    """Azure TDX CVM evidence (see the module docstring)."""

    family: ClassVar[str] = FAMILY

    def __init__(
        self, dcap_policy: DcapPolicy | None = None, tpm_policy: TpmPolicy | None = None
    ) -> None:
        self.dcap_policy = dcap_policy if dcap_policy is not None else DcapPolicy()
        self.tpm_policy = tpm_policy if tpm_policy is not None else TpmPolicy()

    def appraise(self, evidence: bytes, options: VerifyOptions) -> Appraisal:
        """Parse, verify and appraise ``evidence``; never raises for bad input."""
        try:
            parsed = parse_evidence(evidence, tdx=True)
            hcl = parse_hcl_report(parsed.hcl_report)
            if hcl.report_type is not ReportType.TDX:
                raise ParseError("az.hcl_report_type", "the HCL report embeds an SNP report")
            td_fields = td_report_fields(hcl.td_report)
        except ParseError as exc:
            return failed(FAMILY, exc)
        assert parsed.td_quote is not None
        findings = Findings()
        findings.check("parse", True, f"evidence v{parsed.version}, HCL v{hcl.version}, TDX")
        quote = appraise_quote(
            "tdx", parsed.td_quote, replace(options, expected_report_data=None), self.dcap_policy
        )
        findings.checks += quote.checks
        claims: dict[str, Any] = dict(quote.claims)
        if not quote.verified:
            findings.integrity += [r for r in quote.reasons if r.status is Status.CONTRAINDICATED]
        tdx_policy = [r for r in quote.reasons if r not in findings.integrity]
        findings.policy += tdx_policy
        if "report_data" in claims:
            _check_td_report(td_fields, claims, findings)
            common.check_runtime_binding(hcl, bytes.fromhex(claims["report_data"]), findings)
        vtpm_claims, pcrs_ok = common.verify_vtpm(parsed, hcl, options, self.tpm_policy, findings)
        claims.update(vtpm_claims)
        reasons = findings.reasons
        verified = quote.verified and not findings.integrity
        bound = not any(r.code in ("tpm.nonce_mismatch", "az.user_data_mismatch") for r in reasons)
        statuses = [r.status for r in reasons] + [quote.status]
        return Appraisal(
            family=FAMILY,
            status=worst(statuses),
            claims=claims,
            trust_vector=common.trust_vector(
                verified, bound, tdx_policy, bool(claims.get("debug")), pcrs_ok
            ),
            reasons=reasons,
            checks=findings.checks,
            verified=verified,
            bound=bound and options.expected_report_data is not None,
            hwid=(hwid.azure(str(claims.get("ak_public_sha256", ""))) or "") if verified else "",
        )


def _check_td_report(td_fields: dict[str, str], claims: dict[str, Any], findings: Findings) -> None:
    differing = [name for name, value in td_fields.items() if claims.get(name) != value]
    if differing:
        findings.integrity_failure(
            "td_report",
            "az.td_report_mismatch",
            f"the TD quote and the HCL report's TDREPORT differ in {', '.join(differing)}",
        )
    else:
        findings.check("td_report", True, "the TD quote signs the HCL report's TDREPORT")
