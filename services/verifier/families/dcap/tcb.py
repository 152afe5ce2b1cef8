"""Intel's TCB status rules: which TCB level a platform is at, and the converged status.

This follows Intel's Quote Verification Library:

* **Platform level.** TCB levels are sorted highest first; the SGX level is the first whose 16
  SGX component SVNs are all <= the PCK certificate's CPU SVN components and whose PCESVN is
  <= the certificate's. For TDX the level must also have every TDX component SVN <= the TD
  report's TEE_TCB_SVN, where bytes 0 and 1 (the TDX module's SVN and major version) are left
  out when the major version is not 0, because the module is then judged by its own identity.
* **TDX module.** Major version 0 is checked against ``tdxModule`` only. Otherwise the identity
  ``TDX_<major as 2 hex digits>`` must exist; MRSIGNERSEAM must equal its ``mrsigner`` and
  SEAMATTRIBUTES must be zero and equal its ``attributes``; its status is that of the first
  module level whose ISVSVN is <= TEE_TCB_SVN[0].
* **QE identity.** MRSIGNER and ISVPRODID equal, MISCSELECT and ATTRIBUTES equal under their
  masks; the QE's status is that of the first level whose ISVSVN is <= the QE report's.
* **Convergence.** A module or QE that is OutOfDate makes UpToDate/SWHardeningNeeded platforms
  OutOfDate and ConfigurationNeeded/ConfigurationAndSWHardeningNeeded ones
  OutOfDateConfigurationNeeded; a revoked one makes the result Revoked.

Advisory IDs are the union (in that order, without repeats) of the selected platform level's,
the module level's and the QE level's. TDX 1.5 "relaunch advised" statuses are not produced.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.verifier.families.dcap.pcs import (
    IsvLevel,
    QeIdentity,
    TcbInfo,
    TcbLevel,
    TcbStatus,
    TdxModule,
)
from services.verifier.families.dcap.quote import EnclaveReport, TdReport

_SEVERITY = {
    TcbStatus.UP_TO_DATE: 0,
    TcbStatus.SW_HARDENING_NEEDED: 1,
    TcbStatus.CONFIGURATION_NEEDED: 2,
    TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED: 3,
    TcbStatus.OUT_OF_DATE: 4,
    TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED: 5,
    TcbStatus.REVOKED: 6,
}


@dataclass(frozen=True)
class Mismatch:
    """An identity check that failed: ``code`` is the shared reason code."""

    code: str
    message: str


@dataclass(frozen=True)
class TcbResult:
    """The converged status, or the reason no status exists (``status`` is then None)."""

    status: TcbStatus | None
    advisories: tuple[str, ...]
    platform_level: TcbLevel | None = None
    module_level: IsvLevel | None = None
    qe_level: IsvLevel | None = None
    failure: Mismatch | None = None


def converge(platform: TcbStatus, other: TcbStatus) -> TcbStatus:
    """Fold a QE or TDX module status into a platform status, as Intel's QVL does."""
    if other == TcbStatus.REVOKED:
        return TcbStatus.REVOKED
    if other == TcbStatus.OUT_OF_DATE:
        if platform in (TcbStatus.UP_TO_DATE, TcbStatus.SW_HARDENING_NEEDED):
            return TcbStatus.OUT_OF_DATE
        if platform in (
            TcbStatus.CONFIGURATION_NEEDED,
            TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED,
        ):
            return TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED
    if _SEVERITY[other] > _SEVERITY[platform] and other != TcbStatus.OUT_OF_DATE:
        return other
    return platform


