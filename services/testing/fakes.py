"""Fake kernels for the collector's hardware sources: configfs-tsm, sev-guest, tdx_guest, Gramine.

Each fake emulates the interface's documented behaviour on an ordinary directory or in memory,
and produces real-format evidence from the project's simulators, so the sources run their real
code (``O_NOFOLLOW`` opens relative to directory descriptors, ctypes buffers followed by address)
and what they return verifies with the real family verifiers under the test roots.

- :class:`FakeConfigfsTsm` follows ``drivers/virt/coco/tsm.c``: ``mkdir`` creates the attributes
  (``ENXIO`` without a provider), ``inblob`` is buffered and committed on ``close`` (configfs
  binary attributes), every committed write bumps ``generation``, and ``outblob``/``auxblob``
  are generated on read when the generation moved. ``racer`` plays another process writing its
  own inblob just before our read; ``on_mkdir`` lets a test tamper with a fresh entry.
- :class:`FakeSevGuest` decodes ``snp_guest_request_ioctl`` and the request it points to, and
  answers like the driver: ``EIO`` with vmm_error 1 and the needed ``certs_len`` written back
  when the certificate buffer is too small, MSG_REPORT_RSP with a status otherwise.
- :class:`FakeTdxGuest` fills ``tdx_report_req.tdreport`` with a TDREPORT_STRUCT.
- :class:`FakeGramine` serves ``/dev/attestation`` with DCAP quotes of an enclave report.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import hmac
import os
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from services.collector.simulator.snp import SnpSimulator
from services.collector.sources.pseudofs import OsFileOps
from services.collector.sources.sev_guest import (
    SNP_GET_EXT_REPORT,
    SNP_GET_REPORT,
    ExtReportReq,
    GuestRequest,
    ReportReq,
)
from services.collector.sources.tdx_guest import TDX_CMD_GET_REPORT0, TdxReportReq
from services.testing.intel_pki import (
    IntelTestPki,
    Platform,
    TdFields,
    enclave_report,
    sgx_quote,
    tcb_level,
    td_quote,
)

Backend = Callable[[bytes, int], tuple[bytes, bytes | None]]
"""(inblob, privlevel) -> (outblob, auxblob): what the TSM provider returns."""


def snp_backend(simulator: SnpSimulator) -> Backend:
    """A ``sev_guest`` provider: a signed report at the requested VMPL, the certificate table."""
    return lambda inblob, privlevel: (
        simulator.report(inblob, vmpl=privlevel),
        simulator.cert_table(),
    )


def tdx_backend(platform: Platform, fields: TdFields | None = None) -> Backend:
    """A ``tdx_guest`` provider: a v4 TD quote binding the inblob."""
    base = fields or TdFields()
    return lambda inblob, _: (td_quote(platform, replace(base, report_data=inblob)), None)


class FakeFiles(OsFileOps):
    """Real syscalls on a directory tree, with each fd's path known to the subclass hooks."""

    def __init__(self) -> None:
        self.paths: dict[int, Path] = {}
        self.opened = 0

    def path_of(self, path: str, dir_fd: int | None) -> Path:
        return self.paths[dir_fd] / path if dir_fd is not None else Path(path)

    def open(self, path: str, flags: int, *, dir_fd: int | None = None) -> int:
        full = self.path_of(path, dir_fd)
        self.before_open(full, flags)
        fd = super().open(path, flags, dir_fd=dir_fd)
        self.paths[fd] = full
        self.opened += 1
        return fd

    def close(self, fd: int) -> None:
        full = self.paths.pop(fd)
        try:
            self.after_close(full, fd)
        finally:
            super().close(fd)

    def before_open(self, path: Path, flags: int) -> None:
        """Hook: the kernel's work before an open (generate a blob...)."""

    def after_close(self, path: Path, fd: int) -> None:
        """Hook: the kernel's work on release (commit a buffered write...)."""


@dataclass
class _Report:
    inblob: bytes = b""
    privlevel: int = 0
    write_generation: int = 0
    read_generation: int = -1


