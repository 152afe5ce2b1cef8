"""What a relying party accepts of an SEV-SNP guest: one documented knob per field.

``None`` (or ``False`` for the ``require_*`` switches) means "not checked"; the one exception is
``allow_debug``, which defaults to refusing debuggable guests, because a debug guest's memory is
readable by the host and no other claim about it means anything. :func:`evaluate` reports every
violation, never just the first, in the spec's vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from services.mesh.errors import PolicyError
from services.verifier.families.base import Check, Reason, Status
from services.verifier.families.snp.parse import AttestationReport, TcbVersion

TCB_PARTS = ("bootloader", "tee", "snp", "microcode", "fmc")


@dataclass(frozen=True)
class SnpPolicy:
    """Appraisal policy for SEV-SNP reports."""

    allow_debug: bool = False
    """Accept POLICY.DEBUG (bit 19); otherwise ``snp.debug_enabled``."""
    require_no_migration_agent: bool = False
    """Refuse POLICY.MIGRATE_MA (bit 18): a migration agent can export the guest."""
    require_single_socket: bool = False
    """Require POLICY.SINGLE_SOCKET (bit 20)."""
    require_no_smt: bool = False
    """Require PLATFORM_INFO.SMT_EN clear: no sibling hyperthread shares the core."""
    permit_provisional_firmware: bool = True
    """Accept CURRENT_TCB/version differing from COMMITTED (firmware not yet committed)."""
    allow_test_anchor: bool = True
    """Accept a chain ending in an explicitly loaded test anchor (``test:amd:...``)."""
    max_vmpl: int | None = None
    """Highest VMPL the report may come from (0 is the most privileged)."""
    min_guest_svn: int | None = None
    """Minimum GUEST_SVN."""
    min_firmware: tuple[int, int] | None = None
    """Minimum CURRENT_MAJOR.CURRENT_MINOR of the SNP firmware."""
    min_reported_tcb: Mapping[str, int] | None = None
    """Minimum SPL per REPORTED_TCB component (bootloader, tee, snp, microcode, fmc)."""
    min_launch_tcb: Mapping[str, int] | None = None
    """Minimum SPL per LAUNCH_TCB component."""
    allowed_measurements: frozenset[bytes] | None = None
    """Acceptable MEASUREMENT values (48 bytes each)."""
    allowed_host_data: frozenset[bytes] | None = None
    """Acceptable HOST_DATA values (32 bytes each)."""
    allowed_id_key_digests: frozenset[bytes] | None = None
    """Acceptable ID_KEY_DIGEST values (48 bytes each)."""
    allowed_author_key_digests: frozenset[bytes] | None = None
    """Acceptable AUTHOR_KEY_DIGEST values (48 bytes each)."""
    allowed_family_ids: frozenset[bytes] | None = None
    """Acceptable FAMILY_ID values (16 bytes each)."""
    allowed_image_ids: frozenset[bytes] | None = None
    """Acceptable IMAGE_ID values (16 bytes each)."""
    allowed_chip_ids: frozenset[bytes] | None = None
    """Acceptable CHIP_ID values (64 bytes each)."""
    allowed_signing_keys: frozenset[str] | None = None
    """Acceptable signing keys: ``vcek``, ``vlek``."""
    allowed_products: frozenset[str] | None = None
    """Acceptable products: ``milan``, ``genoa``, ``turin``."""

    def __post_init__(self) -> None:
        """Reject knobs that could never match, so a typo fails loudly instead of refusing all."""
        for name in ("min_reported_tcb", "min_launch_tcb"):
            minimum = getattr(self, name)
            if minimum is not None and not set(minimum) <= set(TCB_PARTS):
                unknown = sorted(set(minimum) - set(TCB_PARTS))
                raise PolicyError("snp.policy_invalid", f"{name} has unknown parts {unknown}")
        for name, field_name, _code in _ALLOW_LISTS:
            allowed = getattr(self, f"allowed_{name}")
            size = _FIELD_SIZES[field_name]
            if allowed is not None and any(len(v) != size for v in allowed):
                raise PolicyError(
                    "snp.policy_invalid", f"allowed_{name} values must be {size} bytes"
                )
        for name, choices in _STRING_CHOICES.items():
            values = getattr(self, name)
            if values is not None and not set(values) <= choices:
                raise PolicyError("snp.policy_invalid", f"{name} must be among {sorted(choices)}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SnpPolicy:
        """Build from JSON-like data: byte values as hex strings, sets as lists."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PolicyError("snp.policy_invalid", f"unknown SNP policy fields {unknown}")
        values: dict[str, Any] = {}
        try:
            for name, value in data.items():
                if value is None:
                    values[name] = None
                elif name.startswith("allowed_") and name not in _STRING_SETS:
                    values[name] = frozenset(bytes.fromhex(v) for v in value)
                elif name in _STRING_SETS:
                    values[name] = frozenset(str(v).lower() for v in value)
                elif name == "min_firmware":
                    major, minor = value
                    values[name] = (int(major), int(minor))
                elif name.startswith("min_") and name.endswith("_tcb"):
                    values[name] = {str(k): int(v) for k, v in dict(value).items()}
                elif name.startswith(("min_", "max_")):
                    values[name] = int(value)
                elif isinstance(value, bool):
                    values[name] = value
                else:
                    raise PolicyError("snp.policy_invalid", f"{name} must be true or false")
        except (TypeError, ValueError) as exc:
            raise PolicyError("snp.policy_invalid", f"malformed SNP policy: {exc}") from exc
        return cls(**values)


