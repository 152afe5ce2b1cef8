"""Expected SEV-SNP launch measurements, computed from what a guest is launched with.

An SNP guest's ``measurement`` claim is the launch digest the AMD firmware accumulated while
the hypervisor loaded the guest: the OVMF firmware pages, the sections OVMF's SEV metadata
declares (zero, secrets, CPUID and kernel-hashes pages), and one VMSA page per vCPU, whose
contents depend on the vCPU type, the VMM and the guest features. Rather than copying a
value out of a test run, the operator computes it from those inputs with the
``sev-snp-measure`` package (module ``sevsnpmeasure``), the computation its own
``sev-snp-measure --mode snp`` command runs.

That package trusts its inputs: an image without SEV metadata yields a digest no guest will
ever have, a missing reset block is a ``RuntimeError``, a file whose size is not a multiple
of a page trips an ``assert`` (gone under ``python -O``), and every file is read whole. So
each input is checked here first and every failure is a :class:`ConfigError` with a
``refvalues.snp_*`` reason, never a traceback and never a digest of the wrong thing.

``attestmesh refvalues import-snp`` takes the inputs on the command line or as a JSON file
listing launch configurations (:func:`read_launch_file`)::

    {"launches": [{"ovmf": "OVMF.fd", "vcpus": 4, "vcpu_type": "EPYC-v4",
                   "kernel": "vmlinuz", "initrd": "initrd.img", "append": "console=ttyS0",
                   "guest_features": 1, "vmm_type": "QEMU", "note": "image 7",
                   "expires": "2027-01-01T00:00:00Z"}]}

Paths in a file are relative to the file's directory.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated

import msgspec
from sevsnpmeasure import guest, ovmf, sev_hashes, vcpu_types, vmm_types

from services.mesh.boundedjson import check_depth
from services.mesh.errors import ConfigError, ParseError

PAGE = 4096
MAX_OVMF_BYTES = 64 * 1024 * 1024
MAX_KERNEL_BYTES = 256 * 1024 * 1024
MAX_INITRD_BYTES = 1024 * 1024 * 1024
MAX_APPEND = 4096
MAX_VCPUS = 512
MAX_LAUNCHES = 64
MAX_NOTE = 256
VMM_TYPES = tuple(vmm_types.VMMType.__members__)
"""QEMU, ec2, gce: the VMMs whose initial vCPU state the package knows."""
_NEEDS_PAGES = frozenset({ovmf.SectionType.SNP_SEC_MEM, ovmf.SectionType.SVSM_CAA})


def known_vcpu_types() -> list[str]:
    return list(vcpu_types.CPU_SIGS)


@dataclass(frozen=True)
class Launch:
    """The inputs of one guest launch (as ``sev-snp-measure --mode snp`` takes them)."""

    ovmf: Path
    vcpus: int
    vcpu_type: str
    vmm_type: str = "QEMU"
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    guest_features: int = 0x1


class LaunchEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One launch configuration in an ``import-snp`` file, with its reference-value note."""

    ovmf: str
    vcpus: int
    vcpu_type: str
    vmm_type: str = "QEMU"
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    guest_features: int = 0x1
    note: Annotated[str, msgspec.Meta(max_length=MAX_NOTE)] = ""
    expires: datetime | None = None


class LaunchFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    launches: Annotated[list[LaunchEntry], msgspec.Meta(min_length=1, max_length=MAX_LAUNCHES)]


def read_launch_file(raw: bytes, base: Path) -> list[tuple[Launch, LaunchEntry]]:
    """The launches of an ``import-snp`` file, paths resolved against ``base``."""
    try:
        check_depth(raw, "refvalues.snp_bad_file")
        parsed = msgspec.json.decode(raw, type=LaunchFile)
    except ParseError as exc:
        raise ConfigError(exc.reason, exc.detail) from None
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ConfigError("refvalues.snp_bad_file", str(exc)) from None

    def under(path: str | None) -> Path | None:
        return None if path is None else base / path

    return [
        (
            Launch(
                ovmf=base / entry.ovmf,
                vcpus=entry.vcpus,
                vcpu_type=entry.vcpu_type,
                vmm_type=entry.vmm_type,
                kernel=under(entry.kernel),
                initrd=under(entry.initrd),
                append=entry.append,
                guest_features=entry.guest_features,
            ),
            entry,
        )
        for entry in parsed.launches
    ]


def launch_digest(launch: Launch) -> str:
    """The 48-byte launch digest of ``launch`` as 96 lower-case hex digits (the form of the
    verifier's ``measurement`` claim)."""
    _check_settings(launch)
    firmware = _firmware(launch)
    if launch.kernel is not None:
        _check_kernel_hashes(firmware, launch.ovmf)
    try:
        digest = guest.snp_calc_launch_digest(
            launch.vcpus,
            vcpu_types.CPU_SIGS[launch.vcpu_type],
            str(launch.ovmf),
            None if launch.kernel is None else str(launch.kernel),
            None if launch.initrd is None else str(launch.initrd),
            launch.append,
            launch.guest_features,
            "",
            vmm_types.VMMType[launch.vmm_type],
        )
    except (RuntimeError, ValueError, AssertionError, OSError) as exc:
        raise ConfigError("refvalues.snp_measure_failed", str(exc)[:200]) from None
    if not isinstance(digest, bytes) or len(digest) != 48:
        raise ConfigError("refvalues.snp_measure_failed", "no 48-byte launch digest")
    return digest.hex()