SEV_ATTRIBUTES = ("inblob", "outblob", "auxblob", "generation", "provider", "privlevel",
                  "privlevel_floor")  # fmt: skip
TDX_ATTRIBUTES = ("inblob", "outblob", "generation", "provider")


class FakeConfigfsTsm(FakeFiles):
    """configfs-tsm under ``root`` with ``provider`` (``None``: no provider registered)."""

    def __init__(
        self,
        root: Path,
        provider: str | None,
        backend: Backend | None = None,
        *,
        privlevel_floor: int = 0,
        omit: Collection[str] = (),
        racer: bytes | None = None,
        on_mkdir: Callable[[Path], None] | None = None,
    ) -> None:
        super().__init__()
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.provider = provider
        self.backend = backend
        self.privlevel_floor = privlevel_floor
        self.omit = set(omit)
        self.racer = racer
        self.on_mkdir = on_mkdir
        self.reports: dict[Path, _Report] = {}
        self.removed: list[Path] = []
        self._pending: dict[int, bytearray] = {}

    @property
    def live(self) -> list[Path]:
        """Entries created and not yet removed (must be empty after every round)."""
        return [p for p in self.reports if p not in self.removed]

    def mkdir(self, path: str, *, dir_fd: int) -> None:
        if self.provider is None:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        super().mkdir(path, dir_fd=dir_fd)
        entry = self.path_of(path, dir_fd)
        names = SEV_ATTRIBUTES if self.provider == "sev_guest" else TDX_ATTRIBUTES
        text = {"generation": "0\n", "provider": f"{self.provider}\n",
                "privlevel_floor": f"{self.privlevel_floor}\n"}  # fmt: skip
        for name in names:
            if name not in self.omit:
                (entry / name).write_text(text.get(name, ""))
        self.reports[entry] = _Report()
        if self.on_mkdir is not None:
            self.on_mkdir(entry)

    def rmdir(self, path: str, *, dir_fd: int) -> None:
        entry = self.path_of(path, dir_fd)
        if entry in self.reports:
            for child in entry.iterdir():
                child.unlink()
        super().rmdir(path, dir_fd=dir_fd)
        self.removed.append(entry)

    def before_open(self, path: Path, flags: int) -> None:
        report = self.reports.get(path.parent)
        readable = flags & os.O_ACCMODE == os.O_RDONLY
        if report is None or not readable or path.name not in ("outblob", "auxblob"):
            return
        if path.is_symlink() or not path.exists():
            return
        if not report.inblob:
            raise OSError(errno.EINVAL, "inblob was never written")
        if report.read_generation == report.write_generation:
            return
        if self.racer is not None:
            report.inblob, self.racer = self.racer, None
            self._advance(path.parent, report)
        assert self.backend is not None
        outblob, auxblob = self.backend(report.inblob, report.privlevel)
        for name, blob in (("outblob", outblob), ("auxblob", auxblob or b"")):
            target = path.parent / name
            if target.is_file() and not target.is_symlink():
                target.write_bytes(blob)
        report.read_generation = report.write_generation

    def open(self, path: str, flags: int, *, dir_fd: int | None = None) -> int:
        fd = super().open(path, flags, dir_fd=dir_fd)
        full = self.paths[fd]
        if full.parent in self.reports and full.name == "inblob":
            self._pending[fd] = bytearray()
        return fd

    def write(self, fd: int, data: bytes) -> int:
        full = self.paths[fd]
        report = self.reports.get(full.parent)
        if report is None:
            return super().write(fd, data)
        if full.name == "inblob":
            pending = self._pending[fd]
            if len(pending) + len(data) > 64:
                raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
            pending += data
            return len(data)
        if full.name == "privlevel":
            text = data.decode("ascii", errors="replace").strip()
            value = int(text) if text.isdigit() else -1
            if not self.privlevel_floor <= value <= 3:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            report.privlevel = value
            self._advance(full.parent, report)
            return len(data)
        raise OSError(errno.EACCES, f"{full.name} is read-only")

    def after_close(self, path: Path, fd: int) -> None:
        pending = self._pending.pop(fd, None)
        report = self.reports.get(path.parent)
        if pending is not None and report is not None:
            report.inblob = bytes(pending)
            self._advance(path.parent, report)

    def _advance(self, entry: Path, report: _Report) -> None:
        report.write_generation += 1
        (entry / "generation").write_text(f"{report.write_generation}\n")


