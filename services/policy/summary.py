"""What an allow decision tells the broker about the appraisal behind it.

The broker's resource policy may release a secret only to a node whose evidence showed a
particular measurement, TCB or hardware. The broker never sees the verifier's EAR, and must
not take any of it from the node, so the policy service copies a bounded summary of the EAR
into the decision token it signs: ``family``, ``status`` (already there), ``hwid``, ``claims``
and ``claims_omitted``. Whatever the broker reads from it is as authentic as the decision.

Bounded so that a family with large claims (event logs, certificate details) cannot make
every decision token, and every secret request that re-verifies it, expensive:

* a claim is kept if its value is a scalar (a string of at most :data:`MAX_TEXT`
  characters, a number, a boolean, null) or a flat list or object of at most
  :data:`MAX_ITEMS` such scalars (SNP's ``policy_flags``, Nitro's ``pcrs``); nested
  structures (SNP's ``tcb``, TPM ``events``) are left out, since their facts are also in
  flat claims (``reported_tcb``, ``pcr0``..) or are not a release criterion;
* claims are taken in name order until their encoding would pass :data:`MAX_CLAIMS_BYTES`;
* every claim left out is named in ``claims_omitted`` (at most :data:`MAX_OMITTED`), so a
  policy author can see why a claim is missing. A claim is dropped whole, never truncated:
  a policy that requires it then finds nothing, and denies.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

MAX_TEXT = 512
MAX_ITEMS = 32
MAX_NAME = 64
MAX_CLAIMS = 128
MAX_CLAIMS_BYTES = 8 * 1024
MAX_OMITTED = 64
MAX_HWID = 256
MAX_FAMILY = 32
STATUSES = frozenset({"affirming", "warning", "contraindicated", "none"})


@dataclass(frozen=True)
class AppraisalSummary:
    """The signed summary, as the broker hands it to the resource policy."""

    family: str = ""
    status: str = ""
    hwid: str = ""
    claims: dict[str, Any] = field(default_factory=dict)
    omitted: tuple[str, ...] = ()

    def as_input(self, *, with_claims: bool) -> dict[str, Any]:
        """``input.appraisal``; the claims only for a policy that can read them."""
        out: dict[str, Any] = {"family": self.family, "status": self.status, "hwid": self.hwid}
        if with_claims:
            out["claims"] = self.claims
            out["claims_omitted"] = list(self.omitted)
        return out


def _scalar(value: Any) -> bool:
    if value is None or isinstance(value, bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and len(value) <= MAX_TEXT


def _flat(value: Any) -> bool:
    if _scalar(value):
        return True
    if isinstance(value, list):
        return len(value) <= MAX_ITEMS and all(_scalar(v) for v in value)
    if isinstance(value, dict):
        return len(value) <= MAX_ITEMS and all(
            isinstance(k, str) and len(k) <= MAX_NAME and _scalar(v) for k, v in value.items()
        )
    return False


def bound_claims(claims: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The claims a decision token carries, and the names of those it leaves out."""
    kept: dict[str, Any] = {}
    omitted: list[str] = []
    size = 2
    for name in sorted(claims):
        value = claims[name]
        if len(kept) < MAX_CLAIMS and len(name) <= MAX_NAME and _flat(value):
            cost = len(json.dumps({name: value})) - 1
            if size + cost <= MAX_CLAIMS_BYTES:
                kept[name] = value
                size += cost
                continue
        omitted.append(name[:MAX_NAME])
    return kept, omitted[:MAX_OMITTED]


def token_claims(claims: dict[str, Any], hwid: str) -> dict[str, Any]:
    """The summary's members of a decision token (``family`` and ``status`` are already
    members of every decision)."""
    kept, omitted = bound_claims(claims)
    return {"hwid": hwid[:MAX_HWID], "claims": kept, "claims_omitted": omitted}


def read(token: dict[str, Any]) -> AppraisalSummary:
    """The summary in a verified decision token's claims.

    The token is the policy service's signed word, but its shape is still checked (types and
    counts, cheaply: this runs on every secret request). A decision signed before summaries
    existed reads as one without claims, which a policy requiring a claim denies. Raises
    ``ValueError`` on anything malformed."""
    family = token.get("family", "")
    status = token.get("status", "")
    hwid = token.get("hwid", "")
    claims = token.get("claims", {})
    omitted = token.get("claims_omitted", [])
    if not (isinstance(family, str) and len(family) <= MAX_FAMILY):
        raise ValueError("family")
    if not (status == "" or status in STATUSES):
        raise ValueError("status")
    if not (isinstance(hwid, str) and len(hwid) <= MAX_HWID):
        raise ValueError("hwid")
    if not (isinstance(claims, dict) and len(claims) <= MAX_CLAIMS):
        raise ValueError("claims")
    if not (
        isinstance(omitted, list)
        and len(omitted) <= MAX_OMITTED
        and all(isinstance(n, str) for n in omitted)
    ):
        raise ValueError("claims_omitted")
    return AppraisalSummary(family, status, hwid, claims, tuple(omitted))
