"""Decoded ATTESTATION_REPORT bit fields: TCB_VERSION, POLICY and PLATFORM_INFO.

Kept apart from the report layout because policy and claims read them without caring where in
the report they sit. TCB_VERSION differs by product: Turin added an FMC SPL in the first byte.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from services.mesh.errors import ParseError

_POLICY_RESERVED_MASK = ~((1 << 26) - 1) & 0xFFFF_FFFF_FFFF_FFFF


class TcbLayout(enum.Enum):
    """How the 8 bytes of a TCB_VERSION are assigned (Turin added the FMC SPL)."""

    MILAN_GENOA = "milan_genoa"
    TURIN = "turin"


@dataclass(frozen=True)
class TcbVersion:
    """A decoded TCB_VERSION: one security patch level (SPL) per firmware component."""

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @property
    def layout(self) -> TcbLayout:
        return TcbLayout.MILAN_GENOA if self.fmc is None else TcbLayout.TURIN

    def encode(self) -> bytes:
        if self.fmc is None:
            return bytes([self.bootloader, self.tee, 0, 0, 0, 0, self.snp, self.microcode])
        return bytes([self.fmc, self.bootloader, self.tee, self.snp, 0, 0, 0, self.microcode])

    @classmethod
    def decode(cls, raw: bytes, layout: TcbLayout, field: str = "TCB_VERSION") -> TcbVersion:
        """Decode 8 raw bytes; reserved bytes must be zero."""
        if len(raw) != 8:
            raise ParseError("snp.bad_size", f"{field} is {len(raw)} bytes, not 8")
        if layout is TcbLayout.TURIN:
            reserved, value = raw[4:7], cls(raw[1], raw[2], raw[3], raw[7], fmc=raw[0])
        else:
            reserved, value = raw[2:6], cls(raw[0], raw[1], raw[6], raw[7])
        if any(reserved):
            raise ParseError("snp.reserved_nonzero", f"{field} {raw.hex()} has reserved bits set")
        return value

    def as_dict(self) -> dict[str, int]:
        parts = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp}
        parts["microcode"] = self.microcode
        if self.fmc is not None:
            parts["fmc"] = self.fmc
        return parts


@dataclass(frozen=True)
class GuestPolicy:
    """The POLICY bit field the guest owner set at launch (bit 17 is reserved and reads as one)."""

    raw: int

    _FLAGS = (
        ("smt", 16),
        ("migrate_ma", 18),
        ("debug", 19),
        ("single_socket", 20),
        ("cxl_allowed", 21),
        ("mem_aes_256_xts", 22),
        ("rapl_dis", 23),
        ("ciphertext_hiding_dram", 24),
        ("page_swap_disable", 25),
    )

    @property
    def abi_minor(self) -> int:
        return self.raw & 0xFF

    @property
    def abi_major(self) -> int:
        return self.raw >> 8 & 0xFF

    @property
    def smt(self) -> bool:
        return bool(self.raw >> 16 & 1)

    @property
    def migrate_ma(self) -> bool:
        return bool(self.raw >> 18 & 1)

    @property
    def debug(self) -> bool:
        return bool(self.raw >> 19 & 1)

    @property
    def single_socket(self) -> bool:
        return bool(self.raw >> 20 & 1)

    @property
    def reserved_bits(self) -> int:
        """Bits 63:26, which this ABI revision does not define (must be zero)."""
        return self.raw & _POLICY_RESERVED_MASK

    def as_dict(self) -> dict[str, Any]:
        flags: dict[str, Any] = {"abi_major": self.abi_major, "abi_minor": self.abi_minor}
        flags.update((name, bool(self.raw >> bit & 1)) for name, bit in self._FLAGS)
        return flags


@dataclass(frozen=True)
class PlatformInfo:
    """PLATFORM_INFO: how the host platform was configured when the report was made."""

    raw: int

    _BITS = (
        ("smt_enabled", 0),
        ("tsme_enabled", 1),
        ("ecc_enabled", 2),
        ("rapl_disabled", 3),
        ("ciphertext_hiding_enabled", 4),
        ("alias_check_complete", 5),
        ("tio_enabled", 7),
    )

    @property
    def smt_enabled(self) -> bool:
        return bool(self.raw & 1)

    def as_dict(self) -> dict[str, bool]:
        return {name: bool(self.raw >> bit & 1) for name, bit in self._BITS}