class FakeGramine(FakeFiles):
    """Gramine's ``/dev/attestation`` under ``root``, quoting on ``platform``."""

    def __init__(
        self,
        root: Path,
        platform: Platform,
        *,
        attestation_type: str = "dcap",
        enclave: Callable[[bytes], bytes] | None = None,
    ) -> None:
        super().__init__()
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.platform = platform
        self.enclave = enclave or (lambda report_data: enclave_report(report_data=report_data))
        self.quote_override: bytes | None = None
        self.report_data = bytes(64)
        self._pending: dict[int, bytearray] = {}
        (root / "attestation_type").write_text(attestation_type)
        for name in ("user_report_data", "quote", "my_target_info", "target_info", "report"):
            (root / name).write_bytes(b"")

    def open(self, path: str, flags: int, *, dir_fd: int | None = None) -> int:
        fd = super().open(path, flags, dir_fd=dir_fd)
        if self.paths[fd] == self.root / "user_report_data":
            self._pending[fd] = bytearray()
        return fd

    def write(self, fd: int, data: bytes) -> int:
        if fd in self._pending:
            self._pending[fd] += data
            return len(data)
        return super().write(fd, data)

    def after_close(self, path: Path, fd: int) -> None:
        pending = self._pending.pop(fd, None)
        if pending is not None:
            if len(pending) != 64:
                raise OSError(errno.EINVAL, "user_report_data takes exactly 64 bytes")
            self.report_data = bytes(pending)

    def before_open(self, path: Path, flags: int) -> None:
        if path == self.root / "quote" and not path.is_symlink():
            quote = self.quote_override or sgx_quote(self.platform, self.enclave(self.report_data))
            path.write_bytes(quote)


_Struct = TypeVar("_Struct", bound=ctypes.Structure)


def _copy_from(address: int, kind: type[_Struct]) -> _Struct:
    return kind.from_buffer_copy(ctypes.string_at(address, ctypes.sizeof(kind)))


def _copy_to(address: int, data: bytes) -> None:
    ctypes.memmove(address, data, len(data))