def _check_settings(launch: Launch) -> None:
    if launch.vcpu_type not in vcpu_types.CPU_SIGS:
        known = ", ".join(known_vcpu_types())
        raise ConfigError(
            "refvalues.snp_bad_vcpu_type", f"{launch.vcpu_type[:64]!r} is not one of: {known}"
        )
    if launch.vmm_type not in VMM_TYPES:
        raise ConfigError(
            "refvalues.snp_bad_vmm_type", f"{launch.vmm_type[:64]!r} is not one of {VMM_TYPES}"
        )
    if not 1 <= launch.vcpus <= MAX_VCPUS:
        raise ConfigError("refvalues.snp_bad_vcpus", f"vCPUs must be 1..{MAX_VCPUS}")
    if not 0 <= launch.guest_features < 2**64:
        raise ConfigError("refvalues.snp_bad_guest_features", "a 64-bit value")
    if launch.kernel is None and (launch.initrd is not None or launch.append is not None):
        raise ConfigError("refvalues.snp_needs_kernel", "an initrd or append needs a kernel")
    if launch.append is not None and (
        len(launch.append) > MAX_APPEND or not launch.append.isprintable()
    ):
        raise ConfigError("refvalues.snp_bad_append", f"at most {MAX_APPEND} printable")
    for path, limit in (
        (launch.ovmf, MAX_OVMF_BYTES),
        (launch.kernel, MAX_KERNEL_BYTES),
        (launch.initrd, MAX_INITRD_BYTES),
    ):
        if path is not None:
            _check_file(path, limit)


def _check_file(path: Path, limit: int) -> None:
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError("refvalues.snp_file_missing", f"{path}: {exc.strerror}") from None
    if not path.is_file():
        raise ConfigError("refvalues.snp_file_missing", f"{path} is not a file")
    if info.st_size > limit:
        raise ConfigError("refvalues.snp_file_too_large", f"{path} exceeds {limit} bytes")


def _firmware(launch: Launch) -> ovmf.OVMF:
    """The OVMF image, refused unless it is one an SNP guest can boot: whole pages, the
    edk2 footer table, an SEV-ES reset block and SEV metadata whose sections the package
    can measure."""
    size = launch.ovmf.stat().st_size
    if size == 0 or size % PAGE:
        raise ConfigError("refvalues.snp_not_ovmf", f"{launch.ovmf}: not whole 4 KiB pages")
    try:
        firmware = ovmf.OVMF(str(launch.ovmf))
        sections = [item.section_type() for item in firmware.metadata_items()]
        sizes = [int(item.size) for item in firmware.metadata_items()]
        firmware.table_item(ovmf.OVMF.SEV_ES_RESET_BLOCK_GUID)
    except KeyError:
        raise ConfigError(
            "refvalues.snp_not_ovmf",
            f"{launch.ovmf}: no OVMF footer table with an SEV-ES reset block (not SEV firmware)",
        ) from None
    except (RuntimeError, ValueError, OSError) as exc:
        detail = str(exc)[:120]
        raise ConfigError("refvalues.snp_not_ovmf", f"{launch.ovmf}: {detail}") from None
    if not sections:
        raise ConfigError(
            "refvalues.snp_not_ovmf", f"{launch.ovmf}: no SEV metadata (not an SNP firmware)"
        )
    for section, length in zip(sections, sizes, strict=True):
        if section in _NEEDS_PAGES and length % PAGE:
            raise ConfigError("refvalues.snp_not_ovmf", f"{section.name} is not whole pages")
    return firmware


def _check_kernel_hashes(firmware: ovmf.OVMF, path: Path) -> None:
    """A direct kernel boot is measured through OVMF's kernel-hashes page: the firmware must
    declare one (one page) and say where in it the table goes."""
    pages = [
        int(item.size)
        for item in firmware.metadata_items()
        if item.section_type() == ovmf.SectionType.SNP_KERNEL_HASHES
    ]
    if not pages:
        raise ConfigError(
            "refvalues.snp_no_kernel_hashes", f"{path}: no kernel-hashes section (--kernel)"
        )
    try:
        offset = firmware.sev_hashes_table_gpa() % PAGE
    except RuntimeError as exc:
        raise ConfigError("refvalues.snp_no_kernel_hashes", f"{path}: {exc}") from None
    table = ctypes.sizeof(sev_hashes.PaddedSevHashTable)
    if pages != [PAGE] or offset + table > PAGE:
        raise ConfigError("refvalues.snp_not_ovmf", f"{path}: malformed kernel-hashes section")
