"""From a verified DCAP quote to a verdict: claims, policy, EAR status and trust vector.

Default policy (:class:`DcapPolicy`): TCB status UpToDate is affirming; SWHardeningNeeded,
ConfigurationNeeded, ConfigurationAndSWHardeningNeeded, OutOfDate and
OutOfDateConfigurationNeeded are warnings carrying the advisory IDs as reasons; Revoked, no
matching TCB level, any integrity failure (signature, chain, revocation, collateral invalid or
expired), debug mode and a bound service TD are contraindicated. Every knob of the policy can
tighten or loosen one of these; all violations are reported, not the first.

A TD 1.5 body (quote v5, body type 3) carries MRSERVICETD, the measurement of a service TD
(e.g. a migration TD) bound to the TD; a bound service TD can read and change the TD's state, so
its measurement is as much part of the TD's identity as MRTD. All zeros means none is bound. Like
dcap-qvl (whose ``QuoteVerifier`` refuses a non-zero MRSERVICETD unless ``allow_service_td`` is
set), a non-zero value is refused (``tdx.service_td_bound``) unless the policy names it in
``allowed_service_tds``; the refusal withholds ``tcb_status`` as debug mode does, so the verdict
agrees with dcap-qvl's error. TD 1.0 bodies have no such field and are not affected.

Claim names are lowercase snake_case (``mrtd``, ``rtmr0``, ``tcb_status``); byte strings are
lowercase hex; Intel's own vocabulary is kept for ``tcb_status`` (``OutOfDate``) and
``advisories`` (``INTEL-SA-00960``).

A TD quote that comes with its CCEL event log (collateral ``ccel.bin``) also has the log
replayed against its RTMRs (:mod:`.ccel`): ``ccel_events`` and ``ccel_verified`` when it holds,
``tdx.ccel_rtmr_mismatch`` or ``tdx.ccel_malformed`` (contraindicated) when not. Without a log
nothing of this appears.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import msgspec

from services.mesh.errors import PolicyError
from services.verifier.families import hwid
from services.verifier.families.base import (
    TV_AFFIRMING,
    TV_CONTRAINDICATED,
    TV_NO_CLAIM,
    TV_WARNING,
    Appraisal,
    Reason,
    Status,
    VerifyOptions,
    worst,
)
from services.verifier.families.dcap.ccel import CCEL_FILE, appraise_ccel
from services.verifier.families.dcap.pck import SGX_TYPES
from services.verifier.families.dcap.pcs import TcbStatus
from services.verifier.families.dcap.quote import EnclaveReport, Quote, TdReport
from services.verifier.families.dcap.verify import DcapResult

_TV = {
    Status.AFFIRMING: TV_AFFIRMING,
    Status.WARNING: TV_WARNING,
    Status.CONTRAINDICATED: TV_CONTRAINDICATED,
    Status.NONE: TV_NO_CLAIM,
}
_CONFIG_STATUSES = {
    TcbStatus.CONFIGURATION_NEEDED,
    TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED,
    TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED,
}
_STATUS_CODES = {
    TcbStatus.SW_HARDENING_NEEDED: "tcb_sw_hardening_needed",
    TcbStatus.CONFIGURATION_NEEDED: "tcb_configuration_needed",
    TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED: "tcb_configuration_and_sw_hardening_needed",
    TcbStatus.OUT_OF_DATE: "tcb_out_of_date",
    TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED: "tcb_out_of_date_configuration_needed",
    TcbStatus.REVOKED: "tcb_revoked",
}
_MEASUREMENT_HEX = re.compile(r"[0-9a-f]{96}")


@dataclass(frozen=True)
class DcapPolicy:
    """How Intel's verdict maps to an EAR status; one documented knob per field."""

    up_to_date: Status = Status.AFFIRMING
    """Status for TCB status UpToDate."""
    sw_hardening_needed: Status = Status.WARNING
    """Status for SWHardeningNeeded (the platform needs software mitigations)."""
    configuration_needed: Status = Status.WARNING
    """Status for ConfigurationNeeded (BIOS configuration, e.g. SMT, needs attention)."""
    configuration_and_sw_hardening_needed: Status = Status.WARNING
    """Status for ConfigurationAndSWHardeningNeeded."""
    out_of_date: Status = Status.WARNING
    """Status for OutOfDate (a TCB recovery the platform has not applied)."""
    out_of_date_configuration_needed: Status = Status.WARNING
    """Status for OutOfDateConfigurationNeeded."""
    allow_debug: bool = False
    """Accept debug TDs/enclaves (as a warning). Never for production secrets."""
    rejected_advisories: frozenset[str] = frozenset()
    """Advisory IDs that make the evidence contraindicated whatever the TCB status."""
    min_tcb_evaluation_data_number: int | None = None
    """Minimum tcbEvaluationDataNumber of the TCB info (not checked if None)."""
    allow_trailing_data: bool = False
    """Accept non-zero bytes after the quote (as a warning); zero padding is always accepted."""
    allowed_service_tds: frozenset[str] = frozenset()
    """MRSERVICETD values (48 bytes as 96 hex digits) of service TDs a TD may have bound to it.

    Any other non-zero MRSERVICETD is contraindicated (``tdx.service_td_bound``).
    """

    def __post_init__(self) -> None:
        """Normalise the service TD allow-list to lowercase hex and refuse malformed entries.

        A value that could never match (wrong length, not hex, all zeros, which means "no
        service TD") is a configuration mistake; it stops the verifier instead of silently
        refusing every TD it was meant to admit.
        """
        normalised = frozenset(value.lower() for value in self.allowed_service_tds)
        for value in sorted(normalised):
            if not _MEASUREMENT_HEX.fullmatch(value):
                raise PolicyError(
                    "dcap.policy_invalid",
                    f"allowed_service_tds entry {value[:100]!r} is not 48 bytes of hex",
                )
            if not value.strip("0"):
                raise PolicyError(
                    "dcap.policy_invalid", "allowed_service_tds: all zeros means no service TD"
                )
        object.__setattr__(self, "allowed_service_tds", normalised)

    def service_td_allowed(self, mr_servicetd: bytes) -> bool:
        """True when ``mr_servicetd`` is all zeros (none bound) or is on the allow-list."""
        if not mr_servicetd.strip(b"\0"):
            return True
        found = False
        for value in self.allowed_service_tds:
            found |= hmac.compare_digest(bytes.fromhex(value), mr_servicetd)
        return found

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> DcapPolicy:
        """Build from JSON-like data (statuses by name, advisory IDs as a list).

        An unknown name is refused rather than ignored: a misspelt knob would otherwise leave
        the default in force while the operator believes it changed.
        """
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise PolicyError("dcap.policy_invalid", f"unknown DCAP policy fields {unknown}")
        try:
            return msgspec.convert(dict(data), cls, strict=True)
        except msgspec.ValidationError as exc:
            raise PolicyError("dcap.policy_invalid", str(exc)) from None

    def tier(self, status: TcbStatus) -> Status:
        """The EAR status this policy gives a TCB status (Revoked is always contraindicated)."""
        return {
            TcbStatus.UP_TO_DATE: self.up_to_date,
            TcbStatus.SW_HARDENING_NEEDED: self.sw_hardening_needed,
            TcbStatus.CONFIGURATION_NEEDED: self.configuration_needed,
            TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED: (
                self.configuration_and_sw_hardening_needed
            ),
            TcbStatus.OUT_OF_DATE: self.out_of_date,
            TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED: self.out_of_date_configuration_needed,
        }.get(status, Status.CONTRAINDICATED)


