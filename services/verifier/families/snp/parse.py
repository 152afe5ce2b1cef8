"""SEV-SNP ATTESTATION_REPORT: bytes <-> typed struct, per the SEV-SNP firmware ABI spec.

The report is exactly 0x4A0 bytes, little-endian. Everything the parser accepts it can encode
back bit for bit (the simulator builds reports with :func:`encode_report`), so the layout lives
only in :data:`_LAYOUT`. Parsing is pure and exact: a wrong size, an unknown VERSION, a reserved
range or reserved bit that is not zero, or a reserved SIGNING_KEY value is a :class:`ParseError`
with a stable reason (``snp.bad_size``, ``snp.unsupported_version``, ``snp.reserved_nonzero``...).

Versions: 2 (original layout), 3 (adds CPUID family/model/stepping at 0x188), 4 (emitted by
firmware 1.55.31 with the version-3 layout) and 5 (adds LAUNCH_MIT_VECTOR and CURRENT_MIT_VECTOR
at 0x1F8). TCB_VERSION is laid out differently on Turin (an FMC byte first), so its decoding
follows the CPUID family (0x1A); version 2 reports predate Turin and use the Milan/Genoa layout.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, fields
from typing import Any

from services.mesh.errors import ParseError
from services.verifier.families.snp.certtable import MAX_TABLE_SIZE, CertTable, parse_cert_table
from services.verifier.families.snp.fields import GuestPolicy, PlatformInfo, TcbLayout, TcbVersion

__all__ = [
    "AttestationReport",
    "GuestPolicy",
    "PlatformInfo",
    "Product",
    "SigningKey",
    "SnpEvidence",
    "TcbLayout",
    "TcbVersion",
    "encode_evidence",
    "encode_report",
    "encode_signature",
    "parse_evidence",
    "parse_report",
    "product_from_cpuid",
    "report_field_names",
    "tcb_layout",
]

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
SIGNATURE_SIZE = 0x200
ECDSA_COMPONENT_SIZE = 72
SIG_ALGO_ECDSA_P384_SHA384 = 1
SUPPORTED_VERSIONS = (2, 3, 4, 5)

_KEY_INFO_OFFSET = 0x48
_ZERO_TCB = TcbVersion(0, 0, 0, 0)
_SIG_RESERVED = (SIGNED_SIZE + 2 * ECDSA_COMPONENT_SIZE, REPORT_SIZE)

FAMILY_ZEN3_ZEN4 = 0x19
FAMILY_ZEN5 = 0x1A


class SigningKey(enum.IntEnum):
    """SIGNING_KEY: which endorsement key signed the report (2-6 are reserved)."""

    VCEK = 0
    VLEK = 1
    NONE = 7


class Product(enum.StrEnum):
    """AMD EPYC generations with SEV-SNP and a KDS certificate chain."""

    MILAN = "milan"
    GENOA = "genoa"
    TURIN = "turin"


@dataclass(frozen=True)
class AttestationReport:
    """Every ATTESTATION_REPORT field, named as in the ABI spec (lower case).

    Byte fields hold the raw bytes; integers are decoded little-endian. ``signature`` is the whole
    0x200-byte SIGNATURE field (R and S are 72-byte little-endian values at its start). ``raw``
    is the report as parsed, or empty for a report built in code.
    """

    version: int = 3
    guest_svn: int = 0
    policy: int = 1 << 17
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    vmpl: int = 0
    signature_algo: int = SIG_ALGO_ECDSA_P384_SHA384
    current_tcb: TcbVersion = _ZERO_TCB
    platform_info: int = 0
    author_key_en: bool = False
    mask_chip_key: bool = False
    signing_key: SigningKey = SigningKey.VCEK
    report_data: bytes = bytes(64)
    measurement: bytes = bytes(48)
    host_data: bytes = bytes(32)
    id_key_digest: bytes = bytes(48)
    author_key_digest: bytes = bytes(48)
    report_id: bytes = bytes(32)
    report_id_ma: bytes = b"\xff" * 32
    reported_tcb: TcbVersion = _ZERO_TCB
    cpuid_fam_id: int | None = FAMILY_ZEN3_ZEN4
    cpuid_mod_id: int | None = 0x01
    cpuid_step: int | None = 0x01
    chip_id: bytes = bytes(64)
    committed_tcb: TcbVersion = _ZERO_TCB
    current_build: int = 0
    current_minor: int = 0
    current_major: int = 0
    committed_build: int = 0
    committed_minor: int = 0
    committed_major: int = 0
    launch_tcb: TcbVersion = _ZERO_TCB
    launch_mit_vector: int | None = None
    current_mit_vector: int | None = None
    signature: bytes = bytes(SIGNATURE_SIZE)
    raw: bytes = b""

    @property
    def signed_bytes(self) -> bytes:
        """Bytes [0, 0x2A0) over which the ECDSA signature is computed."""
        return (self.raw or encode_report(self))[:SIGNED_SIZE]

    @property
    def signature_rs(self) -> tuple[int, int]:
        """ECDSA (r, s) from the little-endian 72-byte fields of SIGNATURE."""
        size = ECDSA_COMPONENT_SIZE
        return (
            int.from_bytes(self.signature[:size], "little"),
            int.from_bytes(self.signature[size : 2 * size], "little"),
        )

    @property
    def policy_flags(self) -> GuestPolicy:
        return GuestPolicy(self.policy)

    @property
    def platform_flags(self) -> PlatformInfo:
        return PlatformInfo(self.platform_info)

    @property
    def tcb_layout(self) -> TcbLayout:
        return tcb_layout(self.version, self.cpuid_fam_id)

    @property
    def product_hint(self) -> Product | None:
        """The product named by CPUID (v3+); ``None`` for version 2 or an unknown model."""
        return product_from_cpuid(self.cpuid_fam_id, self.cpuid_mod_id)

    @property
    def chip_id_masked(self) -> bool:
        return not any(self.chip_id)


def tcb_layout(version: int, family: int | None) -> TcbLayout:
    """Turin (family 0x1A) moved TCB_VERSION's fields; CPUID only exists from version 3 on."""
    if version >= 3 and family == FAMILY_ZEN5:
        return TcbLayout.TURIN
    return TcbLayout.MILAN_GENOA


