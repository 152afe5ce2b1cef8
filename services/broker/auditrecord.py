"""One audit record: its schema, its key in the broker bucket, and the bounds on its fields.

:mod:`services.broker.audit` chains, seals and keeps these records; this module only says
what one is. Records are sealed as msgpack of :class:`AuditRecord`, so the schema evolves as
msgspec Structs do: new fields get defaults, types never change.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime

import msgspec

from services.mesh.errors import SealingError

AUDIT_PREFIX = "audit."
SEQ_DIGITS = 12
MAX_FIELD = 253
MAX_COUNTS = 64
MAX_REASONS = 16
GENESIS = bytes(32)
SUMMARY_REASON = "broker.refusals_counted"
SEQ_KEY = re.compile(r"audit\.([0-9]{12})")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_REASON = re.compile(r"[a-z0-9_]+(?:\.[a-z0-9_]+)*")


class Outcome(enum.StrEnum):
    """What the broker did with a secret request (``summary``: counted refusals)."""

    RELEASED = "released"
    REFUSED = "refused"
    PIN_RESET = "pin_reset"
    """An operator released a node's hardware pin (``attestmesh node reset``)."""
    SUMMARY = "summary"
    SECRET_PUT = "secret_put"  # noqa: S105 - an outcome name, not a credential
    """An operator stored a secret (``attestmesh secret put``): ``actor`` says who."""
    SECRET_DELETED = "secret_deleted"  # noqa: S105 - an outcome name
    """An operator deleted a secret (``attestmesh secret delete``)."""
    REVOKED = "revoked"
    """The broker recorded a deny decision and revoked the node (``attest.revoked.<node>``);
    ``reasons`` holds the reasons the policy signed into the decision."""


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One release decision; ``prev`` is the SHA-256 of the previous sealed record.

    ``counts`` is set only on ``summary`` records: refusals per reason since the last one.
    ``actor`` names who made an operator change (the NATS identity and its public nkey);
    empty on the broker's own records. ``reasons`` is set only on ``revoked`` records: the
    policy's reasons for the deny, as it signed them (rule texts as well as codes).
    """

    seq: int
    time: datetime
    node: str
    resource: str
    decision_id: str
    verdict_digest: str
    outcome: Outcome
    reason: str = ""
    trace_id: str = ""
    prev: bytes
    counts: dict[str, int] = {}
    actor: str = ""
    reasons: list[str] = []


def audit_key(seq: int) -> str:
    """The KV key of record ``seq``; zero padding keeps lexical and numeric order equal."""
    return f"{AUDIT_PREFIX}{seq:0{SEQ_DIGITS}d}"


def check_fields(
    *,
    node: str,
    resource: str,
    decision_id: str,
    verdict_digest: str,
    reason: str,
    trace_id: str,
    counts: dict[str, int],
    actor: str = "",
    reasons: list[str] | None = None,
) -> None:
    """Raise ``broker.audit_field_invalid`` naming every field out of bounds, before any
    record is sealed: the fields come from requests, operators and policies."""
    problems = [
        label
        for label, value in (("node", node), ("resource", resource), ("decision_id", decision_id))
        if not 0 < len(value) <= MAX_FIELD or not value.isprintable()
    ]
    if len(actor) > MAX_FIELD or not actor.isprintable():
        problems.append("actor")
    if _HEX64.fullmatch(verdict_digest) is None:
        problems.append("verdict_digest (64 lowercase hex)")
    if reason and (len(reason) > MAX_FIELD or _REASON.fullmatch(reason) is None):
        problems.append("reason (dotted code)")
    if trace_id and _TRACE_ID.fullmatch(trace_id) is None:
        problems.append("trace_id (32 lowercase hex)")
    if len(counts) > MAX_COUNTS or any(
        len(code) > MAX_FIELD or _REASON.fullmatch(code) is None or number < 1
        for code, number in counts.items()
    ):
        problems.append(f"counts (at most {MAX_COUNTS} dotted codes, positive)")
    if reasons and (
        len(reasons) > MAX_REASONS
        or any(not 0 < len(text) <= MAX_FIELD or not text.isprintable() for text in reasons)
    ):
        problems.append(f"reasons (at most {MAX_REASONS}, each 1..{MAX_FIELD} printable)")
    if problems:
        raise SealingError("broker.audit_field_invalid", ", ".join(problems))
