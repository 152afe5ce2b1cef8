"""A sealing key derived by the SEV-SNP firmware, for a broker that runs inside an SNP guest.

The guest asks the AMD Secure Processor for a key derived from a root key (the chip's VCEK,
or the VM's VMRK) mixed with the fields it selects from its own launch: the firmware fills
them in from the launch, so the key can only be derived again by a guest with the same
measurement and policy on the same chip. Nothing is stored; a broker restarted on the same
chip with the same image derives the same key, and a changed image, policy or chip gets
another one (README: sealing keys; a recovery carries the data key across).

Kernel ABI (``include/uapi/linux/sev-guest.h``; x86-64, little-endian, natural alignment)
and AMD's MSG_KEY_REQ / MSG_KEY_RSP (SEV-SNP firmware ABI, message version 1):

==========================  ====  ==========================================================
struct                      size  fields (offset)
==========================  ====  ==========================================================
snp_guest_request_ioctl       32  msg_version u8 (0), req_data u64 (8), resp_data u64 (16),
                                  exitinfo2 u64 (24): fw_error low 32 bits, vmm_error high
snp_derived_key_req           32  root_key_select u32 (0): bit 0 VCEK 0 / VMRK 1, the rest
                                  reserved; rsvd u32 (4); guest_field_select u64 (8); vmpl
                                  u32 (16); guest_svn u32 (20); tcb_version u64 (24)
snp_derived_key_resp          64  status u32 (0), reserved (4..31), derived key (32..63)
==========================  ====  ==========================================================

``SNP_GET_DERIVED_KEY = _IOWR('S', 1, struct snp_guest_request_ioctl) = 0xC0205301``. The
kernel copies only the 32-byte argument and follows ``req_data``/``resp_data`` as user
pointers, so those are ctypes buffers kept alive across the call. ``fcntl.ioctl`` with a
mutable buffer copies the argument back before raising, so ``exitinfo2`` is readable after a
failed call. GUEST_FIELD_SELECT bits 0-5 (message version 1): guest policy, image id,
family id, measurement, guest SVN, TCB version.

Refusals (all :class:`SealingError`): no device is ``broker.sealing_key_missing`` naming
the path; a firmware error ``broker.snp_firmware_error``; a non-zero MSG_KEY_RSP status
``broker.snp_key_refused``; a response with reserved bytes set or a key not wholly written
``broker.snp_response_malformed``; any other device failure ``broker.sealing_key_unavailable``;
derivation fields that do not bind the key to this guest ``broker.sealing_params_invalid``.
The key the firmware returns is never used directly: it goes through HKDF-SHA256 with a label
of ours, so it keys nothing but this broker's keyring.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.broker.sealing import KEY_SIZE, AeadKey
from services.mesh.config import SnpSealing
from services.mesh.errors import SealingError

DEFAULT_DEVICE = Path("/dev/sev-guest")
MSG_VERSION = 1
ARG = struct.Struct("<B7xQQQ")
REQUEST = struct.Struct("<IIQIIQ")
RESPONSE_SIZE = 64
RESPONSE_KEY_OFFSET = 32
SNP_GET_DERIVED_KEY = (3 << 30) | (ARG.size << 16) | (ord("S") << 8) | 0x1
ROOT_KEYS = {"vcek": 0, "vmrk": 1}
FIELD_BITS = {
    "policy": 0,
    "image_id": 1,
    "family_id": 2,
    "measurement": 3,
    "guest_svn": 4,
    "tcb_version": 5,
}
REQUIRED_FIELDS = frozenset({"measurement", "policy"})
"""Without the measurement any guest on the chip derives the same key; without the policy a
debug launch of the same image (whose memory the host can read) would."""
NO_FIRMWARE_CALL = 0xFFFFFFFF
FW_ERRORS = {0x16: "INVALID_PARAM", 0x27: "INVALID_KEY"}
VMM_ERRORS = {1: "INVALID_LEN", 2: "BUSY"}
_HKDF_INFO = b"attestmesh/sealing-key/snp-derived/v1"

Ioctl = Callable[[int, int, bytearray], object]
"""``ioctl(fd, request, argument)``, mutating ``argument`` in place (``fcntl.ioctl``'s shape)."""


def os_ioctl(fd: int, request: int, argument: bytearray) -> object:
    """The real ioctl; the argument is copied back even when the call fails."""
    return fcntl.ioctl(fd, request, argument, True)


@dataclass(frozen=True)
class KeyRequest:
    """One MSG_KEY_REQ: what the firmware mixes into the derived key."""

    root_key: str = "vcek"
    fields: tuple[str, ...] = ("measurement", "policy")
    vmpl: int = 0
    guest_svn: int = 0
    tcb_version: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.fields) - FIELD_BITS.keys())
        if self.root_key not in ROOT_KEYS or unknown:
            raise SealingError(
                "broker.sealing_params_invalid",
                f"root key {self.root_key!r} (vcek or vmrk), unknown fields {unknown}",
            )
        missing = sorted(REQUIRED_FIELDS - set(self.fields))
        if missing:
            raise SealingError(
                "broker.sealing_params_invalid",
                f"the derived key must mix in {missing}: without them another guest on the "
                "chip, or a debug launch of this one, could derive it",
            )
        if not 0 <= self.vmpl <= 3 or not 0 <= self.guest_svn < 2**32:
            raise SealingError("broker.sealing_params_invalid", "VMPL 0..3, guest SVN 32 bits")
        if not 0 <= self.tcb_version < 2**64:
            raise SealingError("broker.sealing_params_invalid", "TCB version is 64 bits")

    @classmethod
    def from_settings(cls, settings: SnpSealing) -> KeyRequest:
        return cls(
            root_key=settings.root_key,
            fields=tuple(settings.fields),
            vmpl=settings.vmpl,
            guest_svn=settings.guest_svn,
            tcb_version=settings.tcb_version,
        )

    @property
    def field_select(self) -> int:
        return field_select(self.fields)

    def pack(self) -> bytes:
        """``struct snp_derived_key_req``, reserved fields zero."""
        return REQUEST.pack(
            ROOT_KEYS[self.root_key],
            0,
            self.field_select,
            self.vmpl,
            self.guest_svn,
            self.tcb_version,
        )