_STRING_SETS = ("allowed_signing_keys", "allowed_products")
_STRING_CHOICES = {
    "allowed_signing_keys": frozenset({"vcek", "vlek"}),
    "allowed_products": frozenset({"milan", "genoa", "turin"}),
}
_FIELD_SIZES = {
    "measurement": 48,
    "host_data": 32,
    "id_key_digest": 48,
    "author_key_digest": 48,
    "family_id": 16,
    "image_id": 16,
    "chip_id": 64,
}


class _Findings:
    def __init__(self) -> None:
        self.reasons: list[Reason] = []
        self.checks: list[Check] = []

    def check(self, name: str, ok: bool, code: str, detail: str, status: Status) -> None:
        self.checks.append(Check(name, ok, detail))
        if not ok:
            self.reasons.append(Reason(code, detail, status))


def evaluate(
    policy: SnpPolicy,
    report: AttestationReport,
    *,
    product: str | None,
    trust_anchor: str | None,
) -> tuple[list[Reason], list[Check]]:
    """Every policy violation of ``report`` as a reason, plus one check per knob evaluated."""
    out = _Findings()
    bad = Status.CONTRAINDICATED
    flags = report.policy_flags
    if not policy.allow_debug:
        detail = "POLICY.DEBUG is set: the host can read and alter guest memory"
        out.check(
            "debug",
            not flags.debug,
            "snp.debug_enabled",
            detail if flags.debug else "POLICY.DEBUG is clear",
            bad,
        )
    if flags.reserved_bits:
        out.check(
            "policy_reserved",
            False,
            "snp.policy_reserved_bits",
            f"POLICY sets bits undefined by this ABI revision ({flags.reserved_bits:#x})",
            Status.WARNING,
        )
    if policy.require_no_migration_agent:
        out.check(
            "migration_agent",
            not flags.migrate_ma,
            "snp.migration_agent_allowed",
            f"POLICY.MIGRATE_MA is {int(flags.migrate_ma)}",
            bad,
        )
    if policy.require_single_socket:
        out.check(
            "single_socket",
            flags.single_socket,
            "snp.single_socket_not_required",
            f"POLICY.SINGLE_SOCKET is {int(flags.single_socket)}",
            bad,
        )
    if policy.require_no_smt:
        smt = report.platform_flags.smt_enabled
        out.check(
            "platform_smt", not smt, "snp.smt_enabled", f"PLATFORM_INFO.SMT_EN is {int(smt)}", bad
        )
    if not policy.permit_provisional_firmware:
        current = (report.current_major, report.current_minor, report.current_build)
        committed = (report.committed_major, report.committed_minor, report.committed_build)
        same = current == committed and report.current_tcb == report.committed_tcb
        out.check(
            "provisional_firmware",
            same,
            "snp.provisional_firmware",
            "CURRENT firmware/TCB equals COMMITTED"
            if same
            else "CURRENT firmware/TCB differs from COMMITTED (provisional firmware)",
            bad,
        )
    if not policy.allow_test_anchor and trust_anchor is not None:
        test = trust_anchor.startswith("test:")
        out.check(
            "trust_anchor",
            not test,
            "snp.test_anchor_not_allowed",
            f"chain ends in {trust_anchor}",
            bad,
        )
    if policy.max_vmpl is not None:
        out.check(
            "vmpl",
            report.vmpl <= policy.max_vmpl,
            "snp.vmpl_too_high",
            f"report's VMPL {report.vmpl}, allowed at most {policy.max_vmpl}",
            bad,
        )
    if policy.min_guest_svn is not None:
        out.check(
            "guest_svn",
            report.guest_svn >= policy.min_guest_svn,
            "snp.guest_svn_below_minimum",
            f"report's GUEST_SVN {report.guest_svn}, required minimum {policy.min_guest_svn}",
            bad,
        )
    if policy.min_firmware is not None:
        firmware = (report.current_major, report.current_minor)
        out.check(
            "firmware",
            firmware >= policy.min_firmware,
            "snp.firmware_below_minimum",
            f"firmware {firmware[0]}.{firmware[1]}, required minimum "
            f"{policy.min_firmware[0]}.{policy.min_firmware[1]}",
            bad,
        )
    _tcb(
        out,
        "reported_tcb_minimum",
        field_name="REPORTED_TCB",
        tcb=report.reported_tcb,
        minimum=policy.min_reported_tcb,
        code="snp.tcb_below_minimum",
    )
    _tcb(
        out,
        "launch_tcb_minimum",
        field_name="LAUNCH_TCB",
        tcb=report.launch_tcb,
        minimum=policy.min_launch_tcb,
        code="snp.launch_tcb_below_minimum",
    )
    for name, field_name, code in _ALLOW_LISTS:
        allowed = getattr(policy, f"allowed_{name}")
        if allowed is not None:
            value: bytes = getattr(report, field_name)
            out.check(
                name,
                value in allowed,
                code,
                f"{field_name.upper()} {value.hex()} is{'' if value in allowed else ' not'} "
                "among the allowed values",
                bad,
            )
    _member(
        out,
        "signing_key",
        report.signing_key.name.lower(),
        policy.allowed_signing_keys,
        "snp.signing_key_not_allowed",
    )
    if product is not None:
        _member(out, "product", product, policy.allowed_products, "snp.product_not_allowed")
    return out.reasons, out.checks