def td_claims(td: TdReport) -> dict[str, Any]:
    """The TD report's fields under their claim names."""
    claims: dict[str, Any] = {
        "tee_tcb_svn": td.tee_tcb_svn.hex(),
        "mrseam": td.mr_seam.hex(),
        "mrsignerseam": td.mr_signer_seam.hex(),
        "seam_attributes": td.seam_attributes.hex(),
        "td_attributes": td.td_attributes.hex(),
        "xfam": td.xfam.hex(),
        "mrtd": td.mr_td.hex(),
        "mrconfigid": td.mr_config_id.hex(),
        "mrowner": td.mr_owner.hex(),
        "mrownerconfig": td.mr_owner_config.hex(),
        **{f"rtmr{i}": rtmr.hex() for i, rtmr in enumerate(td.rtmrs)},
        "report_data": td.report_data.hex(),
    }
    if td.tee_tcb_svn2 is not None and td.mr_servicetd is not None:
        claims["tee_tcb_svn2"] = td.tee_tcb_svn2.hex()
        claims["mrservicetd"] = td.mr_servicetd.hex()
    return claims


def enclave_claims(report: EnclaveReport) -> dict[str, Any]:
    """The SGX enclave report's fields under their claim names."""
    return {
        "cpusvn": report.cpu_svn.hex(),
        "miscselect": report.misc_select,
        "attributes": report.attributes.hex(),
        "mrenclave": report.mr_enclave.hex(),
        "mrsigner": report.mr_signer.hex(),
        "isvprodid": report.isv_prod_id,
        "isvsvn": report.isv_svn,
        "configid": report.config_id.hex(),
        "configsvn": report.config_svn,
        "isvextprodid": report.isv_ext_prod_id.hex(),
        "isvfamilyid": report.isv_family_id.hex(),
        "report_data": report.report_data.hex(),
    }


