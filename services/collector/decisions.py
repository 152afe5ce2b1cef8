"""Which decisions a collector may act on: only those the policy service signed for this
round.

Evidence ids travel on ``attest.evidence.>``, so anyone who can publish on
``attest.decision.<node>`` could otherwise answer a node's evidence with a forged deny (the
node gives up) or a forged allow (it asks for a secret under a decision the broker never
saw). A decision counts only if its token verifies under the policy key the collector was
given, is unexpired, and its signed claims name this node, this evidence and this round's
public key; the values used afterwards come from the signed claims, never the plain fields.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from datetime import datetime

from services.mesh import events
from services.mesh.errors import Rejected, VerificationError
from services.mesh.keys import TrustedKeys
from services.verifier.ear import b64url

POLICY_SIGNER = "policy"


_CODE = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)+")


@dataclass(frozen=True)
class SignedDecision:
    """The signed content of a decision (what the collector acts on)."""

    id: str
    status: str
    allow: bool
    evidence_id: str
    expires_at: int
    refused: bool = False
    """The mesh refused the evidence itself (it did not prove it is this node): the node's
    previous decision stays in force."""
    reasons: tuple[str, ...] = ()
    token: str = ""
    """The signed decision itself, presented to the broker with the secret request."""
    appraisal: bytes = b""
    """The appraisal summary beside the token (its digest signed in it), presented with it."""

    @property
    def reason(self) -> str:
        """Why it denied or refused: the first machine-readable code among the signed reasons
        (a policy's own messages may be prose; the verifier's are dotted codes)."""
        codes = [r for r in self.reasons if _CODE.fullmatch(r)]
        return codes[0] if codes else (self.reasons[0] if self.reasons else "")


def read(
    decision: events.Decision,
    trusted: TrustedKeys,
    *,
    node: str,
    evidence_id: str,
    public_key: bytes,
    now: datetime,
) -> SignedDecision:
    """The decision's signed content if it is this round's; raise with the reason otherwise."""
    try:
        claims = trusted.verify(decision.token, accept=lambda name: name == POLICY_SIGNER, now=now)
    except VerificationError as exc:
        raise Rejected(exc.reason, exc.detail) from None
    signed_key = claims.get("public_key")
    if claims.get("node") != node:
        raise Rejected("collector.decision_wrong_node", "signed for another node")
    if claims.get("evidence_id") != evidence_id:
        raise Rejected("collector.decision_wrong_evidence", "signed for other evidence")
    if not isinstance(signed_key, str) or not hmac.compare_digest(
        signed_key.encode(), b64url(public_key).encode()
    ):
        raise Rejected("collector.decision_wrong_key", "signed for another public key")
    allow, jti, status = claims.get("allow"), claims.get("jti"), claims.get("status")
    if not isinstance(allow, bool) or not isinstance(jti, str) or not isinstance(status, str):
        raise Rejected("collector.decision_malformed", "allow, jti or status missing")
    refused, reasons = claims.get("refused", False), claims.get("reasons", [])
    if not isinstance(refused, bool) or not (
        isinstance(reasons, list) and all(isinstance(r, str) for r in reasons)
    ):
        raise Rejected("collector.decision_malformed", "refused or reasons malformed")
    if (
        decision.allow != allow
        or decision.id != jti
        or decision.node != node
        or decision.evidence_id != evidence_id
        or decision.refused != refused
    ):
        raise Rejected("collector.decision_routing_mismatch", "plain fields disagree with token")
    return SignedDecision(
        id=jti,
        status=status,
        allow=allow,
        evidence_id=evidence_id,
        expires_at=int(claims["exp"]),
        refused=refused,
        reasons=tuple(reasons[:16]),
        token=decision.token,
        appraisal=decision.appraisal,
    )
