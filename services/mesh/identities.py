"""The NATS identity model (DESIGN.md §5): who may publish and subscribe to what.

This module is the one source of truth for every identity's permissions. ``attestmesh up``
writes its nats-server configuration from it (:mod:`services.mesh.authconf`) and the Helm
chart's ``_nats_permissions.tpl`` must render exactly the same sets
(``tests/test_deploy_boundary.py`` compares them), so the embedded default and a Kubernetes
release enforce one model.

Identities: ``verifier-<family>``, ``policy``, ``broker``, ``admin`` (the operator: policies,
reference values, collateral, requests to the broker for secret changes, and reading
revocations) and one
``node-<node>`` per TEE node. Everything not allowed here is denied by the server; there is
no anonymous user.

Building blocks:

* a durable pull consumer D on stream S filtered to F: look it up, create it only with that
  filter (the filter is part of the create subject, so a verifier cannot widen it to another
  family), pull from it, and ack its messages;
* a KV bucket B: read (stream info, message get), write (``$KV.B.>``) and watch (an ordered
  consumer with flow control); the broker may also purge its own bucket (audit retention
  leaves no delete marker per pruned record), and only the policy service and the broker
  write ``node-pins``; the policy service and the broker read and watch ``policies`` (the
  appraisal and the resource policy), which only the admin writes; nobody but the admin
  creates streams, and nobody may update one, so no identity can clear pins or the audit
  log by shortening a bucket's retention;
* replies: every identity receives replies only below its own inbox prefix
  (:func:`subjects.inbox`, :func:`subjects.node_inbox`); responders (policy, broker) answer
  through ``allow_responses``, which admits one reply per request received.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from services.mesh import subjects
from services.mesh.errors import ConfigError

STREAM_NAMES = (
    subjects.STREAM_EVIDENCE,
    subjects.STREAM_VERDICTS,
    subjects.STREAM_DECISIONS,
    subjects.STREAM_DLQ,
    *(
        f"KV_{b}"
        for b in (
            subjects.BUCKET_NONCES,
            subjects.BUCKET_REFVALUES,
            subjects.BUCKET_POLICIES,
            subjects.BUCKET_COLLATERAL,
            subjects.BUCKET_BROKER,
            subjects.BUCKET_PINS,
            subjects.BUCKET_APPRAISALS,
        )
    ),
)
SERVICES = ("policy", "broker")
BROKER = "broker"
ADMIN = "admin"
NODE_PREFIX = "node-"
ADMIN_BROKER_KEYS = ("keyring",)
"""The one sealed record the admin writes directly: the keyring, re-wrapped by recovery (a
wrong key is refused before it is written). Secrets change through the broker."""
"""The ``broker-state`` keys an operator's ``secret`` commands write (``broker/store.py``): the
secret records, their index and keyring. Never the audit log (an operator who could write it
could erase or rewrite the record of its own and the broker's actions), nor the decisions,
release claims or signed checkpoints a broker writes."""
RESPONSES = {"max": 1, "expires": "1m"}
"""What a responder may answer: one reply per request, within a minute."""


@dataclass(frozen=True)
class Permissions:
    """One identity's allow-lists; ``responder`` turns on ``allow_responses``."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    responder: bool = False

    def to_nats(self) -> dict[str, Any]:
        """The ``permissions`` block of a nats-server user entry."""
        out: dict[str, Any] = {
            "publish": {"allow": list(self.publish)},
            "subscribe": {"allow": list(self.subscribe)},
        }
        if self.responder:
            out["allow_responses"] = dict(RESPONSES)
        return out


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def declare(*, update: bool) -> list[str]:
    """Create (and with ``update``, reconfigure) every stream and bucket."""
    out: list[str] = []
    for stream in STREAM_NAMES:
        out.append(f"$JS.API.STREAM.CREATE.{stream}")
        if update:
            out.append(f"$JS.API.STREAM.UPDATE.{stream}")
    return out


def consumer(stream: str, durable: str, filter_subject: str) -> list[str]:
    return [
        f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
        f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.{filter_subject}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
    ]


def kv_read(bucket: str) -> list[str]:
    return [f"$JS.API.STREAM.INFO.KV_{bucket}", f"$JS.API.STREAM.MSG.GET.KV_{bucket}"]


def kv_write(bucket: str) -> list[str]:
    return [f"$KV.{bucket}.>"]


def kv_watch(bucket: str) -> list[str]:
    return [
        f"$JS.API.CONSUMER.CREATE.KV_{bucket}",
        f"$JS.API.CONSUMER.INFO.KV_{bucket}.*",
        f"$JS.FC.KV_{bucket}.>",
    ]


def _inbox(prefix: str) -> str:
    return f"{prefix}.>"


def verifier(family: str, *, declare_streams: bool = True) -> Permissions:
    identity = f"verifier-{subjects.token(family)}"
    bucket = subjects.BUCKET_COLLATERAL
    return Permissions(
        publish=_unique(
            [
                *(declare(update=False) if declare_streams else []),
                *consumer(subjects.STREAM_EVIDENCE, identity, subjects.evidence_family(family)),
                *kv_read(bucket),
                *kv_write(bucket),
                *kv_watch(bucket),
                f"attest.verdict.{family}.*",
                subjects.dlq(subjects.STREAM_EVIDENCE),
            ]
        ),
        subscribe=(_inbox(subjects.inbox(identity)),),
    )


def policy(*, declare_streams: bool = True) -> Permissions:
    return Permissions(
        publish=_unique(
            [
                *(declare(update=False) if declare_streams else []),
                *consumer(subjects.STREAM_VERDICTS, "policy", subjects.VERDICT_ALL),
                *kv_read(subjects.BUCKET_NONCES),
                *kv_write(subjects.BUCKET_NONCES),
                *kv_read(subjects.BUCKET_POLICIES),
                *kv_watch(subjects.BUCKET_POLICIES),
                *kv_read(subjects.BUCKET_REFVALUES),
                *kv_watch(subjects.BUCKET_REFVALUES),
                *kv_read(subjects.BUCKET_PINS),
                *kv_write(subjects.BUCKET_PINS),
                *kv_read(subjects.BUCKET_APPRAISALS),
                *kv_write(subjects.BUCKET_APPRAISALS),
                "attest.decision.*",
                subjects.dlq(subjects.STREAM_VERDICTS),
                *(
                    f"$JS.API.CONSUMER.LIST.{stream}"
                    for stream in (
                        subjects.STREAM_EVIDENCE,
                        subjects.STREAM_VERDICTS,
                        subjects.STREAM_DECISIONS,
                    )
                ),
            ]
        ),
        subscribe=(
            _inbox(subjects.inbox("policy")),
            f"{subjects.NONCE_ALL} policy",
            subjects.LOAD_ALL,
        ),
        responder=True,
    )


def broker(*, declare_streams: bool = True) -> Permissions:
    bucket = subjects.BUCKET_BROKER
    return Permissions(
        publish=_unique(
            [
                *(declare(update=False) if declare_streams else []),
                *consumer(subjects.STREAM_DECISIONS, "broker", subjects.DECISION_ALL),
                *kv_read(bucket),
                *kv_write(bucket),
                *kv_watch(bucket),
                *kv_read(subjects.BUCKET_PINS),
                *kv_write(subjects.BUCKET_PINS),
                *kv_read(subjects.BUCKET_POLICIES),
                *kv_watch(subjects.BUCKET_POLICIES),
                f"$JS.API.STREAM.PURGE.KV_{bucket}",
                "attest.revoked.*",
                subjects.load("broker"),
                subjects.dlq(subjects.STREAM_DECISIONS),
            ]
        ),
        subscribe=(
            _inbox(subjects.inbox("broker")),
            f"{subjects.SECRET_ALL} broker",
            f"{subjects.OPERATOR_ALL} broker",
        ),
        responder=True,
    )


def admin() -> Permissions:
    """The operator: manage policies, reference values, collateral and secrets, see whether the
    services' consumers exist, and watch revocations, verdicts and decisions (which stage of a
    round did not answer; none of them carries a secret).

    Not more: no stream *update* (shortening a bucket's max age would expire every hardware
    pin, or the audit log, with no record; reconfiguring streams is an out-of-band step with
    the server's own credentials), and in ``broker-state`` only :data:`ADMIN_BROKER_KEYS`,
    never the decisions or release claims a broker writes (putting back a revoked node's
    older allow would re-admit it), its signed checkpoints, or the secrets and their index:
    secret changes are signed requests on ``attest.operator.*`` that the broker audits
    before applying (:mod:`services.broker.operator`).
    """
    buckets = [
        (subjects.BUCKET_COLLATERAL, False),
        (subjects.BUCKET_REFVALUES, True),
        (subjects.BUCKET_POLICIES, True),
    ]
    publish = declare(update=False)
    for bucket, watch in buckets:
        publish += kv_read(bucket) + kv_write(bucket) + (kv_watch(bucket) if watch else [])
    broker_state = subjects.BUCKET_BROKER
    publish += kv_read(broker_state) + kv_watch(broker_state)
    publish += [f"$KV.{broker_state}.{key}" for key in ADMIN_BROKER_KEYS]
    publish.append(subjects.OPERATOR_ALL)
    publish += [
        f"$JS.API.CONSUMER.INFO.{stream}.*"
        for stream in (
            subjects.STREAM_EVIDENCE,
            subjects.STREAM_VERDICTS,
            subjects.STREAM_DECISIONS,
        )
    ]
    return Permissions(
        publish=_unique(publish),
        subscribe=(
            _inbox(subjects.inbox(ADMIN)),
            "attest.revoked.*",
            subjects.VERDICT_ALL,
            subjects.DECISION_ALL,
        ),
    )


def node(name: str) -> Permissions:
    """A TEE node: its own nonce, evidence and secret; its own decisions and revocations; no
    JetStream API and no bucket at all."""
    subjects.token(name)
    return Permissions(
        publish=(
            subjects.nonce(name),
            f"attest.evidence.*.{name}",
            subjects.secret(name),
        ),
        subscribe=(
            _inbox(subjects.node_inbox(name)),
            subjects.decision(name),
            subjects.revoked(name),
        ),
    )


def node_identity(name: str) -> str:
    return NODE_PREFIX + subjects.token(name)


def permissions(identity: str, *, declare_streams: bool = True) -> Permissions:
    """The permissions of ``identity`` (one of the names above)."""
    if identity.startswith("verifier-"):
        return verifier(identity.removeprefix("verifier-"), declare_streams=declare_streams)
    if identity == "policy":
        return policy(declare_streams=declare_streams)
    if identity == "broker":
        return broker(declare_streams=declare_streams)
    if identity == ADMIN:
        return admin()
    if identity.startswith(NODE_PREFIX):
        return node(identity.removeprefix(NODE_PREFIX))
    raise ConfigError("identity.unknown", f"no NATS permissions for identity {identity!r}")


def service_identities(families: Iterable[str]) -> list[str]:
    """The service identities of a mesh running ``families``' verifiers."""
    return [*(f"verifier-{subjects.token(f)}" for f in families), *SERVICES]