class FakeDevice:
    """Open/close bookkeeping shared by the fake ioctl drivers."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.open_fds: set[int] = set()
        self.opens = 0
        self.open_errno: int | None = None

    def open(self, path: str) -> int:
        if path != self.path:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if self.open_errno is not None:
            raise OSError(self.open_errno, os.strerror(self.open_errno), path)
        self.opens += 1
        fd = 1000 + self.opens
        self.open_fds.add(fd)
        return fd

    def close(self, fd: int) -> None:
        self.open_fds.remove(fd)

    def check(self, fd: int) -> None:
        if fd not in self.open_fds:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))


class FakeSevGuest(FakeDevice):
    """The sev-guest driver and an SNP firmware, as seen through the ioctl ABI."""

    def __init__(
        self,
        simulator: SnpSimulator,
        *,
        path: str = "/dev/sev-guest",
        certs: bytes | None = None,
        current_vmpl: int = 0,
    ) -> None:
        super().__init__(path)
        self.simulator = simulator
        self.certs = simulator.cert_table() if certs is None else certs
        self.current_vmpl = current_vmpl
        self.fail: tuple[int, int, int] | None = None
        """(errno, fw_error, vmm_error) to fail every request with."""
        self.status = 0
        self.report_size: int | None = None
        self.needed_len: int | None = None
        """Override the certs_len the driver asks for when the buffer is too small."""
        self.requests: list[tuple[int, int | None]] = []

    def ioctl(self, fd: int, request: int, arg: ctypes.Structure) -> None:
        self.check(fd)
        if not isinstance(arg, GuestRequest) or request not in (SNP_GET_REPORT, SNP_GET_EXT_REPORT):
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        arg.exitinfo2 = 0xFF
        if not arg.msg_version or not arg.req_data or not arg.resp_data:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        ext = _copy_from(arg.req_data, ExtReportReq) if request == SNP_GET_EXT_REPORT else None
        req = ext.data if ext is not None else _copy_from(arg.req_data, ReportReq)
        certs_len = int(ext.certs_len) if ext is not None and ext.certs_address else None
        self.requests.append((request, certs_len))
        if ext is not None and certs_len:
            if certs_len > 0x4000 or certs_len % 4096:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            if len(self.certs) > certs_len:
                ext.certs_len = self.needed_len or -(-len(self.certs) // 4096) * 4096
                _copy_to(arg.req_data, bytes(ext))
                arg.exitinfo2 = 1 << 32
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        if self.fail is not None:
            code, fw_error, vmm_error = self.fail
            arg.exitinfo2 = vmm_error << 32 | fw_error
            raise OSError(code, os.strerror(code))
        invalid = any(req.rsvd) or not self.current_vmpl <= req.vmpl <= 3
        status = self.status or (0x16 if invalid else 0)
        report = b"" if status else self.simulator.report(bytes(req.user_data), vmpl=req.vmpl)
        size = len(report) if self.report_size is None else self.report_size
        _copy_to(arg.resp_data, (struct.pack("<II24x", status, size) + report).ljust(4000, b"\0"))
        if ext is not None and certs_len:
            _copy_to(ext.certs_address, self.certs.ljust(certs_len, b"\0"))
        arg.exitinfo2 = 0


def tdreport(
    report_data: bytes, fields: TdFields | None = None, *, report_type: int = 0x81
) -> bytes:
    """A TDREPORT_STRUCT (REPORTMACSTRUCT, TEE_TCB_INFO, TDINFO) MAC'd with a test key."""
    fields = fields or TdFields()
    tee_tcb_info = (b"\xff" * 8 + fields.tee_tcb_svn + b"\x33" * 48 + fields.mr_signer_seam
                    + fields.seam_attributes + bytes(16) + bytes(95))  # fmt: skip
    td_info = (fields.td_attributes + bytes.fromhex("e702060000000000") + fields.mr_td
               + bytes(48 * 3) + b"".join(fields.rtmrs) + bytes(48) + bytes(64))  # fmt: skip
    body = (bytes([report_type, 0, 0, 0]) + bytes(12) + bytes(16)
            + hashlib.sha384(tee_tcb_info).digest() + hashlib.sha384(td_info).digest()
            + report_data + bytes(32))  # fmt: skip
    mac = hmac.new(b"attestmesh fake TDX module", body, hashlib.sha256).digest()
    report = body + mac + tee_tcb_info + bytes(17) + td_info
    assert len(report) == 1024
    return report


class FakeTdxGuest(FakeDevice):
    """The tdx_guest driver's TDX_CMD_GET_REPORT0."""

    def __init__(self, *, path: str = "/dev/tdx_guest", fields: TdFields | None = None) -> None:
        super().__init__(path)
        self.fields = fields
        self.fail: int | None = None
        self.report_type = 0x81
        self.echo: bytes | None = None

    def ioctl(self, fd: int, request: int, arg: ctypes.Structure) -> None:
        self.check(fd)
        if request != TDX_CMD_GET_REPORT0 or not isinstance(arg, TdxReportReq):
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        if self.fail is not None:
            raise OSError(self.fail, os.strerror(self.fail))
        report_data = self.echo or bytes(arg.reportdata)
        report = tdreport(report_data, self.fields, report_type=self.report_type)
        ctypes.memmove(arg.tdreport, report, len(report))


def dcap_collateral(pki: IntelTestPki, platform: Platform, *, tdx: bool) -> dict[str, bytes]:
    """Collateral under which ``platform``'s default quotes are UpToDate."""
    level = tcb_level(platform.components, platform.pce_svn, "UpToDate",
                      tdx=(0, 0, 2) + (0,) * 13 if tdx else None)  # fmt: skip
    return pki.collateral([level], tdx=tdx)
