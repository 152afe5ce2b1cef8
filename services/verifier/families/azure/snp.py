"""az-snp-vtpm: an Azure SEV-SNP confidential VM's HCL report, VCEK and vTPM quote.

Verification is the snp family's own, called on the SNP report the HCL report embeds with the
evidence's VCEK as collateral (``vcek.der``; an operator-supplied ``crl.der`` passes through):
signature, VCEK chain to the pinned ARK, TCB and chip ID, then the :class:`SnpPolicy`, which
here defaults to ``max_vmpl=0`` (the HCL runs at VMPL0; a report from a lower privilege level is
not the paravisor's). Then :mod:`.common`: runtime-data binding into REPORT_DATA, the AK, the
vTPM quote, the nonce in extraData. Claims are the snp family's, unprefixed (``measurement``,
``report_data``, ``chip_id``, ``trust_anchor``...), plus those of :mod:`.common`. Reason codes
keep their component's prefix: ``snp.*`` for the hardware report, ``tpm.*`` for the vTPM quote,
``az.*`` for the HCL layer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

from services.mesh.errors import ParseError
from services.verifier.families import hwid
from services.verifier.families.azure import common
from services.verifier.families.azure.evidence import parse_evidence
from services.verifier.families.azure.hcl import ReportType, parse_hcl_report
from services.verifier.families.base import Appraisal, Check, Reason, Status, VerifyOptions, worst
from services.verifier.families.snp import claims as snp_claims
from services.verifier.families.snp import policy as snp_policy
from services.verifier.families.snp.parse import AttestationReport, SnpEvidence, parse_report
from services.verifier.families.snp.policy import SnpPolicy
from services.verifier.families.snp.verify import SnpVerification, verify
from services.verifier.families.tpm.appraise import Findings
from services.verifier.families.tpm.policy import TpmPolicy

FAMILY = "az-snp-vtpm"
CRL_NAME = "crl.der"


def failed(family: str, exc: ParseError) -> Appraisal:
    """The appraisal of evidence that could not be parsed."""
    detail = exc.detail or exc.reason
    return Appraisal(
        family=family,
        status=Status.CONTRAINDICATED,
        trust_vector=common.trust_vector(False, False, [], False, None),
        reasons=[Reason(exc.reason, detail)],
        checks=[Check("parse", False, detail)],
    )


class AzSnpVtpmVerifier:
    """Azure SEV-SNP CVM evidence (see the module docstring)."""

    family: ClassVar[str] = FAMILY

    def __init__(
        self, snp_policy: SnpPolicy | None = None, tpm_policy: TpmPolicy | None = None
    ) -> None:
        self.snp_policy = snp_policy if snp_policy is not None else SnpPolicy(max_vmpl=0)
        self.tpm_policy = tpm_policy if tpm_policy is not None else TpmPolicy()

    def appraise(self, evidence: bytes, options: VerifyOptions) -> Appraisal:
        """Parse, verify and appraise ``evidence``; never raises for bad input."""
        try:
            parsed = parse_evidence(evidence, tdx=False)
            hcl = parse_hcl_report(parsed.hcl_report)
            if hcl.report_type is not ReportType.SNP:
                raise ParseError("az.hcl_report_type", "the HCL report embeds a TD report")
            report = parse_report(hcl.snp_report)
        except ParseError as exc:
            return failed(FAMILY, exc)
        assert parsed.vcek is not None
        findings = Findings()
        findings.check("parse", True, f"evidence v{parsed.version}, HCL v{hcl.version}, SNP")
        snp_config = self._verify_snp(report, parsed.vcek, options, findings)
        claims = snp_claims(report, snp_config[0])
        common.check_runtime_binding(hcl, report.report_data, findings)
        vtpm_claims, pcrs_ok = common.verify_vtpm(parsed, hcl, options, self.tpm_policy, findings)
        claims.update(vtpm_claims)
        reasons = findings.reasons
        verified = not findings.integrity
        bound = not any(r.code in ("tpm.nonce_mismatch", "az.user_data_mismatch") for r in reasons)
        return Appraisal(
            family=FAMILY,
            status=worst([r.status for r in reasons]),
            claims=claims,
            trust_vector=common.trust_vector(
                verified, bound, snp_config[1], report.policy_flags.debug, pcrs_ok
            ),
            reasons=reasons,
            checks=findings.checks,
            verified=verified,
            bound=bound and options.expected_report_data is not None,
            hwid=(hwid.azure(str(claims.get("ak_public_sha256", ""))) or "") if verified else "",
        )

    def _verify_snp(
        self, report: AttestationReport, vcek: bytes, options: VerifyOptions, findings: Findings
    ) -> tuple[SnpVerification, list[Reason]]:
        collateral = {"vcek.der": vcek, "vlek.der": vcek}
        crl = options.collateral.get(CRL_NAME)
        if crl is not None:
            collateral[CRL_NAME] = crl
        snp_options = replace(options, collateral=collateral, expected_report_data=None)
        result = verify(SnpEvidence(report), snp_options)
        findings.checks += result.checks
        findings.integrity += result.failures
        policy_reasons, policy_checks = snp_policy.evaluate(
            self.snp_policy,
            report,
            product=result.product.value if result.product else None,
            trust_anchor=result.trust_anchor,
        )
        findings.checks += policy_checks
        findings.policy += policy_reasons
        return result, policy_reasons
