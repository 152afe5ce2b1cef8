"""SEV-SNP appraisal: claims, an EAR trust vector and a status, never an exception.

:class:`SnpVerifier` runs parse -> verify -> policy on evidence in either form (the raw report
with its optional certificate table, or Confidential Containers' JSON). Malformed or untrusted
evidence becomes a contraindicated :class:`Appraisal` carrying every reason found; ``verified``
is true only when the report signature and the whole VEK chain hold.

Claims (byte strings as lowercase hex; 64-bit bit fields as 16 hex digits of their value; TCB
values as the hex of their 8 raw bytes, decoded beside them under ``tcb``)::

    version guest_svn policy policy_flags family_id image_id vmpl signature_algo
    current_tcb reported_tcb committed_tcb launch_tcb tcb platform_info platform_flags
    signing_key author_key_en mask_chip_key report_data measurement host_data id_key_digest
    author_key_digest report_id report_id_ma chip_id current_version committed_version
    cpuid (v3+) launch_mit_vector current_mit_vector (v5) debug product trust_anchor

Trust vector (AR4SI): ``instance-identity`` and ``hardware`` follow the signature/chain result
(and, for identity, the REPORT_DATA binding); ``configuration`` and ``runtime-opaque`` the
guest policy (debug, migration, SMT, TCB, firmware knobs); ``executables`` the measurement
allow-list (no claim when none is configured). The rest make no claim.
"""

from __future__ import annotations

from typing import Any, ClassVar

from cryptography.hazmat.primitives import serialization

from services.mesh.errors import ParseError
from services.verifier.families import hwid
from services.verifier.families.base import (
    TV_AFFIRMING,
    TV_CONTRAINDICATED,
    TV_NO_CLAIM,
    TV_WARNING,
    Appraisal,
    Check,
    Reason,
    Status,
    VerifyOptions,
    trust_vector,
    unparsable,
    worst,
)
from services.verifier.families.snp import policy as snp_policy
from services.verifier.families.snp.evidence import is_coco, load_evidence
from services.verifier.families.snp.parse import AttestationReport
from services.verifier.families.snp.policy import SnpPolicy
from services.verifier.families.snp.verify import SnpVerification, verify

FAMILY = "snp"

_CONFIG_CODES = frozenset(
    {
        "snp.debug_enabled",
        "snp.migration_agent_allowed",
        "snp.single_socket_not_required",
        "snp.smt_enabled",
        "snp.provisional_firmware",
        "snp.vmpl_too_high",
        "snp.tcb_below_minimum",
        "snp.launch_tcb_below_minimum",
        "snp.firmware_below_minimum",
        "snp.policy_reserved_bits",
        "snp.guest_svn_below_minimum",
        "snp.id_key_not_allowed",
        "snp.author_key_not_allowed",
        "snp.family_id_not_allowed",
        "snp.image_id_not_allowed",
        "snp.host_data_not_allowed",
    }
)
_HARDWARE_CODES = frozenset(
    {
        "snp.tcb_below_minimum",
        "snp.firmware_below_minimum",
        "snp.chip_id_not_allowed",
        "snp.product_not_allowed",
        "snp.signing_key_not_allowed",
        "snp.test_anchor_not_allowed",
    }
)
_RUNTIME_CODES = frozenset({"snp.debug_enabled", "snp.migration_agent_allowed"})


class SnpVerifier:
    """The SEV-SNP family verifier (see the module docstring for claims and reasons)."""

    family: ClassVar[str] = FAMILY

    def __init__(self, policy: SnpPolicy | None = None) -> None:
        self.policy = policy if policy is not None else SnpPolicy()

    def appraise(self, evidence: bytes, options: VerifyOptions) -> Appraisal:
        """Parse, verify and appraise ``evidence``; never raises for bad input."""
        try:
            parsed = load_evidence(evidence)
        except ParseError as exc:
            return unparsable(FAMILY, exc)
        report = parsed.report
        result = verify(parsed, options)
        described = _describe(report, parsed.cert_table is not None, coco=is_coco(evidence))
        checks = [Check("parse", True, described)]
        checks += result.checks
        policy_reasons, policy_checks = snp_policy.evaluate(
            self.policy,
            report,
            product=result.product.value if result.product else None,
            trust_anchor=result.trust_anchor,
        )
        checks += policy_checks
        reasons = [*result.reasons, *policy_reasons]
        return Appraisal(
            family=FAMILY,
            status=worst([r.status for r in reasons]),
            claims=claims(report, result),
            trust_vector=_trust_vector(result, policy_reasons, self.policy),
            reasons=reasons,
            checks=checks,
            verified=result.verified,
            bound=options.expected_report_data is not None and not result.binding_failures,
            hwid=_hwid(report, result),
        )


