"""What an allow decision tells the broker about the appraisal behind it.

The broker's resource policy may release a secret only to a node whose evidence showed a
particular measurement, TCB or hardware. The broker never sees the verifier's EAR, and must
not take any of it from the node, so the policy service hands it a bounded summary of the
EAR with each allow decision: ``family`` and ``status`` (members of every decision token),
and ``hwid``, ``claims`` and ``claims_omitted`` in the decision's ``appraisal`` bytes, whose
SHA-256 the token signs as ``appraisal_sha256``. The bytes travel and are stored beside the
token rather than inside it: every secret request re-verifies the token, and the JWT
library's cost grows with the token's length (``bench/resources.py``: 0.31 ms of CPU to read
a decision without a summary, 0.75 ms with an SEV-SNP summary inside the token, 0.36 ms with
it beside the token). Whatever the broker reads from them is as authentic as the decision.

Bounded so that a family with large claims (event logs, certificate details) cannot make
every decision, and every secret request, expensive:

* a claim is kept if its value is a scalar (a string of at most :data:`MAX_TEXT`
  characters, a number, a boolean, null) or a flat list or object of at most
  :data:`MAX_ITEMS` such scalars (SNP's ``policy_flags``, Nitro's ``pcrs``); nested
  structures (SNP's ``tcb``, TPM ``events``) are left out, since their facts are also in
  flat claims (``reported_tcb``, ``pcr0``..) or are not a release criterion;
* claims are taken in name order until their encoding (as the bytes carry them: compact
  UTF-8 JSON) would pass :data:`MAX_CLAIMS_BYTES`;
* every claim left out is named in ``claims_omitted`` (at most :data:`MAX_OMITTED`), so a
  policy author can see why a claim is missing. A claim is dropped whole, never truncated:
  a policy that requires it then finds nothing, and denies.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

from services.mesh import events

MAX_TEXT = 512
MAX_ITEMS = 32
MAX_NAME = 64
MAX_CLAIMS = 128
MAX_CLAIMS_BYTES = 8 * 1024
MAX_OMITTED = 64
MAX_HWID = 256
MAX_SUMMARY_BYTES = events.MAX_APPRAISAL_BYTES


@dataclass(frozen=True)
class AppraisalSummary:
    """The signed summary, as the broker hands it to the resource policy."""

    family: str = ""
    status: str = ""
    hwid: str = ""
    claims: dict[str, Any] = field(default_factory=dict)
    omitted: tuple[str, ...] = ()

    def as_input(self, claims: frozenset[str] | None) -> dict[str, Any]:
        """``input.appraisal`` with ``claims`` of the claims (``None``: all of them)."""
        kept = self.claims
        if claims is not None:
            kept = {name: self.claims[name] for name in claims if name in self.claims}
        return {
            "family": self.family,
            "status": self.status,
            "hwid": self.hwid,
            "claims": kept,
            "claims_omitted": list(self.omitted),
        }


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
            cost = len(msgspec.json.encode({name: value})) - 1
            if size + cost <= MAX_CLAIMS_BYTES:
                kept[name] = value
                size += cost
                continue
        omitted.append(name[:MAX_NAME])
    return kept, omitted[:MAX_OMITTED]


class _Detached(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The summary's bytes beside a decision token."""

    hwid: Annotated[str, msgspec.Meta(max_length=MAX_HWID)] = ""
    claims: Annotated[dict[str, Any], msgspec.Meta(max_length=MAX_CLAIMS)] = {}
    claims_omitted: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=MAX_NAME)]],
        msgspec.Meta(max_length=MAX_OMITTED),
    ] = []


_decoder = msgspec.json.Decoder(_Detached)


def encode(claims: dict[str, Any], hwid: str) -> bytes:
    """The ``appraisal`` bytes of an allow decision (at most :data:`MAX_SUMMARY_BYTES`)."""
    kept, omitted = bound_claims(claims)
    raw = msgspec.json.encode(_Detached(hwid=hwid[:MAX_HWID], claims=kept, claims_omitted=omitted))
    assert len(raw) <= MAX_SUMMARY_BYTES, "bounded by MAX_CLAIMS_BYTES and the other maxima"
    return raw


def digest(raw: bytes) -> str:
    """What the decision token signs of the ``appraisal`` bytes."""
    return hashlib.sha256(raw).hexdigest()


def matches(raw: bytes, signed: str) -> bool:
    """Whether ``raw`` are the bytes whose digest the token signed (constant time)."""
    return hmac.compare_digest(digest(raw), signed)


def decode(raw: bytes, *, family: str, status: str) -> AppraisalSummary:
    """The summary of a decision whose signed digest ``raw`` matched; ``family`` and
    ``status`` come from the token. ``ValueError`` if the bytes are malformed (they were
    signed, so only a broken policy service could make them so)."""
    if len(raw) > MAX_SUMMARY_BYTES:
        raise ValueError("appraisal too large")
    try:
        detached = _decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ValueError(str(exc)[:200]) from None
    return AppraisalSummary(
        family, status, detached.hwid, detached.claims, tuple(detached.claims_omitted)
    )