def _platform_claims(result: DcapResult, quote: Quote, rejected: bool) -> dict[str, Any]:
    """Platform and TCB claims; ``tcb_status``/``advisories`` stay empty for a rejected quote.

    A quote that does not verify, or is refused outright (debug not allowed), has no Intel TCB
    status to speak of, as in Intel-compatible verifiers that stop before TCB evaluation; the
    platform level that was matched is still listed in the ``tcb_level`` check.
    """
    claims: dict[str, Any] = {
        "quote_version": quote.header.version,
        "qe_svn": quote.certification.qe_report.isv_svn,
        "pce_svn": quote.header.pce_svn,
    }
    if result.pck is not None:
        claims.update(
            fmspc=result.pck.fmspc.hex(),
            pce_id=result.pck.pce_id.hex(),
            pck_cpusvn=result.pck.cpu_svn.hex(),
            pck_pcesvn=result.pck.pce_svn,
            sgx_type=SGX_TYPES.get(result.pck.sgx_type, str(result.pck.sgx_type)),
            pck_ca=result.pck_ca,
        )
        claims.update(dict(result.pck.configuration))
    tcb = None if rejected else result.tcb
    claims["tcb_status"] = str(tcb.status) if tcb is not None and tcb.status else None
    claims["advisories"] = list(tcb.advisories) if tcb is not None and tcb.status else []
    if tcb is not None and tcb.platform_level is not None:
        claims["tcb_date"] = tcb.platform_level.date
    if result.tcb_info is not None:
        claims["tcb_evaluation_data_number"] = result.tcb_info.evaluation_data_number
    if result.anchor is not None:
        claims["trust_anchor"] = result.anchor.label
    return claims


def _refused_service_td(body: EnclaveReport | TdReport, policy: DcapPolicy) -> bytes | None:
    """The MRSERVICETD of a TD 1.5 body whose bound service TD the policy does not allow."""
    if not isinstance(body, TdReport) or body.mr_servicetd is None:
        return None
    return None if policy.service_td_allowed(body.mr_servicetd) else body.mr_servicetd


def _policy_reasons(
    family: str,
    result: DcapResult,
    quote: Quote,
    options: VerifyOptions,
    policy: DcapPolicy,
    *,
    rejected: bool,
) -> list[Reason]:
    reasons: list[Reason] = []
    body = quote.body
    if body.debug:
        reasons.append(
            Reason(
                f"{family}.debug_enabled",
                "TD attribute DEBUG is set"
                if isinstance(body, TdReport)
                else "enclave attribute DEBUG is set",
                Status.WARNING if policy.allow_debug else Status.CONTRAINDICATED,
            )
        )
    service_td = _refused_service_td(body, policy)
    if service_td is not None:
        reasons.append(
            Reason(
                f"{family}.service_td_bound",
                f"service TD {service_td.hex()} is bound to the TD and not allowed by policy",
            )
        )
    if quote.trailing and not quote.trailing_is_padding:
        reasons.append(
            Reason(
                f"{family}.trailing_data",
                f"{len(quote.trailing)} non-zero bytes follow the signed quote",
                Status.WARNING if policy.allow_trailing_data else Status.CONTRAINDICATED,
            )
        )
    expected = options.expected_report_data
    if expected is not None and not hmac.compare_digest(body.report_data, expected):
        reasons.append(
            Reason(f"{family}.report_data_mismatch", "REPORTDATA is not the expected binding")
        )
    tcb = None if rejected else result.tcb
    if tcb is not None and tcb.status is not None:
        tier = policy.tier(tcb.status)
        if tcb.status != TcbStatus.UP_TO_DATE or tier != Status.AFFIRMING:
            code = _STATUS_CODES.get(tcb.status, "tcb_status")
            reasons.append(Reason(f"{family}.{code}", f"Intel TCB status {tcb.status}", tier))
            reasons.extend(
                Reason(f"{family}.advisory", f"{advisory} applies ({tcb.status})", tier)
                for advisory in tcb.advisories
            )
        refused = sorted(set(tcb.advisories) & policy.rejected_advisories)
        reasons.extend(
            Reason(f"{family}.advisory_rejected", f"{advisory} is rejected by policy")
            for advisory in refused
        )
    minimum = policy.min_tcb_evaluation_data_number
    if minimum is not None and result.tcb_info is not None:
        number = result.tcb_info.evaluation_data_number
        if number < minimum:
            reasons.append(
                Reason(
                    f"{family}.tcb_evaluation_too_old",
                    f"tcbEvaluationDataNumber {number} is below the required {minimum}",
                )
            )
    return reasons


