"""/dev/tdx_guest: the TDREPORT of a TDX guest, and why it is not evidence on its own.

``TDX_CMD_GET_REPORT0`` (``include/uapi/linux/tdx-guest.h``) takes ``struct tdx_report_req {
__u8 reportdata[64]; __u8 tdreport[1024]; }`` (1088 bytes, passed in place) and fills in the
TDREPORT from ``TDG.MR.REPORT``. Its number is ``_IOWR('T', 1, struct tdx_report_req) = 3 << 30
| 1088 << 16 | ord('T') << 8 | 1 = 0xC4405401``.

A TDREPORT is MAC'd with a key only this CPU holds: a remote verifier can check it no more than
a stranger could. It becomes evidence once the quoting enclave signs it into a DCAP quote, which
the kernel does for us through configfs-tsm (provider ``tdx_guest``, Linux 6.7+) or, on older
kernels, a guest-side request to a Quote Generation Service (QGS) that attestmesh does not speak
yet. So the TDX evidence source *is* the configfs-tsm source; :mod:`.detect` chooses it first
and, on a node with only this device, raises :func:`quote_unavailable` rather than shipping
something no verifier can use. :class:`TdxGuestDevice` remains for local checks and for a future
QGS client; it echoes REPORT_DATA and REPORTTYPE checks only, the MAC cannot be checked here.

TDREPORT_STRUCT layout used for those checks: REPORTMACSTRUCT (256 bytes: REPORTTYPE {type
0x81 = TDX, subtype 0, version, reserved} at 0, CPUSVN at 16, TEE_TCB_INFO_HASH at 32,
TEE_INFO_HASH at 80, REPORTDATA at 128, MAC at 224), TEE_TCB_INFO (239), reserved (17), TDINFO
(512).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from services.collector.sources.checks import REPORT_DATA_SIZE, require_report_data
from services.collector.sources.configfs_tsm import DEFAULT_ROOT
from services.collector.sources.pseudofs import os_failure
from services.collector.sources.sev_guest import OS_DEVICE, DeviceOps, iowr, opened
from services.mesh.errors import ConfigError, ParseError, VerificationError

DEFAULT_PATH = Path("/dev/tdx_guest")
TDREPORT_SIZE = 1024
REPORT_TYPE_TDX = 0x81
REPORTDATA_OFFSET = 128


class TdxReportReq(ctypes.Structure):
    """``struct tdx_report_req``."""

    _fields_ = [
        ("reportdata", ctypes.c_uint8 * REPORT_DATA_SIZE),
        ("tdreport", ctypes.c_uint8 * TDREPORT_SIZE),
    ]


TDX_CMD_GET_REPORT0 = iowr("T", 1, ctypes.sizeof(TdxReportReq))


class TdxGuestDevice:
    """``/dev/tdx_guest`` behind the :class:`~.sev_guest.DeviceOps` seam."""

    def __init__(self, path: Path | str = DEFAULT_PATH, *, device: DeviceOps | None = None) -> None:
        self.path = Path(path)
        self.device: DeviceOps = device or OS_DEVICE

    def get_report(self, report_data: bytes) -> bytes:
        """The 1024-byte TDREPORT binding ``report_data`` (type and REPORTDATA checked)."""
        report_data = require_report_data(report_data)
        request = TdxReportReq()
        ctypes.memmove(request.reportdata, report_data, REPORT_DATA_SIZE)
        with opened(self.device, self.path) as fd:
            try:
                self.device.ioctl(fd, TDX_CMD_GET_REPORT0, request)
            except OSError as exc:
                raise os_failure(exc, "TDX_CMD_GET_REPORT0") from None
        report = bytes(request.tdreport)
        check_tdreport(report, report_data)
        return report


def check_tdreport(report: bytes, report_data: bytes) -> None:
    """A TDREPORT of TDX type whose REPORTDATA is ``report_data``."""
    if len(report) != TDREPORT_SIZE:
        raise ParseError("collector.bad_report", f"TDREPORT is {len(report)} bytes, not 1024")
    if report[0] != REPORT_TYPE_TDX or report[1] != 0:
        raise ParseError(
            "collector.bad_report",
            f"REPORTTYPE {report[0]:#04x}/{report[1]} is not a TDX TDREPORT0 (0x81/0)",
        )
    if report[REPORTDATA_OFFSET : REPORTDATA_OFFSET + REPORT_DATA_SIZE] != report_data:
        raise VerificationError(
            "collector.report_data_mismatch", "the TDREPORT binds other REPORT_DATA"
        )


def quote_unavailable(
    path: Path | str = DEFAULT_PATH, configfs: Path = DEFAULT_ROOT
) -> ConfigError:
    """The error for a TDX node that can make TDREPORTs but no quotes."""
    return ConfigError(
        "collector.tdx_quote_unavailable",
        f"{path} yields only a TDREPORT, which no remote verifier can check; a TDX quote needs "
        f"configfs-tsm ({configfs}, Linux 6.7+ with the tdx_guest provider) or a Quote "
        "Generation Service, which attestmesh does not support yet",
    )