def _hwid(report: AttestationReport, result: SnpVerification) -> str:
    if not result.verified or result.vek is None:
        return ""
    spki = result.vek.public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hwid.snp(report.chip_id, spki)


def claims(report: AttestationReport, result: SnpVerification | None = None) -> dict[str, Any]:
    """The report's claims (see the module docstring), plus what verification established."""
    flags = report.policy_flags
    out: dict[str, Any] = {
        "version": report.version,
        "guest_svn": report.guest_svn,
        "policy": f"{report.policy:016x}",
        "policy_flags": flags.as_dict(),
        "family_id": report.family_id.hex(),
        "image_id": report.image_id.hex(),
        "vmpl": report.vmpl,
        "signature_algo": report.signature_algo,
        "current_tcb": report.current_tcb.encode().hex(),
        "reported_tcb": report.reported_tcb.encode().hex(),
        "committed_tcb": report.committed_tcb.encode().hex(),
        "launch_tcb": report.launch_tcb.encode().hex(),
        "tcb": {
            "current": report.current_tcb.as_dict(),
            "reported": report.reported_tcb.as_dict(),
            "committed": report.committed_tcb.as_dict(),
            "launch": report.launch_tcb.as_dict(),
        },
        "platform_info": f"{report.platform_info:016x}",
        "platform_flags": report.platform_flags.as_dict(),
        "signing_key": report.signing_key.name.lower(),
        "author_key_en": report.author_key_en,
        "mask_chip_key": report.mask_chip_key,
        "report_data": report.report_data.hex(),
        "measurement": report.measurement.hex(),
        "host_data": report.host_data.hex(),
        "id_key_digest": report.id_key_digest.hex(),
        "author_key_digest": report.author_key_digest.hex(),
        "report_id": report.report_id.hex(),
        "report_id_ma": report.report_id_ma.hex(),
        "chip_id": report.chip_id.hex(),
        "current_version": _version(
            report.current_major, report.current_minor, report.current_build
        ),
        "committed_version": _version(
            report.committed_major, report.committed_minor, report.committed_build
        ),
        "debug": flags.debug,
    }
    if report.cpuid_fam_id is not None:
        out["cpuid"] = {
            "family": report.cpuid_fam_id,
            "model": report.cpuid_mod_id,
            "stepping": report.cpuid_step,
        }
    if report.launch_mit_vector is not None:
        out["launch_mit_vector"] = f"{report.launch_mit_vector:016x}"
        out["current_mit_vector"] = f"{report.current_mit_vector:016x}"
    product = result.product if result is not None else None
    product = product or report.product_hint
    out["product"] = product.value if product is not None else None
    out["trust_anchor"] = result.trust_anchor if result is not None else None
    return out


def _version(major: int, minor: int, build: int) -> str:
    return f"{major}.{minor}.{build}"


def _describe(report: AttestationReport, with_table: bool, *, coco: bool) -> str:
    hint = report.product_hint
    where = f", CPUID {hint.value}" if hint else ""
    table = ", with certificate table" if with_table else ""
    form = " (re-encoded from Confidential Containers JSON)" if coco else ""
    return f"ATTESTATION_REPORT VERSION {report.version}{where}{table}{form}"


def _trust_vector(
    result: SnpVerification, policy_reasons: list[Reason], policy: SnpPolicy
) -> dict[str, int]:
    if not result.verified:
        return trust_vector(
            instance=TV_CONTRAINDICATED,
            hardware=TV_CONTRAINDICATED,
            configuration=TV_CONTRAINDICATED,
            runtime=TV_CONTRAINDICATED,
        )
    codes = {r.code: r.status for r in policy_reasons}

    def tier(relevant: frozenset[str]) -> int:
        found = [status for code, status in codes.items() if code in relevant]
        if Status.CONTRAINDICATED in found:
            return TV_CONTRAINDICATED
        return TV_WARNING if found else TV_AFFIRMING

    executables = TV_NO_CLAIM
    if policy.allowed_measurements is not None:
        bad = "snp.measurement_not_allowed" in codes
        executables = TV_CONTRAINDICATED if bad else TV_AFFIRMING
    instance = TV_CONTRAINDICATED if result.binding_failures else TV_AFFIRMING
    return trust_vector(
        instance=instance,
        hardware=tier(_HARDWARE_CODES),
        configuration=tier(_CONFIG_CODES),
        runtime=tier(_RUNTIME_CODES),
        executables=executables,
    )
