"""What a relying party accepts of a Nitro enclave: one documented knob per field.

``None`` (or ``False`` for the ``require_*`` switches) means "not checked". Two knobs check by
default: ``allow_debug`` refuses debug-mode enclaves, because the parent instance can attach a
console to a debug enclave and its all-zero PCR0-2 measure nothing; and ``max_clock_skew``
refuses documents stamped in the future beyond a few minutes, which only a wrong clock (here
or in the document) produces. :func:`evaluate` reports every violation, never just the first.

PCR meanings (AWS "Where to get an enclave's measurements"): PCR0 enclave image file, PCR1
Linux kernel and bootstrap, PCR2 application, PCR3 IAM role of the parent instance, PCR4
parent instance ID, PCR8 enclave image signing certificate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from services.mesh.errors import PolicyError
from services.verifier.families.base import Check, Reason, Status
from services.verifier.families.nitro.parse import MAX_PCRS, PCR_SIZES, NitroDocument

DEBUG_PCRS = (0, 1, 2)


def is_debug(document: NitroDocument) -> bool:
    """A debug-mode enclave: PCR0, PCR1 and PCR2 are all present and all zero."""
    values = [document.pcr(i) for i in DEBUG_PCRS]
    return all(v is not None and not any(v) for v in values)


@dataclass(frozen=True)
class NitroPolicy:
    """Appraisal policy for Nitro attestation documents."""

    allow_debug: bool = False
    """Accept debug-mode enclaves (PCR0-2 all zero); otherwise ``nitro.debug_enabled``."""
    allow_test_anchor: bool = True
    """Accept a chain ending in an explicitly loaded test root (``test:aws:...``)."""
    allowed_pcrs: Mapping[int, frozenset[bytes]] | None = None
    """Acceptable values per PCR index; a listed index must be present with one of them."""
    max_document_age: timedelta | None = None
    """Oldest acceptable document, measured from ``timestamp`` to the verification time."""
    max_clock_skew: timedelta | None = timedelta(minutes=5)
    """How far ``timestamp`` may lie after the verification time."""
    require_nonce: bool = False
    """Refuse documents without a ``nonce``."""
    require_public_key: bool = False
    """Refuse documents without a ``public_key``."""

    def __post_init__(self) -> None:
        """Reject knobs that could never match, so a typo fails loudly instead of refusing all."""
        for index, values in (self.allowed_pcrs or {}).items():
            if not 0 <= index < MAX_PCRS:
                raise PolicyError("nitro.policy_invalid", f"PCR index {index} is not in 0..31")
            if any(len(v) not in PCR_SIZES for v in values):
                raise PolicyError("nitro.policy_invalid", f"PCR{index} values must be 32/48/64 B")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> NitroPolicy:
        """Build from JSON-like data: PCR values as hex lists keyed by index, ages in seconds."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise PolicyError("nitro.policy_invalid", f"unknown Nitro policy fields {unknown}")
        values: dict[str, Any] = {}
        try:
            for name, value in data.items():
                if value is None or isinstance(value, bool):
                    values[name] = value
                elif name == "allowed_pcrs":
                    values[name] = {
                        int(k): frozenset(bytes.fromhex(h) for h in v) for k, v in value.items()
                    }
                elif name in ("max_document_age", "max_clock_skew"):
                    values[name] = timedelta(seconds=float(value))
                else:
                    raise PolicyError("nitro.policy_invalid", f"{name} must be true or false")
        except (TypeError, ValueError, AttributeError) as exc:
            raise PolicyError("nitro.policy_invalid", f"malformed Nitro policy: {exc}") from exc
        return cls(**values)


def evaluate(
    policy: NitroPolicy, document: NitroDocument, *, now: datetime, trust_anchor: str | None
) -> tuple[list[Reason], list[Check]]:
    """Every policy violation of ``document`` as a reason, plus one check per knob evaluated."""
    reasons: list[Reason] = []
    checks: list[Check] = []

    def check(name: str, ok: bool, code: str, detail: str) -> None:
        checks.append(Check(name, ok, detail))
        if not ok:
            reasons.append(Reason(code, detail, Status.CONTRAINDICATED))

    if not policy.allow_debug:
        debug = is_debug(document)
        detail = (
            "PCR0, PCR1 and PCR2 are all zero: a debug-mode enclave"
            if debug
            else ("PCR0-2 are measured (not a debug-mode enclave)")
        )
        check("debug", not debug, "nitro.debug_enabled", detail)
    if not policy.allow_test_anchor and trust_anchor is not None:
        test = trust_anchor.startswith("test:")
        check(
            "trust_anchor",
            not test,
            "nitro.test_anchor_not_allowed",
            f"chain ends in {trust_anchor}",
        )
    for index, allowed in sorted((policy.allowed_pcrs or {}).items()):
        value = document.pcr(index)
        ok = value is not None and value in allowed
        shown = "absent" if value is None else value.hex()
        check(
            f"pcr{index}",
            ok,
            "nitro.pcr_not_allowed",
            f"PCR{index} {shown} is{'' if ok else ' not'} among the allowed values",
        )
    stamp = document.timestamp
    if policy.max_document_age is not None:
        age = now - stamp
        check(
            "document_age",
            age <= policy.max_document_age,
            "nitro.document_too_old",
            f"document is {age.total_seconds():.0f} s old; at most "
            f"{policy.max_document_age.total_seconds():.0f} s allowed",
        )
    if policy.max_clock_skew is not None:
        ahead = stamp - now
        check(
            "clock_skew",
            ahead <= policy.max_clock_skew,
            "nitro.timestamp_in_future",
            f"document timestamp is {max(ahead.total_seconds(), 0):.0f} s after the "
            "verification time",
        )
    if policy.require_nonce:
        check(
            "nonce",
            document.nonce is not None,
            "nitro.nonce_missing",
            "document carries a nonce" if document.nonce is not None else "no nonce",
        )
    if policy.require_public_key:
        present = document.public_key is not None
        check(
            "public_key",
            present,
            "nitro.public_key_missing",
            "document carries a public_key" if present else "no public_key",
        )
    return reasons, checks
