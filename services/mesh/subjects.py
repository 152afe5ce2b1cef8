"""The subject map (DESIGN.md §1): the one place subject strings are spelled."""

from __future__ import annotations

import re

from services.mesh.errors import ConfigError

NONCE_ALL = "attest.nonce.*"
EVIDENCE_ALL = "attest.evidence.>"
VERDICT_ALL = "attest.verdict.>"
DECISION_ALL = "attest.decision.>"
REVOKED_ALL = "attest.revoked.>"
DLQ_ALL = "attest.dlq.>"

STREAM_EVIDENCE = "EVIDENCE"
STREAM_VERDICTS = "VERDICTS"
STREAM_DECISIONS = "DECISIONS"
STREAM_DLQ = "DLQ"

BUCKET_NONCES = "nonces"
BUCKET_REFVALUES = "refvalues"
BUCKET_POLICIES = "policies"
BUCKET_COLLATERAL = "collateral"
BUCKET_BROKER = "broker-state"
BUCKET_PINS = "node-pins"
BUCKET_APPRAISALS = "appraisals"
"""Node -> the verdict behind its current allow decision, re-evaluated when rules change."""

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def token(value: str) -> str:
    """Check that ``value`` is safe as one subject token (no dots, wildcards or spaces)."""
    if not _TOKEN.match(value):
        raise ConfigError("subject.bad_token", f"{value!r} is not a valid subject token")
    return value


def nonce(node: str) -> str:
    """Per node, so a node's NATS identity can be allowed to ask only for its own nonces."""
    return f"attest.nonce.{token(node)}"


def evidence(family: str, node: str) -> str:
    return f"attest.evidence.{token(family)}.{token(node)}"


def evidence_family(family: str) -> str:
    return f"attest.evidence.{token(family)}.*"


def verdict(family: str, node: str) -> str:
    return f"attest.verdict.{token(family)}.{token(node)}"


def decision(node: str) -> str:
    return f"attest.decision.{token(node)}"


def revoked(node: str) -> str:
    return f"attest.revoked.{token(node)}"


def secret(node: str) -> str:
    return f"attest.secret.{token(node)}"


SECRET_ALL = "attest.secret.*"  # noqa: S105 - a subject, not a password
OPERATOR_ALL = "attest.operator.*"
"""Operator requests the broker answers (its intake key, secret changes): only the admin
identity may publish here, and the broker also checks the operator's signature."""


def operator(action: str) -> str:
    return f"attest.operator.{token(action)}"


def inbox(identity: str) -> str:
    """The reply-inbox prefix of a service or operator identity (its private ``_INBOX``)."""
    return f"_INBOX_{token(identity)}"


def node_inbox(node: str) -> str:
    """A node's reply-inbox prefix: only that node may subscribe below it, so the nonces and
    wrapped secrets answered to it cannot be read by other nodes or by the services."""
    return f"_INBOX_node_{token(node)}"


LOAD_ALL = "attest.load.*"


def load(service: str) -> str:
    return f"attest.load.{token(service)}"


def dlq(stream: str) -> str:
    return f"attest.dlq.{token(stream)}"


def node_of(subject: str) -> str:
    """The node token of a per-node subject (always the last token)."""
    return subject.rsplit(".", 1)[-1]