def _union(*groups: tuple[str, ...]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for group in groups:
        for advisory in group:
            seen.setdefault(advisory, None)
    return tuple(seen)


def _first_isv_level(levels: tuple[IsvLevel, ...], isv_svn: int) -> IsvLevel | None:
    return next((level for level in levels if isv_svn >= level.isv_svn), None)


def select_platform_level(
    tcb_info: TcbInfo, cpu_svn: tuple[int, ...], pce_svn: int, tee_tcb_svn: bytes | None
) -> TcbLevel | None:
    """The first level the platform meets (see the module docstring), or None."""
    skip = 2 if tee_tcb_svn is not None and tee_tcb_svn[1] > 0 else 0
    for level in tcb_info.levels:
        if pce_svn < level.pce_svn:
            continue
        if any(have < need for have, need in zip(cpu_svn, level.sgx_svns, strict=True)):
            continue
        if tee_tcb_svn is None:
            return level
        if all(tee_tcb_svn[i] >= level.tdx_svns[i] for i in range(skip, 16)):
            return level
    return None


def check_tdx_module(tcb_info: TcbInfo, td: TdReport) -> tuple[IsvLevel | None, Mismatch | None]:
    """The TDX module's identity check and, for major versions > 0, its TCB level."""
    base = tcb_info.tdx_module
    if base is None:
        return None, Mismatch("dcap.tdx_module_mismatch", "TCB info has no tdxModule")
    major, isv_svn = td.tee_tcb_svn[1], td.tee_tcb_svn[0]
    identity: TdxModule = base
    if major > 0:
        wanted = f"TDX_{major:02X}"
        found = [m for m in tcb_info.module_identities if m.id.upper() == wanted]
        if not found:
            return None, Mismatch(
                "dcap.tdx_module_mismatch", f"TCB info has no TDX module identity {wanted}"
            )
        identity = found[0]
    if td.mr_signer_seam != identity.mrsigner:
        return None, Mismatch(
            "dcap.tdx_module_mismatch",
            f"MRSIGNERSEAM {td.mr_signer_seam.hex()} is not the module signer "
            f"{identity.mrsigner.hex()}",
        )
    if any(td.seam_attributes) or td.seam_attributes != identity.attributes:
        return None, Mismatch(
            "dcap.tdx_module_mismatch",
            f"SEAMATTRIBUTES {td.seam_attributes.hex()} are not zero or differ from "
            f"{identity.attributes.hex()}",
        )
    if major == 0:
        return None, None
    level = _first_isv_level(identity.levels, isv_svn)
    if level is None:
        return None, Mismatch(
            "dcap.tcb_level_not_found",
            f"TDX module ISVSVN {isv_svn} is below every level of {identity.id}",
        )
    return level, None


def check_qe_identity(identity: QeIdentity, qe: EnclaveReport) -> list[Mismatch]:
    """Every way the QE report differs from Intel's QE identity (empty when it matches)."""
    problems: list[Mismatch] = []
    code = "dcap.qe_identity_mismatch"
    if qe.mr_signer != identity.mrsigner:
        problems.append(Mismatch(code, f"QE MRSIGNER {qe.mr_signer.hex()} is not Intel's"))
    if qe.isv_prod_id != identity.isv_prod_id:
        problems.append(
            Mismatch(code, f"QE ISVPRODID {qe.isv_prod_id} is not {identity.isv_prod_id}")
        )
    mask = identity.miscselect_mask
    if qe.misc_select & mask != identity.miscselect & mask:
        problems.append(Mismatch(code, f"QE MISCSELECT {qe.misc_select:#010x} under mask differs"))
    masked = bytes(a & m for a, m in zip(qe.attributes, identity.attributes_mask, strict=True))
    wanted = bytes(
        a & m for a, m in zip(identity.attributes, identity.attributes_mask, strict=True)
    )
    if masked != wanted:
        problems.append(Mismatch(code, f"QE ATTRIBUTES {qe.attributes.hex()} under mask differ"))
    if qe.debug:
        problems.append(Mismatch(code, "the quoting enclave runs in debug mode"))
    return problems


def evaluate(
    tcb_info: TcbInfo,
    cpu_svn: tuple[int, ...],
    pce_svn: int,
    *,
    td: TdReport | None,
    qe_identity: QeIdentity | None,
    qe: EnclaveReport,
) -> TcbResult:
    """The converged TCB status of a platform (and TDX module) with its QE, per Intel's rules."""
    tee_tcb_svn = td.tee_tcb_svn if td is not None else None
    level = select_platform_level(tcb_info, cpu_svn, pce_svn, tee_tcb_svn)
    if level is None:
        return TcbResult(
            None, (), failure=Mismatch("dcap.tcb_level_not_found", "no matching TCB level")
        )
    status = level.status
    module_level: IsvLevel | None = None
    if td is not None:
        module_level, mismatch = check_tdx_module(tcb_info, td)
        if mismatch is not None:
            return TcbResult(None, (), level, failure=mismatch)
        if module_level is not None:
            status = converge(status, module_level.status)
    qe_level: IsvLevel | None = None
    if qe_identity is not None and status != TcbStatus.REVOKED:
        qe_level = _first_isv_level(qe_identity.levels, qe.isv_svn)
        if qe_level is None:
            return TcbResult(
                None,
                (),
                level,
                module_level,
                failure=Mismatch(
                    "dcap.tcb_level_not_found",
                    f"QE ISVSVN {qe.isv_svn} is below every QE identity level",
                ),
            )
        status = converge(status, qe_level.status)
    advisories = _union(
        level.advisories,
        module_level.advisories if module_level else (),
        qe_level.advisories if qe_level else (),
    )
    return TcbResult(status, advisories, level, module_level, qe_level)