def product_from_cpuid(family: int | None, model: int | None) -> Product | None:
    """Map CPUID family/model to a product, per AMD's processor programming references."""
    if family == FAMILY_ZEN3_ZEN4 and model is not None:
        if model <= 0x0F:
            return Product.MILAN
        if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
            return Product.GENOA
    if family == FAMILY_ZEN5 and model is not None and model <= 0x11:
        return Product.TURIN
    return None


# (field, offset, struct format or byte count, first version that has it)
_LAYOUT: tuple[tuple[str, int, str | int, int], ...] = (
    ("version", 0x000, "<I", 2),
    ("guest_svn", 0x004, "<I", 2),
    ("policy", 0x008, "<Q", 2),
    ("family_id", 0x010, 16, 2),
    ("image_id", 0x020, 16, 2),
    ("vmpl", 0x030, "<I", 2),
    ("signature_algo", 0x034, "<I", 2),
    ("current_tcb", 0x038, 8, 2),
    ("platform_info", 0x040, "<Q", 2),
    ("report_data", 0x050, 64, 2),
    ("measurement", 0x090, 48, 2),
    ("host_data", 0x0C0, 32, 2),
    ("id_key_digest", 0x0E0, 48, 2),
    ("author_key_digest", 0x110, 48, 2),
    ("report_id", 0x140, 32, 2),
    ("report_id_ma", 0x160, 32, 2),
    ("reported_tcb", 0x180, 8, 2),
    ("cpuid_fam_id", 0x188, "<B", 3),
    ("cpuid_mod_id", 0x189, "<B", 3),
    ("cpuid_step", 0x18A, "<B", 3),
    ("chip_id", 0x1A0, 64, 2),
    ("committed_tcb", 0x1E0, 8, 2),
    ("current_build", 0x1E8, "<B", 2),
    ("current_minor", 0x1E9, "<B", 2),
    ("current_major", 0x1EA, "<B", 2),
    ("committed_build", 0x1EC, "<B", 2),
    ("committed_minor", 0x1ED, "<B", 2),
    ("committed_major", 0x1EE, "<B", 2),
    ("launch_tcb", 0x1F0, 8, 2),
    ("launch_mit_vector", 0x1F8, "<Q", 5),
    ("current_mit_vector", 0x200, "<Q", 5),
    ("signature", 0x2A0, SIGNATURE_SIZE, 2),
)
_TCB_FIELDS = ("current_tcb", "reported_tcb", "committed_tcb", "launch_tcb")


def _reserved_ranges(version: int) -> tuple[tuple[int, int], ...]:
    cpuid_end = 0x188 if version < 3 else 0x18B
    mit_end = 0x1F8 if version < 5 else 0x208
    return ((0x04C, 0x050), (cpuid_end, 0x1A0), (0x1EB, 0x1EC), (0x1EF, 0x1F0), (mit_end, 0x2A0))


