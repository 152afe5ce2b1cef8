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
    │   └── Unavailable       the mesh's own servers did not answer (a failover): worth
    │                         waiting out, never a verdict on the message
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


class Unavailable(BusError):
    """A server, stream or bucket did not answer, or had no leader to answer: the mesh's own
    infrastructure, not the message. A consumer waits such a failure out in place rather than
    spend the message's deliveries on it (:meth:`services.mesh.bus.Bus.consume`)."""


class ConfigError(AttestmeshError):
    """Configuration or command-line usage is wrong."""
