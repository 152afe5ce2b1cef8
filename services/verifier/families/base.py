"""What every hardware family exposes: one pure, synchronous ``appraise`` call.

A family runs parse -> verify -> appraise on raw evidence bytes and always returns an
:class:`Appraisal`; malformed or untrusted input becomes a contraindicated appraisal carrying
machine-readable reasons rather than an exception, so one bad message never stops a worker.
Clock, trust anchors and collateral arrive in :class:`VerifyOptions`, which keeps verification
deterministic and free of I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from services.mesh import telemetry
from services.mesh.errors import AttestmeshError, ParseError

if TYPE_CHECKING:
    from services.verifier.trust import TrustStore


class Status(enum.StrEnum):
    """EAR status tiers, ordered from best to worst by :data:`SEVERITY`."""

    AFFIRMING = "affirming"
    WARNING = "warning"
    CONTRAINDICATED = "contraindicated"
    NONE = "none"


SEVERITY: dict[Status, int] = {
    Status.AFFIRMING: 0,
    Status.WARNING: 1,
    Status.NONE: 2,
    Status.CONTRAINDICATED: 3,
}

# AR4SI trustworthiness-vector claim names and the EAR values used for them.
TRUST_CLAIMS = (
    "instance-identity",
    "configuration",
    "executables",
    "file-system",
    "hardware",
    "runtime-opaque",
    "storage-opaque",
    "sourced-data",
)
TV_NO_CLAIM = 0
TV_AFFIRMING = 2
TV_WARNING = 32
TV_CONTRAINDICATED = 96


_TV_SHORT = {
    "instance": "instance-identity",
    "configuration": "configuration",
    "executables": "executables",
    "file_system": "file-system",
    "hardware": "hardware",
    "runtime": "runtime-opaque",
    "storage": "storage-opaque",
    "sourced_data": "sourced-data",
}


def trust_vector(**values: int) -> dict[str, int]:
    """An AR4SI trust vector with every claim present: those named get ``values``
    (``instance=2, hardware=2``...), the rest :data:`TV_NO_CLAIM`."""
    vector = dict.fromkeys(TRUST_CLAIMS, TV_NO_CLAIM)
    for key, value in values.items():
        vector[_TV_SHORT[key]] = value
    return vector


def worst(statuses: list[Status]) -> Status:
    """The most severe of ``statuses`` (affirming when empty)."""
    return max(statuses, key=SEVERITY.__getitem__, default=Status.AFFIRMING)


@dataclass(frozen=True)
class Reason:
    """One finding: a stable ``code`` (``snp.debug_enabled``) and a human message."""

    code: str
    message: str
    status: Status = Status.CONTRAINDICATED


@dataclass(frozen=True)
class Check:
    """One verification step for the human-readable report: name, outcome, detail."""

    name: str
    ok: bool
    detail: str = ""


@dataclass
class Appraisal:
    """The outcome of appraising one piece of evidence, ready to become an EAR verdict."""

    family: str
    status: Status
    claims: dict[str, Any] = field(default_factory=dict)
    trust_vector: dict[str, int] = field(default_factory=dict)
    reasons: list[Reason] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    verified: bool = False
    bound: bool = False
    """The evidence binds the value the caller expected (nonce and key); never true when the
    caller expected nothing, so evidence checked without a challenge is never authenticated."""
    hwid: str = ""
    """The hardware identity the evidence proves (``snp.chip_id:<hex>``...), set only from
    verified data; empty when verification failed or the family cannot name one."""

    @property
    def authenticated(self) -> bool:
        """Signature and chain hold and the evidence answers this very challenge: only such
        evidence may change a node's standing (see :mod:`services.verifier.identity`)."""
        return self.verified and self.bound

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` shape of DESIGN.md §6."""
        return {
            "status": str(self.status),
            "family": self.family,
            "verified": self.verified,
            "authenticated": self.authenticated,
            "hwid": self.hwid,
            "claims": self.claims,
            "trust_vector": self.trust_vector,
            "reasons": [{"code": r.code, "message": r.message} for r in self.reasons],
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
        }


def unparsable(family: str, error: AttestmeshError) -> Appraisal:
    """The appraisal of evidence that did not even parse: contraindicated, nothing claimed,
    and the identity and hardware claims of the trust vector contraindicated."""
    detail = error.detail or error.reason
    return Appraisal(
        family=family,
        status=Status.CONTRAINDICATED,
        trust_vector=trust_vector(instance=TV_CONTRAINDICATED, hardware=TV_CONTRAINDICATED),
        reasons=[Reason(error.reason, detail)],
        checks=[Check("parse", False, detail)],
    )


@dataclass(frozen=True)
class VerifyOptions:
    """Everything from outside that verification depends on, injected.

    ``expected_report_data`` is what the evidence must bind (SHA-512(nonce || key) for SNP/TDX);
    ``None`` means the caller does not check the binding. ``collateral`` maps file names of the
    vectors' collateral layout (``vcek.der``, ``tcb_info.json``...) to bytes.
    """

    now: datetime
    trust: TrustStore
    collateral: Mapping[str, bytes] = field(default_factory=dict)
    expected_report_data: bytes | None = None
    offline: bool = True


log = telemetry.logger("verifier")


class FamilyVerifier(Protocol):
    """One hardware family's verifier; see the module docstring for the contract."""

    family: ClassVar[str]

    def appraise(self, evidence: bytes, options: VerifyOptions) -> Appraisal:
        """Parse, verify and appraise ``evidence``; never raises for bad input."""
        ...


def appraise_untrusted(
    verifier: FamilyVerifier, evidence: bytes, options: VerifyOptions
) -> Appraisal:
    """``verifier.appraise(evidence, options)``, holding the family to its "never raises" promise.

    Appraisal is pure: an exception is a function of the evidence and would recur on every
    redelivery, and from ``attestmesh verify`` it would be a traceback whose exit code reads
    like a verdict. So whatever escapes the family becomes a contraindicated appraisal at once:
    a mesh error keeps its reason; anything else (``RecursionError``, ``ValueError``...) is an
    input the family failed to bound, reported as ``<family>.evidence_malformed`` and logged
    by type only, since its message may quote the evidence.
    """
    try:
        return verifier.appraise(evidence, options)
    except AttestmeshError as exc:
        return unparsable(verifier.family, exc)
    except Exception as exc:  # noqa: BLE001 - see the docstring: one input must not crash us
        log.error("appraise.crashed", family=verifier.family, error=type(exc).__name__)
        return unparsable(
            verifier.family,
            ParseError(
                f"{verifier.family}.evidence_malformed",
                f"the {verifier.family} parser failed with {type(exc).__name__}",
            ),
        )
