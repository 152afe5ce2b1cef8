"""What a relying party accepts of a TPM quote: one documented knob per field.

``None`` (or ``False``) means "not checked". The one rule that holds without any knob: an AK
with neither a certificate chaining to a TPM anchor nor a pin here is *self-asserted*: anybody
can make a key and sign a well-formed quote with it, so such evidence is at best a warning
(``tpm.ak_not_anchored``), never affirming.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from services.mesh.errors import PolicyError

BANKS = frozenset({"sha1", "sha256", "sha384", "sha512"})


@dataclass(frozen=True)
class TpmPolicy:
    """Appraisal policy for TPM quotes (also the vTPM part of the Azure families)."""

    trusted_ak_sha256: frozenset[bytes] | None = None
    """Pinned AKs (SHA-256 of their SPKI DER): a pinned AK without certificate is affirming."""
    require_ak_cert: bool = False
    """Refuse an AK without certificate unless pinned (contraindicated instead of warning)."""
    allow_test_anchor: bool = True
    """Accept an AK certificate chaining to an explicitly loaded test anchor (``test:tpm:...``)."""
    reference_pcrs: Mapping[int, frozenset[bytes]] | None = None
    """Acceptable values per PCR index; a PCR listed here must be quoted and match one."""
    allowed_pcr_banks: frozenset[str] | None = None
    """Acceptable quoted banks (``sha1``, ``sha256``, ``sha384``, ``sha512``)."""
    require_event_log: bool = False
    """Refuse evidence without a measured-boot event log."""

    def __post_init__(self) -> None:
        """Reject knobs that could never match, so a typo fails loudly instead of refusing all."""
        if self.trusted_ak_sha256 is not None and any(len(v) != 32 for v in self.trusted_ak_sha256):
            raise PolicyError("tpm.policy_invalid", "trusted_ak_sha256 values must be 32 bytes")
        if self.reference_pcrs is not None:
            for index, values in self.reference_pcrs.items():
                if not 0 <= index < 32:
                    raise PolicyError("tpm.policy_invalid", f"PCR index {index} out of range")
                if any(len(v) not in (20, 32, 48, 64) for v in values):
                    raise PolicyError("tpm.policy_invalid", f"PCR{index} values are not digests")
        if self.allowed_pcr_banks is not None and not self.allowed_pcr_banks <= BANKS:
            raise PolicyError("tpm.policy_invalid", f"allowed_pcr_banks must be among {BANKS}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> TpmPolicy:
        """Build from JSON-like data: digests as hex, ``reference_pcrs`` as {"7": [hex...]}."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PolicyError("tpm.policy_invalid", f"unknown TPM policy fields {unknown}")
        values: dict[str, Any] = {}
        try:
            for name, value in data.items():
                if value is None:
                    values[name] = None
                elif name == "trusted_ak_sha256":
                    values[name] = frozenset(bytes.fromhex(v) for v in value)
                elif name == "reference_pcrs":
                    values[name] = {
                        int(k): frozenset(bytes.fromhex(v) for v in vs)
                        for k, vs in dict(value).items()
                    }
                elif name == "allowed_pcr_banks":
                    values[name] = frozenset(str(v).lower() for v in value)
                elif isinstance(value, bool):
                    values[name] = value
                else:
                    raise PolicyError("tpm.policy_invalid", f"{name} must be true or false")
        except (TypeError, ValueError) as exc:
            raise PolicyError("tpm.policy_invalid", f"malformed TPM policy: {exc}") from exc
        return cls(**values)
