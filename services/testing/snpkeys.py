"""A fake sev-guest driver and SNP firmware answering SNP_GET_DERIVED_KEY.

It reads the ioctl argument and the request through the same user pointers the kernel
follows, checks every byte as the driver and the firmware would, and writes MSG_KEY_RSP
back through ``resp_data``. The layouts are written out here independently of
:mod:`services.broker.snpkey`, so a mistake there shows up as a refused request rather than
being mirrored.

The derived key is an HMAC of the selected launch fields under a per-chip (VCEK) or per-VM
(VMRK) secret, so it changes exactly when a selected field, the VMPL, the root key or the
chip changes, as the real one does. Knobs for the failure paths: :attr:`FakeSnpFirmware.fail`
makes the ioctl fail with an errno and an ``exitinfo2``; :attr:`FakeSnpFirmware.response`
replaces the 64 bytes written back (``b""`` writes nothing).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import hmac
import os
import secrets
import struct
from dataclasses import dataclass, field

IOCTL_GET_DERIVED_KEY = 0xC0205301
INVALID_PARAM = 0x16
_ARG = struct.Struct("<B7xQQQ")
_REQ = struct.Struct("<IIQIIQ")


@dataclass(frozen=True)
class SeenRequest:
    """One MSG_KEY_REQ as the firmware decoded it."""

    raw: bytes
    root_key_select: int
    reserved: int
    guest_field_select: int
    vmpl: int
    guest_svn: int
    tcb_version: int


@dataclass
class FakeSnpFirmware:
    """The launch of one guest on one chip, and the firmware that derives its keys."""

    measurement: bytes = field(default_factory=lambda: secrets.token_bytes(48))
    policy: int = 0x30000
    image_id: bytes = bytes(16)
    family_id: bytes = bytes(16)
    launch_svn: int = 0
    committed_tcb: int = 0
    guest_vmpl: int = 0
    chip_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    vm_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    fail: tuple[int, int, int] | None = None
    """(errno, fw_error, vmm_error) to fail the next calls with."""
    response: bytes | None = None
    requests: list[SeenRequest] = field(default_factory=list)

    def ioctl(self, fd: int, request: int, argument: bytearray) -> None:
        """The driver: validate the argument, then let the firmware answer."""
        if request != IOCTL_GET_DERIVED_KEY:
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        if not isinstance(argument, bytearray) or len(argument) != _ARG.size:
            raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
        version, req_data, resp_data, _ = _ARG.unpack(argument)
        if version != 1 or not req_data or not resp_data:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        raw = ctypes.string_at(req_data, _REQ.size)
        seen = SeenRequest(raw, *_REQ.unpack(raw))
        self.requests.append(seen)
        if self.fail is not None:
            code, fw_error, vmm_error = self.fail
            struct.pack_into("<Q", argument, 24, vmm_error << 32 | fw_error)
            raise OSError(code, os.strerror(code))
        answer = self._answer(seen) if self.response is None else self.response
        ctypes.memmove(resp_data, answer, len(answer))

    def _answer(self, seen: SeenRequest) -> bytes:
        status = INVALID_PARAM if self._invalid(seen) else 0
        key = bytes(32) if status else self.key_for(seen)
        return struct.pack("<I28x", status) + key

    def _invalid(self, seen: SeenRequest) -> bool:
        select = seen.guest_field_select
        return bool(
            seen.root_key_select & ~1
            or seen.reserved
            or select & ~0x3F
            or not self.guest_vmpl <= seen.vmpl <= 3
            or (select & 1 << 4 and seen.guest_svn > self.launch_svn)
            or (select & 1 << 5 and seen.tcb_version > self.committed_tcb)
        )

    def key_for(self, seen: SeenRequest) -> bytes:
        """The key this firmware derives for ``seen``: the selected fields under the root."""
        select = seen.guest_field_select
        mixed = [
            struct.pack("<QI", select, seen.vmpl),
            struct.pack("<Q", self.policy) if select & 1 << 0 else b"",
            self.image_id if select & 1 << 1 else b"",
            self.family_id if select & 1 << 2 else b"",
            self.measurement if select & 1 << 3 else b"",
            struct.pack("<I", seen.guest_svn) if select & 1 << 4 else b"",
            struct.pack("<Q", seen.tcb_version) if select & 1 << 5 else b"",
        ]
        root = self.vm_secret if seen.root_key_select & 1 else self.chip_secret
        return hmac.new(root, b"".join(mixed), hashlib.sha256).digest()