def parse_report(data: bytes) -> AttestationReport:
    """Parse exactly one 1184-byte ATTESTATION_REPORT; raises :class:`ParseError`."""
    if len(data) != REPORT_SIZE:
        raise ParseError(
            "snp.bad_size", f"ATTESTATION_REPORT is {len(data)} bytes; the ABI fixes 0x4A0 (1184)"
        )
    data = bytes(data)
    (version,) = struct.unpack_from("<I", data, 0)
    if version not in SUPPORTED_VERSIONS:
        raise ParseError(
            "snp.unsupported_version",
            f"report VERSION {version} is not one of {', '.join(map(str, SUPPORTED_VERSIONS))}",
        )
    for lo, hi in _reserved_ranges(version):
        if any(data[lo:hi]):
            raise ParseError("snp.reserved_nonzero", f"reserved bytes [0x{lo:X}, 0x{hi:X}) != 0")
    values: dict[str, Any] = {}
    for name, offset, fmt, since in _LAYOUT:
        if version < since:
            values[name] = None
        elif isinstance(fmt, int):
            values[name] = data[offset : offset + fmt]
        else:
            (values[name],) = struct.unpack_from(fmt, data, offset)
    (key_info,) = struct.unpack_from("<I", data, _KEY_INFO_OFFSET)
    if key_info >> 5:
        raise ParseError("snp.reserved_nonzero", f"reserved bits 31:5 of 0x48 set ({key_info:#x})")
    raw_key = key_info >> 2 & 0x7
    try:
        signing_key = SigningKey(raw_key)
    except ValueError:
        raise ParseError("snp.unknown_signing_key", f"SIGNING_KEY {raw_key} is reserved") from None
    if values["signature_algo"] == SIG_ALGO_ECDSA_P384_SHA384 and any(data[slice(*_SIG_RESERVED)]):
        raise ParseError("snp.reserved_nonzero", "reserved bytes after the ECDSA R and S != 0")
    family = values["cpuid_fam_id"]
    if version >= 3 and family not in (FAMILY_ZEN3_ZEN4, FAMILY_ZEN5):
        raise ParseError(
            "snp.unknown_cpu_family", f"CPUID_FAM_ID 0x{family:02X} is not 0x19 or 0x1A"
        )
    layout = tcb_layout(version, family)
    for name in _TCB_FIELDS:
        values[name] = TcbVersion.decode(values[name], layout, name.upper())
    return AttestationReport(
        **values,
        author_key_en=bool(key_info & 1),
        mask_chip_key=bool(key_info & 2),
        signing_key=signing_key,
        raw=data,
    )


def encode_report(report: AttestationReport) -> bytes:
    """Encode ``report`` into the 1184-byte ABI form (``raw`` is ignored).

    Raises :class:`ParseError` for values the layout cannot carry (a field of the wrong size,
    CPUID in a version-2 report, a Turin TCB in a Milan/Genoa layout...), so whatever this
    produces :func:`parse_report` accepts.
    """
    if report.version not in SUPPORTED_VERSIONS:
        raise ParseError("snp.unsupported_version", f"cannot encode VERSION {report.version}")
    out = bytearray(REPORT_SIZE)
    layout = tcb_layout(report.version, report.cpuid_fam_id)
    for name, offset, fmt, since in _LAYOUT:
        value = getattr(report, name)
        if report.version < since:
            if value is not None:
                raise ParseError("snp.field_not_in_version", f"{name} needs VERSION >= {since}")
            continue
        if isinstance(value, TcbVersion):
            if value.layout is not layout:
                raise ParseError("snp.tcb_layout", f"{name} does not use the {layout.value} layout")
            value = value.encode()
        if isinstance(fmt, int):
            if not isinstance(value, bytes) or len(value) != fmt:
                raise ParseError("snp.bad_size", f"{name} must be {fmt} bytes")
            out[offset : offset + fmt] = value
        else:
            try:
                struct.pack_into(fmt, out, offset, 0 if value is None else value)
            except struct.error as exc:
                raise ParseError("snp.bad_value", f"{name} out of range") from exc
    key_info = int(report.author_key_en) | int(report.mask_chip_key) << 1
    struct.pack_into("<I", out, _KEY_INFO_OFFSET, key_info | int(report.signing_key) << 2)
    return bytes(out)


def encode_signature(r: int, s: int) -> bytes:
    """The 0x200-byte SIGNATURE field for ECDSA (r, s): 72-byte little-endian each, zero-padded."""
    size = ECDSA_COMPONENT_SIZE
    padding = bytes(SIGNATURE_SIZE - 2 * size)
    return r.to_bytes(size, "little") + s.to_bytes(size, "little") + padding


def report_field_names() -> tuple[str, ...]:
    """Every field of :class:`AttestationReport` except ``raw``: the spec's names, lower case."""
    return tuple(f.name for f in fields(AttestationReport) if f.name != "raw")


@dataclass(frozen=True)
class SnpEvidence:
    """What the verifier receives: the report, and the host's certificate table if attached."""

    report: AttestationReport
    cert_table: CertTable | None = None


def parse_evidence(data: bytes) -> SnpEvidence:
    """Parse SNP evidence: an ATTESTATION_REPORT, optionally followed by a certificate table.

    The optional tail is the extended-report certificate table (SNP_GET_EXT_REPORT's certificate
    pages, configfs-tsm's ``auxblob``), so a collector can ship the VCEK with the report.
    """
    if len(data) < REPORT_SIZE:
        raise ParseError(
            "snp.bad_size", f"evidence is {len(data)} bytes; an ATTESTATION_REPORT is 1184"
        )
    if len(data) > REPORT_SIZE + MAX_TABLE_SIZE:
        raise ParseError("snp.bad_size", f"evidence is {len(data)} bytes, beyond any report+table")
    report = parse_report(data[:REPORT_SIZE])
    tail = data[REPORT_SIZE:]
    return SnpEvidence(report, parse_cert_table(tail) if tail else None)


def encode_evidence(report: bytes, cert_table: bytes = b"") -> bytes:
    """Evidence bytes as :func:`parse_evidence` reads them: report, then the optional table."""
    return report + cert_table
