"""The wire contract: round trips, strictness and versioning."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.mesh import events
from services.mesh.errors import ParseError


def _evidence_event(**overrides: object) -> events.EvidenceEvent:
    fields: dict[str, object] = {
        "node": "node-1",
        "nonce": b"n" * 32,
        "public_key": b"k" * 32,
        "evidence": events.SnpEvidence(report=b"r" * 1184, certificates=b"c" * 10),
    }
    fields.update(overrides)
    return events.EvidenceEvent(**fields)  # type: ignore[arg-type]


def test_evidence_event_round_trip_keeps_the_family_tag() -> None:
    event = _evidence_event()
    raw = events.encode(event)
    assert json.loads(raw)["evidence"]["family"] == "snp"
    decoded = events.decode(raw, events.EvidenceEvent)
    assert decoded == event
    assert events.family_of(decoded.evidence) == "snp"
    assert events.evidence_bytes(decoded.evidence) == b"r" * 1184 + b"c" * 10


@pytest.mark.parametrize(
    "evidence",
    [
        events.TdxEvidence(quote=b"q"),
        events.SgxEvidence(quote=b"q"),
        events.NitroEvidence(document=b"d"),
        events.TpmEvidence(document=b"{}"),
        events.AzSnpVtpmEvidence(document=b"{}"),
        events.AzTdxVtpmEvidence(document=b"{}"),
        events.CcaEvidence(token=b"t"),
    ],
)
def test_every_family_round_trips(evidence: events.Evidence) -> None:
    decoded = events.decode(events.encode(_evidence_event(evidence=evidence)), events.EvidenceEvent)
    assert type(decoded.evidence) is type(evidence)
    assert events.evidence_bytes(decoded.evidence) == events.evidence_bytes(evidence)


def test_unknown_field_is_rejected() -> None:
    raw = json.loads(events.encode(events.NonceRequest(node="n1")))
    raw["extra"] = 1
    with pytest.raises(ParseError) as err:
        events.decode(json.dumps(raw).encode(), events.NonceRequest)
    assert err.value.reason == "wire.invalid"


def test_unknown_family_is_rejected() -> None:
    raw = json.loads(events.encode(_evidence_event()))
    raw["evidence"]["family"] = "quantum"
    with pytest.raises(ParseError, match="wire.invalid"):
        events.decode(json.dumps(raw).encode(), events.EvidenceEvent)


def test_other_schema_version_is_rejected() -> None:
    raw = json.loads(events.encode(events.NonceRequest(node="n1")))
    raw["schema_version"] = 2
    with pytest.raises(ParseError) as err:
        events.decode(json.dumps(raw).encode(), events.NonceRequest)
    assert err.value.reason == "wire.schema_version"


@pytest.mark.parametrize("node", ["", "a.b", "a*", "x" * 65, "spa ce", "n>"])
def test_node_ids_must_be_single_subject_tokens(node: str) -> None:
    raw = json.loads(events.encode(events.NonceRequest(node="ok")))
    raw["node"] = node
    with pytest.raises(ParseError):
        events.decode(json.dumps(raw).encode(), events.NonceRequest)


def test_sizes_are_bounded() -> None:
    with pytest.raises(ParseError, match="wire.too_large"):
        events.decode(b" " * (events.MAX_MESSAGE_BYTES + 1), events.NonceRequest)
    raw = json.loads(events.encode(_evidence_event()))
    raw["public_key"] = msgspec.json.decode(msgspec.json.encode(b"k" * 33))
    with pytest.raises(ParseError):
        events.decode(json.dumps(raw).encode(), events.EvidenceEvent)


@given(st.binary(max_size=512))
def test_decoding_garbage_only_raises_parse_error(data: bytes) -> None:
    for kind in (events.EvidenceEvent, events.Verdict, events.Decision, events.SecretRequest):
        with pytest.raises(ParseError):
            events.decode(data, kind)
