"""The wire contract: every message that crosses the bus, as versioned msgspec Structs.

Evolution rules: a new field always gets a default; a field's type never changes; removing
or retyping a field means a new ``SCHEMA_VERSION``. Decoders reject unknown fields and
messages whose ``schema_version`` they do not speak, so a mismatch fails loudly at the edge
instead of deep inside a service. Byte fields travel base64-encoded in JSON.

Evidence is a tagged union keyed by ``family``; a verdict and a decision carry a signed JWT
(the EAR and the release decision) and a few unsigned routing fields. Consumers act only on
the signed content; the routing fields let them drop messages early.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal, TypeVar

import msgspec

from services.mesh.boundedjson import check_depth
from services.mesh.errors import ParseError

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_DETAIL = 1024
MAX_APPRAISAL_BYTES = 16 * 1024

NodeId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
ResourceName = Annotated[
    str,
    msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}/(?:[A-Za-z0-9_.-]{1,64}/)?[A-Za-z0-9_.-]{1,128}$"),
]
"""``<repository>/<type>/<tag>`` as Confidential Containers' key broker names resources (the
operator's commands write only these), or the earlier ``<namespace>/<name>``, still read."""
FamilyName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9-]{0,32}$")]
Nonce = Annotated[bytes, msgspec.Meta(min_length=16, max_length=64)]
PublicKey = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Blob = Annotated[bytes, msgspec.Meta(max_length=512 * 1024)]
Jws = Annotated[str, msgspec.Meta(max_length=256 * 1024)]
StatusName = Literal["affirming", "warning", "contraindicated", "none"]


def new_id() -> str:
    """A random message id: also the JetStream ``Nats-Msg-Id`` de-duplication key."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Fields every message has."""

    schema_version: int = SCHEMA_VERSION
    id: str = msgspec.field(default_factory=new_id)


class _Evidence(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="family"
):
    """Base of the evidence union; the tag is the family name."""


class SnpEvidence(_Evidence, frozen=True, tag="snp"):
    """A raw 1184-byte ATTESTATION_REPORT plus the extended-report certificate table, or in
    ``report`` alone Confidential Containers' JSON document (report and ``cert_chain``); the
    verifier tells the two apart by content (JSON starts with ``{``, a report never does)."""

    report: Blob
    certificates: Blob | None = None


class TdxEvidence(_Evidence, frozen=True, tag="tdx"):
    """A raw DCAP TDX quote (v4 or v5), and the firmware's CCEL event log when the node has it;
    or in ``quote`` Confidential Containers' JSON document (base64 quote and CCEL), told apart
    by content. A CCEL inside the document takes precedence over ``event_log``."""

    quote: Blob
    event_log: Blob | None = None


class SgxEvidence(_Evidence, frozen=True, tag="sgx"):
    """A raw DCAP SGX quote (v3)."""

    quote: Blob


class NitroEvidence(_Evidence, frozen=True, tag="nitro"):
    """An untagged COSE_Sign1 attestation document from the Nitro Secure Module."""

    document: Blob


class TpmEvidence(_Evidence, frozen=True, tag="tpm"):
    """TPM quote evidence in the JSON shape Confidential Containers' agent emits."""

    document: Blob


class AzSnpVtpmEvidence(_Evidence, frozen=True, tag="az-snp-vtpm"):
    """Azure CVM evidence: HCL report with embedded SNP report, vTPM quote, VCEK."""

    document: Blob


class AzTdxVtpmEvidence(_Evidence, frozen=True, tag="az-tdx-vtpm"):
    """Azure CVM evidence: HCL report with embedded TD report, vTPM quote, TD quote."""

    document: Blob


class CcaEvidence(_Evidence, frozen=True, tag="cca"):
    """An Arm CCA attestation token (CBOR tag 399)."""

    token: Blob


Evidence = (
    SnpEvidence
    | TdxEvidence
    | SgxEvidence
    | NitroEvidence
    | TpmEvidence
    | AzSnpVtpmEvidence
    | AzTdxVtpmEvidence
    | CcaEvidence
)


