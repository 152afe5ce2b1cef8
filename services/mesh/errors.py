"""One error tree for the whole mesh, each error carrying a stable machine-readable reason.

Reasons are dotted codes (``snp.report_signature_invalid``, ``policy.nonce_replayed``) that
flow unchanged into verdicts, logs and span attributes, so callers branch on ``reason`` and
never on message text. Messages must never contain secret material.

    AttestmeshError
    ├── ParseError            evidence or message bytes are malformed (bounded, exact parsing)
    ├── VerificationError     signatures, chains or bindings do not hold
    │   ├── TrustError        no pinned/configured trust anchor fits
    │   └── CollateralError   collateral missing, invalid or expired
    ├── PolicyError           appraisal policy cannot be loaded or evaluated
    ├── SealingError          sealed state cannot be opened (wrong key, tampered, rolled back)
    ├── ReleaseError          a secret request is refused
    ├── Rejected              a well-formed message refused on security grounds (replayed
    │                         nonce, unknown signer): dead-lettered, never retried
    ├── BusError              NATS/JetStream failures, mapped at the boundary
    └── ConfigError           bad configuration or CLI usage
"""

from __future__ import annotations


class AttestmeshError(Exception):
    """Base error: ``reason`` is the stable code, ``detail`` a human explanation."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class ParseError(AttestmeshError):
    """Input bytes do not have the exact shape the format requires."""


class VerificationError(AttestmeshError):
    """A signature, certificate chain or binding does not verify."""


class TrustError(VerificationError):
    """No acceptable trust anchor: missing, not pinned, or not configured."""


class CollateralError(VerificationError):
    """Collateral (VCEK, CRL, TCB info...) is missing, malformed or outside its validity."""


class PolicyError(AttestmeshError):
    """A policy or its reference values cannot be compiled or evaluated."""


class SealingError(AttestmeshError):
    """Sealed state cannot be opened or written."""


class ReleaseError(AttestmeshError):
    """A secret release is refused."""


class Rejected(AttestmeshError):
    """A well-formed message that must not be acted on; retrying cannot change that."""


class BusError(AttestmeshError):
    """The message bus failed; third-party NATS errors are mapped to this."""


class ConfigError(AttestmeshError):
    """Configuration or command-line usage is wrong."""