_ALLOW_LISTS = (
    ("measurements", "measurement", "snp.measurement_not_allowed"),
    ("host_data", "host_data", "snp.host_data_not_allowed"),
    ("id_key_digests", "id_key_digest", "snp.id_key_not_allowed"),
    ("author_key_digests", "author_key_digest", "snp.author_key_not_allowed"),
    ("family_ids", "family_id", "snp.family_id_not_allowed"),
    ("image_ids", "image_id", "snp.image_id_not_allowed"),
    ("chip_ids", "chip_id", "snp.chip_id_not_allowed"),
)


def _tcb(
    out: _Findings,
    check: str,
    *,
    field_name: str,
    tcb: TcbVersion,
    minimum: Mapping[str, int] | None,
    code: str,
) -> None:
    if minimum is None:
        return
    have = tcb.as_dict()
    low = [
        f"{part} {have.get(part, 'absent')} < {want}"
        for part, want in minimum.items()
        if have.get(part, -1) < want
    ]
    detail = f"{field_name} " + ("; ".join(low) if low else "meets the required minimum")
    out.check(check, not low, code, detail, Status.CONTRAINDICATED)


def _member(
    out: _Findings, check: str, value: str, allowed: Iterable[str] | None, code: str
) -> None:
    if allowed is None:
        return
    ok = value in set(allowed)
    out.check(
        check, ok, code, f"{check} {value} is{'' if ok else ' not'} allowed", Status.CONTRAINDICATED
    )
