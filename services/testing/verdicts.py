"""Signed verdicts, as a verifier publishes them, for driving the policy service directly.

The policy trusts a verdict for what its EAR says; these are real EARs signed with a real
``verifier-*`` key over a given appraisal, so a test (or ``bench.policyverdicts``) can put
the policy's own path under load or under a microscope without running a verifier.
"""

from __future__ import annotations

import os
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from services.mesh import events, subjects
from services.mesh.keys import SigningKey
from services.verifier import ear
from services.verifier.families.base import Appraisal, Status

FAMILY = "snp"


def signed(
    key: SigningKey,
    node: str,
    nonce: bytes,
    *,
    claims: dict[str, Any],
    hwid: str,
    status: Status = Status.AFFIRMING,
    ttl: float = 600.0,
) -> events.Verdict:
    """An authenticated verdict on ``node``'s evidence answering ``nonce``."""
    appraisal = Appraisal(
        family=FAMILY, status=status, claims=claims, verified=True, bound=True, hwid=hwid
    )
    evidence_id = events.new_id()
    subject = ear.Subject(
        node=node,
        evidence_id=evidence_id,
        nonce=nonce,
        public_key=os.urandom(32),
        simulated=True,
    )
    return events.Verdict(
        node=node,
        family=FAMILY,
        evidence_id=evidence_id,
        status=status.value,
        ear=ear.issue(key, appraisal, subject, now=events.utcnow(), ttl=ttl),
    )


def delivered(nc: Client, verdict: events.Verdict) -> Msg:
    """``verdict`` as the policy's consumer hands it to the handler (first delivery)."""
    return Msg(
        _client=nc,
        subject=subjects.verdict(verdict.family, verdict.node),
        data=events.encode(verdict),
    )
