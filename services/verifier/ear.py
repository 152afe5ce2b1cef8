"""EAR (EAT Attestation Result) tokens: how a verifier's appraisal travels to the policy.

The token is a JWT signed ES256 by the verifier's own key, shaped after the Veraison EAR
profile: ``submods.<family>`` holds ``ear.status`` and ``ear.trustworthiness-vector``; the
attestmesh-specific claims (the evidence's claims, reasons, the node and the key the evidence
bound) sit beside them under ``attestmesh.*`` names. Nothing secret goes into it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services import __version__
from services.mesh.errors import VerificationError
from services.mesh.keys import SigningKey, TrustedKeys
from services.verifier.families.base import Appraisal, Status
from services.verifier.families.hwid import MAX_HWID

PROFILE = "tag:github.com,2023:veraison/ear"
VERIFIER_PREFIX = "verifier-"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Subject:
    """What the verified evidence was about: who, which challenge, which key."""

    node: str
    evidence_id: str
    nonce: bytes
    public_key: bytes
    simulated: bool = False


@dataclass(frozen=True)
class Result:
    """A verified EAR, read back by a relying party."""

    issuer: str
    family: str
    status: Status
    subject: Subject
    claims: dict[str, Any]
    reasons: list[dict[str, str]]
    trust_vector: dict[str, int]
    issued_at: int
    verified: bool
    reappraisal: bool = False
    """Issued by a verifier re-checking earlier evidence after its collateral changed."""
    authenticated: bool = False
    """The evidence proved it is the node: signature, chain, binding and envelope all hold.
    Absent from a token means false, so only evidence a verifier vouched for changes state."""
    hwid: str = ""
    """The hardware identity the evidence proved (see ``families.hwid``); empty if none."""


def issue(
    key: SigningKey,
    appraisal: Appraisal,
    subject: Subject,
    *,
    now: datetime,
    ttl: float,
    reappraisal: bool = False,
    proven_hwid: str = "",
) -> str:
    """Sign ``appraisal`` of ``subject`` as an EAR JWT valid for ``ttl`` seconds.

    A re-appraisal names the hardware its evidence proved when it was first verified
    (``proven_hwid``): a revoked chain proves nothing now, yet the policy must still be able
    to tell the node's own evidence from another machine's under its name."""
    authenticated = appraisal.authenticated
    hwid = appraisal.hwid if authenticated else ""
    if reappraisal and proven_hwid:
        hwid = proven_hwid
    iat = int(now.timestamp())
    claims = {
        "eat_profile": PROFILE,
        "iat": iat,
        "exp": iat + int(ttl),
        "eat_nonce": b64url(subject.nonce),
        "ear.verifier-id": {"developer": "attestmesh", "build": f"attestmesh {__version__}"},
        "submods": {
            appraisal.family: {
                "ear.status": str(appraisal.status),
                "ear.trustworthiness-vector": appraisal.trust_vector,
                "ear.appraisal-policy-id": f"attestmesh/{appraisal.family}/default",
                "attestmesh.verified": appraisal.verified,
                "attestmesh.authenticated": authenticated,
                "attestmesh.hwid": hwid,
                "attestmesh.claims": appraisal.claims,
                "attestmesh.reasons": [
                    {"code": r.code, "message": r.message} for r in appraisal.reasons
                ],
            }
        },
        "attestmesh.node": subject.node,
        "attestmesh.evidence_id": subject.evidence_id,
        "attestmesh.public_key": b64url(subject.public_key),
        "attestmesh.simulated": subject.simulated,
        "attestmesh.reappraisal": reappraisal,
    }
    return key.sign(claims)


def read(token: str, trusted: TrustedKeys, *, now: datetime) -> Result:
    """Verify an EAR's signature (by a known ``verifier-*`` key) and expiry, and unpack it."""
    claims = trusted.verify(token, accept=lambda name: name.startswith(VERIFIER_PREFIX), now=now)
    try:
        if claims["eat_profile"] != PROFILE:
            raise VerificationError("ear.profile", "unexpected eat_profile")
        submods = claims["submods"]
        if not isinstance(submods, dict) or len(submods) != 1:
            raise VerificationError("ear.submods", "exactly one submodule expected")
        ((family, sub),) = submods.items()
        return Result(
            issuer=str(claims["iss"]),
            family=str(family),
            status=Status(sub["ear.status"]),
            subject=Subject(
                node=str(claims["attestmesh.node"]),
                evidence_id=str(claims["attestmesh.evidence_id"]),
                nonce=unb64url(claims["eat_nonce"]),
                public_key=unb64url(claims["attestmesh.public_key"]),
                simulated=bool(claims["attestmesh.simulated"]),
            ),
            claims=dict(sub["attestmesh.claims"]),
            reasons=list(sub["attestmesh.reasons"]),
            trust_vector=dict(sub["ear.trustworthiness-vector"]),
            issued_at=int(claims["iat"]),
            verified=sub["attestmesh.verified"] is True,
            reappraisal=claims.get("attestmesh.reappraisal") is True,
            authenticated=sub.get("attestmesh.authenticated") is True,
            hwid=_hwid(sub.get("attestmesh.hwid", "")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise VerificationError("ear.malformed", f"{type(exc).__name__}: {exc}") from None


def _hwid(value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_HWID:
        raise VerificationError("ear.malformed", "attestmesh.hwid is not a bounded string")
    return value