def field_select(fields: Iterable[str]) -> int:
    """GUEST_FIELD_SELECT for the named fields."""
    bits = 0
    for name in fields:
        bits |= 1 << FIELD_BITS[name]
    return bits


def parse_response(raw: bytes) -> bytes:
    """The derived key in MSG_KEY_RSP, after checking status and the reserved bytes."""
    if len(raw) != RESPONSE_SIZE:
        raise SealingError("broker.snp_response_malformed", f"{len(raw)} bytes, not 64")
    (status,) = struct.unpack_from("<I", raw)
    if status:
        name = FW_ERRORS.get(status, "unknown")
        raise SealingError("broker.snp_key_refused", f"MSG_KEY_RSP status 0x{status:x} ({name})")
    if any(raw[4:RESPONSE_KEY_OFFSET]):
        raise SealingError("broker.snp_response_malformed", "reserved bytes of MSG_KEY_RSP set")
    key = raw[RESPONSE_KEY_OFFSET:]
    if any(key[i : i + 8] == bytes(8) for i in range(0, KEY_SIZE, 8)):
        # The buffer starts zeroed: a zero word is a key not (wholly) written. A real key
        # has one with probability 2^-62.
        raise SealingError("broker.snp_response_malformed", "MSG_KEY_RSP carries no whole key")
    return key


class SnpDerivedKeySource:
    """A :class:`~services.broker.sealing.SealingKeySource` asking the SNP firmware each time.

    ``device`` and ``ioctl`` are the seams the tests use: a fake firmware
    (:mod:`services.testing.snpkeys`) reads the request through the same pointers the
    kernel follows.
    """

    def __init__(
        self,
        request: KeyRequest,
        *,
        device: Path | str = DEFAULT_DEVICE,
        ioctl: Ioctl = os_ioctl,
    ) -> None:
        self.request = request
        self.device = Path(device)
        self._ioctl = ioctl

    def __repr__(self) -> str:
        return f"SnpDerivedKeySource({str(self.device)!r}, {self.request!r})"

    def sealing_key(self) -> AeadKey:
        raw = self.derive()
        hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=_HKDF_INFO)
        return AeadKey(hkdf.derive(raw))

    def derive(self) -> bytes:
        """The firmware's 32-byte derived key (before our HKDF)."""
        request = ctypes.create_string_buffer(self.request.pack(), REQUEST.size)
        response = ctypes.create_string_buffer(RESPONSE_SIZE)
        argument = bytearray(
            ARG.pack(MSG_VERSION, ctypes.addressof(request), ctypes.addressof(response), 0)
        )
        fd = self._open()
        try:
            self._ioctl(fd, SNP_GET_DERIVED_KEY, argument)
        except OSError as exc:
            raise _failure(exc, argument) from None
        finally:
            os.close(fd)
        raw = response.raw
        ctypes.memset(response, 0, RESPONSE_SIZE)
        return parse_response(raw)

    def _open(self) -> int:
        try:
            return os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SealingError(
                "broker.sealing_key_missing",
                f"no SEV-SNP guest device at {self.device} (sealing_source snp needs the "
                "broker inside an SNP guest with the sev-guest driver)",
            ) from None
        except OSError as exc:
            raise SealingError(
                "broker.sealing_key_unavailable", f"cannot open {self.device}: {exc.strerror}"
            ) from None


def _failure(exc: OSError, argument: bytearray) -> SealingError:
    (exitinfo2,) = struct.unpack_from("<Q", argument, 24)
    fw_error, vmm_error = exitinfo2 & 0xFFFFFFFF, exitinfo2 >> 32
    what = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    detail = (
        f"SNP_GET_DERIVED_KEY failed ({what}); fw_error 0x{fw_error:x} "
        f"({FW_ERRORS.get(fw_error, 'unknown')}), vmm_error 0x{vmm_error:x} "
        f"({VMM_ERRORS.get(vmm_error, 'none' if not vmm_error else 'unknown')})"
    )
    if fw_error not in (0, NO_FIRMWARE_CALL):
        return SealingError("broker.snp_firmware_error", detail)
    return SealingError("broker.sealing_key_unavailable", detail)
