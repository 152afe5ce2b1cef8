"""What a relying party accepts of an Arm CCA realm and its platform: one knob per field.

``None`` means "not checked", with one exception that checks by default:
``allowed_lifecycles`` accepts only ``secured`` (0x3000-0x30FF). The Arm CCA Security Model and
the PSA security lifecycle that the RMM spec's platform token reuses define the states as::

    0x0000-0x00FF unknown                         0x4000-0x40FF non-cca-platform-rot-debug
    0x1000-0x10FF assembly-and-test               0x5000-0x50FF recoverable-cca-platform-rot-debug
    0x2000-0x20FF cca-platform-rot-provisioning   0x6000-0x60FF decommissioned
    0x3000-0x30FF secured

Only in ``secured`` are the platform's security guarantees in force with no debug path open; the
two debug states are refused as ``cca.debug_enabled``, every other state as
``cca.lifecycle_not_secured``. A deployment that knowingly accepts, say, non-CCA-RoT debug
lists that state explicitly. :func:`evaluate` reports every violation, never just the first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from services.mesh.errors import PolicyError
from services.verifier.families.base import Check, Reason, Status
from services.verifier.families.cca.parse import (
    DEBUG_LIFECYCLES,
    LIFECYCLE_STATES,
    PlatformClaims,
    RealmClaims,
)

_STATES = frozenset(LIFECYCLE_STATES.values())


@dataclass(frozen=True)
class CcaPolicy:
    """Appraisal policy for CCA tokens."""

    allowed_lifecycles: frozenset[str] = frozenset({"secured"})
    """Acceptable platform lifecycle states (names as in the module docstring)."""
    allowed_realm_initial_measurements: frozenset[bytes] | None = None
    """Acceptable RIM values (claim 44238)."""
    allowed_realm_extensible_measurements: Mapping[int, frozenset[bytes]] | None = None
    """Acceptable values per REM index 0-3 (claim 44239)."""
    allowed_personalization_values: frozenset[bytes] | None = None
    """Acceptable realm personalization values (claim 44235, 64 bytes)."""
    allowed_implementation_ids: frozenset[bytes] | None = None
    """Acceptable platform implementation ids (claim 2396, 32 bytes)."""
    allowed_instance_ids: frozenset[bytes] | None = None
    """Acceptable platform instance ids (claim 256, 33 bytes)."""
    allowed_platform_profiles: frozenset[str] | None = None
    """Acceptable platform profiles (claim 265)."""
    allowed_sw_measurements: frozenset[bytes] | None = None
    """Reference values: every platform software component's measurement must be listed."""

    def __post_init__(self) -> None:
        """Reject knobs that could never match, so a typo fails loudly instead of refusing all."""
        unknown = set(self.allowed_lifecycles) - _STATES
        if unknown:
            raise PolicyError("cca.policy_invalid", f"unknown lifecycle states {sorted(unknown)}")
        if not set(self.allowed_realm_extensible_measurements or {}) <= {0, 1, 2, 3}:
            raise PolicyError("cca.policy_invalid", "REM indices are 0 to 3")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> CcaPolicy:
        """Build from JSON-like data: byte values as hex strings, sets as lists."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise PolicyError("cca.policy_invalid", f"unknown CCA policy fields {unknown}")
        values: dict[str, Any] = {}
        try:
            for name, value in data.items():
                if value is None:
                    values[name] = None
                elif name in ("allowed_lifecycles", "allowed_platform_profiles"):
                    values[name] = frozenset(str(v) for v in value)
                elif name == "allowed_realm_extensible_measurements":
                    values[name] = {
                        int(k): frozenset(bytes.fromhex(h) for h in v) for k, v in value.items()
                    }
                else:
                    values[name] = frozenset(bytes.fromhex(h) for h in value)
        except (TypeError, ValueError, AttributeError) as exc:
            raise PolicyError("cca.policy_invalid", f"malformed CCA policy: {exc}") from exc
        return cls(**values)


def evaluate(
    policy: CcaPolicy, platform: PlatformClaims, realm: RealmClaims
) -> tuple[list[Reason], list[Check]]:
    """Every policy violation as a reason, plus one check per knob evaluated."""
    reasons: list[Reason] = []
    checks: list[Check] = []

    def check(name: str, ok: bool, code: str, detail: str) -> None:
        checks.append(Check(name, ok, detail))
        if not ok:
            reasons.append(Reason(code, detail, Status.CONTRAINDICATED))

    state = platform.lifecycle_state
    ok = state in policy.allowed_lifecycles
    code = "cca.debug_enabled" if state in DEBUG_LIFECYCLES else "cca.lifecycle_not_secured"
    check(
        "lifecycle",
        ok,
        code,
        f"platform lifecycle 0x{platform.lifecycle:04x} is {state}"
        + ("" if ok else f", not among {sorted(policy.allowed_lifecycles)}"),
    )

    def member(name: str, value: bytes | str, allowed: frozenset[Any] | None, code: str) -> None:
        if allowed is not None:
            good = value in allowed
            shown = value.hex() if isinstance(value, bytes) else value
            check(name, good, code, f"{name} {shown} is{'' if good else ' not'} allowed")

    member(
        "realm_initial_measurement",
        realm.initial_measurement,
        policy.allowed_realm_initial_measurements,
        "cca.rim_not_allowed",
    )
    for index, allowed in sorted((policy.allowed_realm_extensible_measurements or {}).items()):
        member(f"rem{index}", realm.extensible_measurements[index], allowed, "cca.rem_not_allowed")
    member(
        "personalization_value",
        realm.personalization_value,
        policy.allowed_personalization_values,
        "cca.personalization_value_not_allowed",
    )
    member(
        "implementation_id",
        platform.implementation_id,
        policy.allowed_implementation_ids,
        "cca.implementation_id_not_allowed",
    )
    member(
        "instance_id",
        platform.instance_id,
        policy.allowed_instance_ids,
        "cca.instance_id_not_allowed",
    )
    member(
        "platform_profile",
        platform.profile,
        policy.allowed_platform_profiles,
        "cca.profile_not_allowed",
    )
    if policy.allowed_sw_measurements is not None:
        unknown = [
            c for c in platform.sw_components if c.measurement not in policy.allowed_sw_measurements
        ]
        names = ", ".join(c.type or c.measurement.hex()[:16] for c in unknown)
        check(
            "sw_components",
            not unknown,
            "cca.sw_component_not_allowed",
            f"unrecognised platform software: {names}"
            if unknown
            else f"all {len(platform.sw_components)} software components are reference values",
        )
    return reasons, checks
