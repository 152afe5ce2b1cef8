"""Intel's TCB matching and status convergence, rule by rule."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from services.verifier.families.dcap.pcs import (
    IsvLevel,
    QeIdentity,
    TcbInfo,
    TcbLevel,
    TcbStatus,
    TdxModule,
)
from services.verifier.families.dcap.quote import EnclaveReport, TdReport
from services.verifier.families.dcap.tcb import (
    TcbResult,
    check_qe_identity,
    converge,
    evaluate,
    select_platform_level,
)

S = TcbStatus
NOW = datetime(2025, 1, 1, tzinfo=UTC)
QE_SIGNER = b"\x8c" * 32


def level(
    sgx: int, pce: int, status: TcbStatus, tdx: int = 0, advisories: tuple[str, ...] = ()
) -> TcbLevel:
    return TcbLevel((sgx,) * 16, pce, (tdx,) * 16, "2024-01-01", status, advisories)


def module(ident: str, levels: tuple[IsvLevel, ...] = ()) -> TdxModule:
    return TdxModule(ident, bytes(48), bytes(8), b"\xff" * 8, levels)


def tcb_info(*levels: TcbLevel, identities: tuple[TdxModule, ...] = ()) -> TcbInfo:
    ordered = sorted(levels, key=lambda lv: (lv.sgx_svns, lv.pce_svn, lv.tdx_svns), reverse=True)
    return TcbInfo("TDX", 3, NOW, NOW, bytes(6), bytes(2), 0, 17, tuple(ordered),
                   module(""), identities)  # fmt: skip


def qe_identity(*levels: tuple[int, TcbStatus, tuple[str, ...]]) -> QeIdentity:
    isv = tuple(IsvLevel(svn, "2024-01-01", status, adv) for svn, status, adv in levels)
    return QeIdentity("TD_QE", 2, NOW, NOW, 17, 0, 0xFFFFFFFF, bytes([0x11]) + bytes(15),
                      bytes([0xFB]) + b"\xff" * 7 + bytes(8), QE_SIGNER, 2, isv)  # fmt: skip


def qe_report(isv_svn: int = 4, **changes: object) -> EnclaveReport:
    report = EnclaveReport(bytes(16), 0, bytes(16), bytes([0x11]) + bytes(15), bytes(32),
                           QE_SIGNER, bytes(64), 2, isv_svn, 0, bytes(16), bytes(64))  # fmt: skip
    return replace(report, **changes)  # type: ignore[arg-type]


def td(tee_tcb_svn: bytes, **changes: object) -> TdReport:
    report = TdReport(tee_tcb_svn, bytes(48), bytes(48), bytes(8), bytes(8), bytes(8), bytes(48),
                      bytes(48), bytes(48), bytes(48), (bytes(48),) * 4, bytes(64))  # fmt: skip
    return replace(report, **changes)  # type: ignore[arg-type]


def svn(*head: int) -> bytes:
    return bytes(head) + bytes(16 - len(head))


def test_sgx_level_is_the_first_with_all_components_and_pcesvn_met() -> None:
    info = tcb_info(level(5, 11, S.UP_TO_DATE), level(5, 5, S.OUT_OF_DATE), level(3, 5, S.REVOKED))
    assert select_platform_level(info, (5,) * 16, 11, None) == info.levels[0]
    assert select_platform_level(info, (5,) * 16, 10, None) == info.levels[1]
    assert select_platform_level(info, (4,) * 15 + (9,), 11, None) == info.levels[2]
    assert select_platform_level(info, (2,) * 16, 11, None) is None


def test_tdx_components_skip_module_bytes_when_major_version_is_set() -> None:
    info = tcb_info(level(1, 1, S.UP_TO_DATE, tdx=5), level(1, 1, S.OUT_OF_DATE, tdx=3))
    # Major version 0: all 16 bytes count, so a low byte 0 or 1 fails a level.
    assert select_platform_level(info, (1,) * 16, 1, svn(4, 0) + b"") is None
    full = bytes([5] * 16)
    assert select_platform_level(info, (1,) * 16, 1, full) == info.levels[0]
    # Major version 1: bytes 0 and 1 are the module's, judged by its identity instead.
    skipped = svn(0, 1, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5)
    assert select_platform_level(info, (1,) * 16, 1, skipped) == info.levels[0]
    lower = svn(9, 1, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4)
    assert select_platform_level(info, (1,) * 16, 1, lower) == info.levels[1]


@pytest.mark.parametrize(
    ("platform", "other", "expected"),
    [
        (S.UP_TO_DATE, S.UP_TO_DATE, S.UP_TO_DATE),
        (S.UP_TO_DATE, S.OUT_OF_DATE, S.OUT_OF_DATE),
        (S.SW_HARDENING_NEEDED, S.OUT_OF_DATE, S.OUT_OF_DATE),
        (S.CONFIGURATION_NEEDED, S.OUT_OF_DATE, S.OUT_OF_DATE_CONFIGURATION_NEEDED),
        (
            S.CONFIGURATION_AND_SW_HARDENING_NEEDED,
            S.OUT_OF_DATE,
            S.OUT_OF_DATE_CONFIGURATION_NEEDED,
        ),
        (S.OUT_OF_DATE, S.OUT_OF_DATE, S.OUT_OF_DATE),
        (S.OUT_OF_DATE_CONFIGURATION_NEEDED, S.OUT_OF_DATE, S.OUT_OF_DATE_CONFIGURATION_NEEDED),
        (S.CONFIGURATION_NEEDED, S.UP_TO_DATE, S.CONFIGURATION_NEEDED),
        (S.UP_TO_DATE, S.REVOKED, S.REVOKED),
        (S.REVOKED, S.UP_TO_DATE, S.REVOKED),
    ],
)
def test_convergence_follows_intel(platform: S, other: S, expected: S) -> None:
    assert converge(platform, other) == expected


def test_module_identity_status_and_advisories_are_folded_in() -> None:
    identity = module("TDX_01", (IsvLevel(4, "d", S.UP_TO_DATE, ()),
                                 IsvLevel(2, "d", S.OUT_OF_DATE, ("INTEL-SA-M",))))  # fmt: skip
    info = tcb_info(level(1, 1, S.SW_HARDENING_NEEDED, advisories=("INTEL-SA-P",)),
                    identities=(identity,))  # fmt: skip
    qe = qe_identity((4, S.UP_TO_DATE, ("INTEL-SA-Q",)))
    current = evaluate(info, (1,) * 16, 1, td=td(svn(4, 1)), qe_identity=qe, qe=qe_report())
    assert current.status == S.SW_HARDENING_NEEDED
    assert current.advisories == ("INTEL-SA-P", "INTEL-SA-Q")
    old = evaluate(info, (1,) * 16, 1, td=td(svn(3, 1)), qe_identity=qe, qe=qe_report())
    assert old.status == S.OUT_OF_DATE
    assert old.advisories == ("INTEL-SA-P", "INTEL-SA-M", "INTEL-SA-Q")
    below = evaluate(info, (1,) * 16, 1, td=td(svn(1, 1)), qe_identity=qe, qe=qe_report())
    assert below.status is None and below.failure is not None
    assert below.failure.code == "dcap.tcb_level_not_found"


def test_module_identity_must_exist_and_match() -> None:
    info = tcb_info(level(1, 1, S.UP_TO_DATE), identities=(module("TDX_01"),))
    missing = evaluate(info, (1,) * 16, 1, td=td(svn(4, 3)), qe_identity=None, qe=qe_report())
    assert missing.failure is not None and missing.failure.code == "dcap.tdx_module_mismatch"
    signer = td(svn(4, 0), mr_signer_seam=b"\x01" * 48)
    wrong = evaluate(info, (1,) * 16, 1, td=signer, qe_identity=None, qe=qe_report())
    assert wrong.failure is not None and "MRSIGNERSEAM" in wrong.failure.message
    attrs = td(svn(4, 0), seam_attributes=b"\x01" + bytes(7))
    wrong = evaluate(info, (1,) * 16, 1, td=attrs, qe_identity=None, qe=qe_report())
    assert wrong.failure is not None and "SEAMATTRIBUTES" in wrong.failure.message
    version_zero = evaluate(info, (1,) * 16, 1, td=td(svn(0, 0)), qe_identity=None,
                            qe=qe_report())  # fmt: skip
    assert version_zero.status == S.UP_TO_DATE


def test_qe_identity_levels_and_mismatches() -> None:
    info = tcb_info(level(1, 1, S.CONFIGURATION_NEEDED))
    qe = qe_identity((4, S.UP_TO_DATE, ()), (2, S.OUT_OF_DATE, ("INTEL-SA-Q",)),
                     (1, S.REVOKED, ()))  # fmt: skip

    def status(isv_svn: int) -> TcbResult:
        return evaluate(info, (1,) * 16, 1, td=None, qe_identity=qe, qe=qe_report(isv_svn))

    assert status(5).status == S.CONFIGURATION_NEEDED
    old = status(3)
    assert old.status == S.OUT_OF_DATE_CONFIGURATION_NEEDED and old.advisories == ("INTEL-SA-Q",)
    assert status(1).status == S.REVOKED
    none = status(0)
    assert none.status is None and none.failure is not None
    assert check_qe_identity(qe, qe_report()) == []
    problems = check_qe_identity(
        qe, qe_report(mr_signer=bytes(32), isv_prod_id=1, attributes=bytes([0x13]) + bytes(15))
    )
    assert len(problems) == 4 and all(p.code == "dcap.qe_identity_mismatch" for p in problems)
    assert any("debug" in p.message for p in problems)