def family_of(evidence: Evidence) -> str:
    """The union tag of ``evidence`` (``snp``, ``tdx``...)."""
    tag = type(evidence).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def evidence_bytes(evidence: Evidence) -> bytes:
    """The raw bytes a family verifier takes (SNP: the report, then its certificate table)."""
    match evidence:
        case SnpEvidence(report=b, certificates=certs):
            return b + (certs or b"")
        case TdxEvidence(quote=b) | SgxEvidence(quote=b):
            return b
        case CcaEvidence(token=b):
            return b
        case NitroEvidence(document=b) | TpmEvidence(document=b):
            return b
        case AzSnpVtpmEvidence(document=b) | AzTdxVtpmEvidence(document=b):
            return b
    raise ParseError("wire.unknown_family", type(evidence).__name__)


class NonceRequest(Message, frozen=True, kw_only=True):
    """attest.nonce.<node> request: a node asks for a fresh challenge."""

    node: NodeId
    family: FamilyName = ""
    """The evidence family the node will send: the policy admits the round only while
    that family's verifiers are not backed up (:mod:`services.policy.admission`)."""


class NonceChallenge(Message, frozen=True, kw_only=True):
    """attest.nonce.<node> reply: the challenge the node must bind into its evidence."""

    node: NodeId
    nonce: Nonce
    expires_at: datetime


class EvidenceEvent(Message, frozen=True, kw_only=True):
    """attest.evidence.<family>.<node>: evidence bound to ``nonce`` and ``public_key``."""

    node: NodeId
    nonce: Nonce
    public_key: PublicKey
    evidence: Evidence
    collected_at: datetime = msgspec.field(default_factory=utcnow)
    simulated: bool = False


class Verdict(Message, frozen=True, kw_only=True):
    """attest.verdict.<family>.<node>: the signed EAR (JWT ES256) for one evidence event."""

    node: NodeId
    family: str
    evidence_id: str
    status: StatusName
    ear: Jws


class Decision(Message, frozen=True, kw_only=True):
    """attest.decision.<node>: the policy's signed release decision (JWT ES256)."""

    node: NodeId
    evidence_id: str
    status: StatusName
    allow: bool
    expires_at: datetime
    token: Jws
    refused: bool = False
    """A refusal rather than a decision: the evidence did not prove it is the node, or came
    from other hardware than the node's pinned one. It only tells the waiting collector that
    its round failed; the broker records and revokes nothing (the signed token says so too)."""
    reason: Annotated[str, msgspec.Meta(max_length=MAX_DETAIL)] = ""
    """For a refusal, why (``evidence.unauthenticated``, ``node.identity_mismatch``)."""
    appraisal: Annotated[bytes, msgspec.Meta(max_length=MAX_APPRAISAL_BYTES)] = b""
    """With an allow, the bounded summary of the appraisal behind it (family and status are
    in the token; this holds hardware id and claims) for the broker's resource policy. Not
    signed itself: the token signs its SHA-256 (``appraisal_sha256``), so a consumer uses it
    only after checking that digest (``services/policy/summary.py``)."""


class Revocation(Message, frozen=True, kw_only=True):
    """attest.revoked.<node>: earlier decisions for the node no longer hold."""

    node: NodeId
    reason: str
    revoked_at: datetime = msgspec.field(default_factory=utcnow)


class LoadReport(Message, frozen=True, kw_only=True):
    """attest.load.<service>: how many requests wait in one replica of a request-serving
    service, and how many it has served so far (the policy's admission reads it; only that
    service's identity may publish on the subject)."""

    replica: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    waiting: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
    served: Annotated[int, msgspec.Meta(ge=0)]