def _trust_vector(
    verified: bool, tcb_tier: Status, debug: bool, config_warning: bool, service_td: bool
) -> dict[str, int]:
    """AR4SI vector; ``service_td``: a service TD the policy does not allow can read the TD."""
    if not verified:
        bad = TV_CONTRAINDICATED
        return {
            "instance-identity": bad,
            "hardware": bad,
            "configuration": TV_NO_CLAIM,
            "executables": TV_NO_CLAIM,
            "file-system": TV_NO_CLAIM,
            "runtime-opaque": bad,
            "storage-opaque": TV_NO_CLAIM,
            "sourced-data": TV_NO_CLAIM,
        }
    configuration = TV_AFFIRMING
    if config_warning:
        configuration = TV_WARNING
    if debug or service_td:
        configuration = TV_CONTRAINDICATED
    exposed = debug or service_td
    return {
        "instance-identity": TV_AFFIRMING,
        "hardware": _TV[tcb_tier],
        "configuration": configuration,
        "executables": TV_NO_CLAIM,
        "file-system": TV_NO_CLAIM,
        "runtime-opaque": TV_CONTRAINDICATED if exposed else TV_AFFIRMING,
        "storage-opaque": TV_NO_CLAIM,
        "sourced-data": TV_NO_CLAIM,
    }


def to_appraisal(
    family: str, result: DcapResult, options: VerifyOptions, policy: DcapPolicy
) -> Appraisal:
    """Claims, reasons, status and trust vector of one verified (or failed) quote."""
    findings = result.findings
    reasons = findings.for_family(family)
    checks = list(findings.checks)
    quote = result.quote
    claims: dict[str, Any] = {}
    tcb_tier = Status.CONTRAINDICATED
    debug = False
    service_td = False
    config_warning = False
    if quote is not None:
        body = quote.body
        debug = body.debug
        service_td = _refused_service_td(body, policy) is not None
        claims = td_claims(body) if isinstance(body, TdReport) else enclave_claims(body)
        claims["debug"] = debug
        rejected = not findings.integrity_ok or (debug and not policy.allow_debug) or service_td
        claims.update(_platform_claims(result, quote, rejected))
        reasons.extend(_policy_reasons(family, result, quote, options, policy, rejected=rejected))
        log = options.collateral.get(CCEL_FILE)
        if isinstance(body, TdReport) and log is not None:
            ccel_claims, check, ccel_reasons = appraise_ccel(
                family, log, body.rtmrs, quote_verified=findings.integrity_ok
            )
            claims.update(ccel_claims)
            checks.append(check)
            reasons.extend(ccel_reasons)
        if result.tcb is not None and result.tcb.status is not None:
            tcb_tier = policy.tier(result.tcb.status)
            config_warning = result.tcb.status in _CONFIG_STATUSES
    verified = findings.integrity_ok and quote is not None
    statuses = [r.status for r in reasons]
    if not verified:
        statuses.append(Status.CONTRAINDICATED)
    if result.tcb is None or result.tcb.status is None:
        statuses.append(Status.CONTRAINDICATED)
    status = worst(statuses)
    return Appraisal(
        family=family,
        status=status,
        claims=claims,
        trust_vector=_trust_vector(verified, tcb_tier, debug, config_warning, service_td),
        reasons=reasons,
        checks=checks,
        verified=verified,
        bound=verified and _bound(quote, options),
        hwid=hwid.dcap(result.pck.platform_instance_id, result.pck.ppid)
        if verified and result.pck is not None
        else "",
    )


def _bound(quote: Quote | None, options: VerifyOptions) -> bool:
    expected = options.expected_report_data
    if quote is None or expected is None:
        return False
    return hmac.compare_digest(quote.body.report_data, expected)
