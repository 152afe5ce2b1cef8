"""The decisions the broker holds: the policy's signed tokens, read back into their claims.

Why a module of its own: the consumer, a presented decision and every release read a
decision the same way (the policy's key, this node, unexpired; the appraisal summary only if
the token signed its digest), and none of that needs the broker's state. Decisions are kept
in ``broker-state`` as the token, :data:`STORED_SEPARATOR`, then the summary bytes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime

from services.broker import presented
from services.broker.auditrecord import MAX_FIELD, MAX_REASONS
from services.mesh.errors import VerificationError
from services.mesh.keys import TrustedKeys
from services.policy import summary
from services.policy.summary import AppraisalSummary
from services.verifier.ear import unb64url

DECISION_PREFIX = "decision."
STORED_SEPARATOR = b"\n"
"""Between a stored decision's token (never a newline in it) and its appraisal bytes."""
POLICY_SIGNER = "policy"


@dataclass(frozen=True)
class HeldDecision:
    """The signed claims of a node's current decision."""

    decision_id: str
    issued_at: int
    expires_at: int
    allow: bool
    public_key: bytes
    verdict_id: str
    evidence_id: str
    reappraisal: bool
    refused: bool = False
    reasons: tuple[str, ...] = ()
    """The policy's reasons for the decision, bounded (for the audit log)."""
    appraisal: AppraisalSummary = field(default_factory=AppraisalSummary)
    """What the resource policy learns of the appraisal (bounded; see
    :mod:`services.policy.summary`): family and status from the token, the rest from the
    bytes beside it once they match ``appraisal_sha256``."""
    appraisal_sha256: str = ""
    order: int = 0
    """When the policy issued it, in microseconds (:func:`.presented.order_of`)."""


class DecisionReader:
    """Reads decision tokens under the policy's key, at the time ``clock`` says."""

    def __init__(self, trusted: TrustedKeys, clock: Callable[[], datetime]) -> None:
        self._trusted = trusted
        self._clock = clock

    def __repr__(self) -> str:
        return "DecisionReader()"

    def read(self, token: str, appraisal: bytes, node: str) -> HeldDecision:
        """The signed claims of a decision about ``node``, with the appraisal summary
        ``appraisal`` if its token signed their digest. A genuine token about another node
        (moved under this node's key or subject) is refused like a forged one."""
        return _attach(self._token(token, node), appraisal)

    def stored(self, raw: bytes, node: str) -> HeldDecision:
        """A decision as kept in ``broker-state``: the token, then the appraisal bytes."""
        token, _, appraisal = raw.partition(STORED_SEPARATOR)
        return self.read(token.decode(errors="replace"), appraisal, node)

    def stored_or_none(self, raw: bytes, node: str) -> HeldDecision | None:
        """A stored decision, or ``None`` if it no longer verifies (as the consumer treats
        it: an expired or unreadable entry is no decision)."""
        try:
            return self.stored(raw, node)
        except VerificationError:
            return None

    def _token(self, token: str, node: str) -> HeldDecision:
        claims = self._trusted.verify(
            token, accept=lambda name: name == POLICY_SIGNER, now=self._clock()
        )
        if claims.get("node") != node:
            raise VerificationError("broker.decision_wrong_node", "signed for another node")
        try:
            return HeldDecision(
                decision_id=str(claims["jti"]),
                issued_at=int(claims["iat"]),
                expires_at=int(claims["exp"]),
                allow=claims["allow"] is True,
                public_key=unb64url(str(claims["public_key"])),
                verdict_id=str(claims["verdict_id"]),
                evidence_id=str(claims["evidence_id"]),
                reappraisal=claims.get("reappraisal") is True,
                refused=claims.get("refused") is True,
                reasons=_bounded_reasons(claims.get("reasons")),
                appraisal=AppraisalSummary(
                    _bounded(claims.get("family", "")), _bounded(claims.get("status", ""))
                ),
                appraisal_sha256=_bounded(claims.get("appraisal_sha256", "")),
                order=presented.order_of(claims),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise VerificationError("broker.decision_malformed", type(exc).__name__) from None


def _attach(held: HeldDecision, raw: bytes) -> HeldDecision:
    """``held`` with the appraisal summary ``raw``, if its token signed their digest.

    A deny carries none, and neither does a decision signed before summaries existed: the
    resource policy then sees family and status only, and denies whatever needs a claim."""
    if not held.appraisal_sha256:
        return held
    if not summary.matches(raw, held.appraisal_sha256):
        raise VerificationError("broker.appraisal_mismatch", "not the summary it signed")
    try:
        found = summary.decode(raw, family=held.appraisal.family, status=held.appraisal.status)
    except ValueError as exc:
        raise VerificationError("broker.decision_malformed", str(exc)) from None
    return replace(held, appraisal=found)


def _bounded_reasons(signed: object) -> tuple[str, ...]:
    """The signed reasons as the audit log takes them: at most 16 printable strings of at
    most 253 characters (longer ones cut), anything else left out."""
    if not isinstance(signed, list):
        return ()
    texts = (r[:MAX_FIELD] for r in signed if isinstance(r, str) and r and r.isprintable())
    return tuple(itertools.islice(texts, MAX_REASONS))


def _bounded(value: object, limit: int = 128) -> str:
    """A short string claim of a verified token (``ValueError`` if it is not one)."""
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError("a decision claim is not a short string")
    return value