class SecretRequest(Message, frozen=True, kw_only=True):
    """attest.secret.<node> request: release ``resource`` wrapped to ``public_key`` under the
    decision ``decision_id``.

    ``decision_token`` is that decision as the policy signed it, ``decision_appraisal`` the
    appraisal summary beside it (the token signs its digest). Without them the broker
    answers ``broker.decision_pending`` until its own consumer has recorded the decision;
    with them the broker verifies both and records the decision itself if it is the node's
    newest, so the node need not wait for the consumer (``services/broker/presented.py``)."""

    node: NodeId
    resource: ResourceName
    public_key: PublicKey
    decision_id: Annotated[str, msgspec.Meta(pattern=r"^[\x21-\x7e]{0,64}$")]
    evidence_id: Annotated[str, msgspec.Meta(pattern=r"^[\x21-\x7e]{0,64}$")] = ""
    """Printable ASCII (the broker compares them in constant time, which takes only ASCII)."""
    decision_token: Jws = ""
    decision_appraisal: Annotated[bytes, msgspec.Meta(max_length=MAX_APPRAISAL_BYTES)] = b""


class SecretResponse(Message, frozen=True, kw_only=True):
    """attest.secret.<node> reply: either the HPKE-wrapped secret or a refusal reason."""

    node: NodeId
    resource: str
    ok: bool
    reason: str = ""
    enc: bytes = b""
    ciphertext: bytes = b""
    audit_id: str = ""


OperatorAction = Literal["intake", "secret-put", "secret-delete", "secret-list"]


class OperatorRequest(Message, frozen=True, kw_only=True):
    """attest.operator.<action> request, answered by the broker.

    ``token`` is the operator's signed statement of the change (action, resource, the digest
    of ``enc``/``ciphertext``, the secret version it expects to replace, a short expiry); the
    broker acts on it and seals it into the audit log, so every change is attributable to a
    signing key and not merely to whoever held the admin NATS credentials. The token names
    the store generation it was made against: the broker applies it only at that generation,
    so a replayed or reordered request (the generation has moved on) changes nothing. A new
    value travels HPKE-wrapped to the broker's intake key (``intake`` answers with that key,
    signed by the broker)."""

    action: OperatorAction
    token: Jws = ""
    enc: bytes = b""
    ciphertext: Blob = b""


class OperatorResponse(Message, frozen=True, kw_only=True):
    """The broker's answer: ``ok`` or a refusal ``reason``; what the action produced."""

    ok: bool
    reason: str = ""
    intake: Jws = ""
    """For ``intake``: a broker-signed token naming its X25519 intake key."""
    generation: int = 0
    """The secret store's generation (every change advances it): what the next signed
    request must name."""
    version: int = 0
    audit_id: str = ""
    secrets: list[str] = []
    """For ``secret-list``: the names of the live secrets."""


MAX_RETRY_AFTER_MS = 60_000


class Refusal(Message, frozen=True, kw_only=True):
    """A reply saying a request was refused, with the reason code."""

    reason: str
    retry_after_ms: (
        Annotated[int, msgspec.Meta(ge=1, le=MAX_RETRY_AFTER_MS)] | msgspec.UnsetType
    ) = msgspec.UNSET
    """With ``mesh.busy``: when to ask again, about (unset: no hint, the sender backs off
    on its own). A service that knows its admission rate spreads the refused over time.
    Unset, the field is not encoded at all, so a refusal without a hint still reads as
    before to a peer that does not know the field."""


class DeadLetter(Message, frozen=True, kw_only=True):
    """attest.dlq.<stream>: a message a consumer gave up on, kept with the reason."""

    stream: str
    subject: str
    reason: str
    deliveries: int
    payload: bytes
    detail: str = ""
    """The refusal's detail (for unauthenticated evidence: the family's reason codes)."""


T = TypeVar("T", bound=Message)

_decoders: dict[type[Message], msgspec.json.Decoder[Message]] = {}
_encoder = msgspec.json.Encoder()


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes, kind: type[T]) -> T:
    """Decode one message of ``kind``; any malformed input becomes a ``ParseError``."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ParseError("wire.too_large", f"{len(data)} bytes")
    check_depth(data, "wire.malformed")
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        message = decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise ParseError("wire.invalid", f"{kind.__name__}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ParseError("wire.malformed", f"{kind.__name__}: {exc}") from None
    if message.schema_version != SCHEMA_VERSION:
        raise ParseError(
            "wire.schema_version",
            f"{kind.__name__} has schema_version {message.schema_version}, "
            f"this build speaks {SCHEMA_VERSION}",
        )
    assert isinstance(message, kind)
    return message
