"""/dev/sev-guest: SEV-SNP reports through the sev-guest driver's ioctls (Linux 5.19+).

configfs-tsm is the preferred interface where the kernel has it (6.7+); this source serves older
guest kernels. The ABI is ``include/uapi/linux/sev-guest.h``; on x86-64 with natural alignment:

=============================  =====  ==================================================
struct                         size   fields (offset)
=============================  =====  ==================================================
snp_guest_request_ioctl          32   msg_version u8 (0), req_data u64 (8), resp_data u64
                                      (16), exitinfo2 u64 (24): fw_error is its low 32
                                      bits, vmm_error its high 32 bits
snp_report_req                   96   user_data[64] (0), vmpl u32 (64), rsvd[28] (68)
snp_report_resp                4000   MSG_REPORT_RSP: status u32, report_size u32,
                                      rsvd[24], then the report
snp_ext_report_req              112   snp_report_req (0), certs_address u64 (96),
                                      certs_len u32 (104), 4 bytes of tail padding
=============================  =====  ==================================================

Ioctl numbers follow ``asm-generic/ioctl.h`` (which x86 uses): ``_IOWR(type, nr, size) =
(_IOC_READ|_IOC_WRITE) << 30 | size << 16 | type << 8 | nr`` with ``_IOC_READ|_IOC_WRITE = 3``.
The size is that of ``snp_guest_request_ioctl`` (32), because that is all the kernel copies from
the argument; it follows ``req_data``/``resp_data``/``certs_address`` as user pointers, so those
buffers are ctypes objects kept alive across the call. Hence ``SNP_GET_REPORT = 3 << 30 |
32 << 16 | ord('S') << 8 | 0 = 0xC0205300`` and ``SNP_GET_EXT_REPORT = 0xC0205302``.

The extended request also fetches the host's certificate table. The kernel refuses a
``certs_len`` that is not page-aligned or exceeds ``SEV_FW_BLOB_MAX_SIZE`` (16 KiB) with
``EINVAL``; when the buffer is too small the ioctl fails (``EIO``) with vmm_error 1
(``SNP_GUEST_VMM_ERR_INVALID_LEN``) and the kernel writes the length it needs back into
``certs_len``. We then retry with that length, bounded in size and attempts. Each refusal costs
a firmware round trip, so the first buffer (8 KiB) fits a usual VCEK + ASK + ARK table.

A non-zero MSG_REPORT_RSP ``status`` arrives with a successful ioctl, so it is checked on its
own, as is ``report_size`` (exactly 1184 bytes). The ioctl goes through :class:`DeviceOps`, a
seam that lets the tests stand in a fake driver reading and writing those same buffers.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from services.collector.sources.checks import REPORT_DATA_SIZE, require_report_data, snp_evidence
from services.collector.sources.pseudofs import os_failure
from services.mesh import events
from services.mesh.errors import AttestmeshError, ConfigError, ParseError
from services.verifier.families.snp.certtable import ENTRY_SIZE, parse_cert_table
from services.verifier.families.snp.parse import REPORT_SIZE

DEFAULT_PATH = Path("/dev/sev-guest")
MSG_VERSION = 1
PAGE_SIZE = 4096
SEV_FW_BLOB_MAX_SIZE = 0x4000
INITIAL_CERTS_LEN = 2 * PAGE_SIZE
MAX_EXT_ATTEMPTS = 3
VMM_ERR_INVALID_LEN = 1
RESPONSE_HEADER_SIZE = 32
STATUS_NAMES = {
    0x16: "INVALID_PARAM: is the requested VMPL below the guest's own?",
    0x27: "INVALID_KEY: the VMPCK was wiped",
}

_IOC_WRITE = 1
_IOC_READ = 2
_IOC_SIZE_BITS = 14


def iowr(kind: str, number: int, size: int) -> int:
    """``_IOWR(kind, number, size)`` as ``asm-generic/ioctl.h`` encodes it."""
    if not 0 <= size < 1 << _IOC_SIZE_BITS or not 0 <= number < 256 or len(kind) != 1:
        raise ValueError(f"not encodable as an ioctl: {kind!r}, {number}, {size}")
    return (_IOC_READ | _IOC_WRITE) << 30 | size << 16 | ord(kind) << 8 | number


class GuestRequest(ctypes.Structure):
    """``struct snp_guest_request_ioctl``."""

    _fields_ = [
        ("msg_version", ctypes.c_uint8),
        ("req_data", ctypes.c_uint64),
        ("resp_data", ctypes.c_uint64),
        ("exitinfo2", ctypes.c_uint64),
    ]

    @property
    def fw_error(self) -> int:
        return int(self.exitinfo2) & 0xFFFFFFFF

    @property
    def vmm_error(self) -> int:
        return int(self.exitinfo2) >> 32


class ReportReq(ctypes.Structure):
    """``struct snp_report_req``."""

    _fields_ = [
        ("user_data", ctypes.c_uint8 * REPORT_DATA_SIZE),
        ("vmpl", ctypes.c_uint32),
        ("rsvd", ctypes.c_uint8 * 28),
    ]


class ReportResp(ctypes.Structure):
    """``struct snp_report_resp``: MSG_REPORT_RSP in the first bytes."""

    _fields_ = [("data", ctypes.c_uint8 * 4000)]


class ExtReportReq(ctypes.Structure):
    """``struct snp_ext_report_req``."""

    _fields_ = [
        ("data", ReportReq),
        ("certs_address", ctypes.c_uint64),
        ("certs_len", ctypes.c_uint32),
    ]


SNP_GET_REPORT = iowr("S", 0x0, ctypes.sizeof(GuestRequest))
SNP_GET_EXT_REPORT = iowr("S", 0x2, ctypes.sizeof(GuestRequest))


class DeviceOps(Protocol):
    """Open, ioctl, close: the device seam of the ioctl sources (``arg`` is mutated in place)."""

    def open(self, path: str) -> int: ...

    def ioctl(self, fd: int, request: int, arg: ctypes.Structure) -> None: ...

    def close(self, fd: int) -> None: ...


class OsDeviceOps:
    """:class:`DeviceOps` on the real kernel.

    ``fcntl.ioctl`` with ``mutate_flag`` copies an argument of up to 1024 bytes into a scratch
    buffer and copies it back *before* raising for a failed call, so ``exitinfo2`` (fw_error,
    vmm_error) is readable after an ``OSError``; the certificate-length retry relies on that.
    """

    def open(self, path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def ioctl(self, fd: int, request: int, arg: ctypes.Structure) -> None:
        fcntl.ioctl(fd, request, arg, True)

    def close(self, fd: int) -> None:
        os.close(fd)


OS_DEVICE = OsDeviceOps()


@contextlib.contextmanager
def opened(device: DeviceOps, path: Path) -> Iterator[int]:
    """``path`` opened through ``device``; absent or forbidden is a configuration problem."""
    try:
        fd = device.open(str(path))
    except (FileNotFoundError, PermissionError) as exc:
        failure = os_failure(exc, f"open {path}")
        raise ConfigError("collector.device_unavailable", failure.detail) from None
    except OSError as exc:
        raise os_failure(exc, f"open {path}") from None
    try:
        yield fd
    finally:
        device.close(fd)


class SevGuestSource:
    """An :class:`~services.collector.sources.base.EvidenceSource` on ``/dev/sev-guest``.

    ``vmpl`` is the VMPL the report is requested for (at least the guest's own); with
    ``certificates`` the extended request attaches the host's certificate table.
    """

    family = "snp"
    simulated = False

    def __init__(
        self,
        path: Path | str = DEFAULT_PATH,
        *,
        vmpl: int = 0,
        certificates: bool = True,
        certs_buffer: int = INITIAL_CERTS_LEN,
        device: DeviceOps | None = None,
    ) -> None:
        if not 0 <= vmpl <= 3:
            raise ConfigError("collector.privlevel", f"VMPL {vmpl} is not in 0..3")
        if certs_buffer % PAGE_SIZE or not PAGE_SIZE <= certs_buffer <= SEV_FW_BLOB_MAX_SIZE:
            raise ConfigError(
                "collector.certs_buffer", f"{certs_buffer} is not whole pages up to 16 KiB"
            )
        self.path = Path(path)
        self.vmpl = vmpl
        self.certificates = certificates
        self.certs_buffer = certs_buffer
        self.device: DeviceOps = device or OS_DEVICE

    def collect(self, report_data: bytes) -> events.Evidence:
        report_data = require_report_data(report_data)
        if self.certificates:
            report, table = self.get_extended_report(report_data)
        else:
            report, table = self.get_report(report_data), None
        return snp_evidence(report, table, report_data, vmpl=self.vmpl)

    def get_report(self, report_data: bytes) -> bytes:
        """SNP_GET_REPORT: the 1184-byte report (status and size checked, contents not)."""
        request = self._report_req(require_report_data(report_data))
        response = ReportResp()
        with opened(self.device, self.path) as fd:
            arg, failure = self._call(fd, SNP_GET_REPORT, request, response)
        if failure is not None:
            raise _device_error("SNP_GET_REPORT", failure, arg)
        return _report_from(response)

    def get_extended_report(self, report_data: bytes) -> tuple[bytes, bytes | None]:
        """SNP_GET_EXT_REPORT: the report and the host's certificate table (``None`` if none)."""
        report_data = require_report_data(report_data)
        certs_len = self.certs_buffer
        with opened(self.device, self.path) as fd:
            for _ in range(MAX_EXT_ATTEMPTS):
                certs = (ctypes.c_uint8 * certs_len)()
                request = ExtReportReq(
                    data=self._report_req(report_data),
                    certs_address=ctypes.addressof(certs),
                    certs_len=certs_len,
                )
                response = ReportResp()
                arg, failure = self._call(fd, SNP_GET_EXT_REPORT, request, response)
                if failure is None:
                    return _report_from(response), _trim_cert_table(bytes(certs))
                if arg.vmm_error != VMM_ERR_INVALID_LEN:
                    raise _device_error("SNP_GET_EXT_REPORT", failure, arg)
                certs_len = _larger_certs_len(certs_len, int(request.certs_len))
        raise AttestmeshError(
            "collector.certs_too_large",
            f"the host's certificate table kept growing over {MAX_EXT_ATTEMPTS} requests",
        )

    def _report_req(self, report_data: bytes) -> ReportReq:
        request = ReportReq(vmpl=self.vmpl)
        ctypes.memmove(request.user_data, report_data, REPORT_DATA_SIZE)
        return request

    def _call(
        self, fd: int, number: int, request: ctypes.Structure, response: ReportResp
    ) -> tuple[GuestRequest, OSError | None]:
        arg = GuestRequest(
            msg_version=MSG_VERSION,
            req_data=ctypes.addressof(request),
            resp_data=ctypes.addressof(response),
        )
        try:
            self.device.ioctl(fd, number, arg)
        except OSError as exc:
            return arg, exc
        return arg, None


def _device_error(name: str, exc: OSError, arg: GuestRequest) -> AttestmeshError:
    failure = os_failure(exc, name)
    return AttestmeshError(
        failure.reason,
        f"{failure.detail}, fw_error=0x{arg.fw_error:08x} vmm_error=0x{arg.vmm_error:08x}",
    )


def _larger_certs_len(current: int, needed: int) -> int:
    """The length the kernel asked for, if it is a sane step up."""
    if needed <= current or needed % PAGE_SIZE:
        raise AttestmeshError(
            "collector.device_error",
            f"the kernel asked for a certificate buffer of {needed} bytes after {current}",
        )
    if needed > SEV_FW_BLOB_MAX_SIZE:
        raise AttestmeshError(
            "collector.certs_too_large",
            f"the host's certificate table needs {needed} bytes, over the kernel's "
            f"{SEV_FW_BLOB_MAX_SIZE}; collect without certificates and ship the VEK as collateral",
        )
    return needed


def _report_from(response: ReportResp) -> bytes:
    """The report inside MSG_REPORT_RSP, after checking ``status`` and ``report_size``."""
    raw = bytes(response.data)
    status, size = struct.unpack_from("<II", raw)
    if status:
        name = STATUS_NAMES.get(status, "unknown")
        raise AttestmeshError(
            "collector.report_status", f"MSG_REPORT_RSP status 0x{status:x} ({name})"
        )
    if size != REPORT_SIZE:
        raise ParseError(
            "collector.bad_report", f"MSG_REPORT_RSP report_size {size}, expected {REPORT_SIZE}"
        )
    return raw[RESPONSE_HEADER_SIZE : RESPONSE_HEADER_SIZE + size]


def _trim_cert_table(buffer: bytes) -> bytes | None:
    """The table without the zero padding of our page-sized buffer; ``None`` if the host sent none.

    The kernel zero-fills the buffer, so an all-zero one means no certificates. Otherwise the
    table is parsed strictly first, and cut where its last certificate ends (as the kernel's
    configfs path does), keeping the host's layout byte for byte.
    """
    if not buffer.strip(b"\0"):
        return None
    try:
        parse_cert_table(buffer)
    except ParseError as exc:
        raise ParseError("collector.bad_cert_table", str(exc)) from exc
    end = position = 0
    while (entry := buffer[position : position + ENTRY_SIZE]) != bytes(ENTRY_SIZE):
        offset, length = struct.unpack_from("<II", entry, 16)
        end = max(end, offset + length)
        position += ENTRY_SIZE
    return buffer[: max(end, position + ENTRY_SIZE)]
