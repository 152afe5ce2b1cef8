"""Confidential Containers' TDX JSON evidence: real quotes, the CCEL inside, attacks, the planner.

Real quotes are wrapped into the agent's JSON here and must verify exactly as the raw quote
does; the CCEL log area the document carries is replayed against the quoted RTMRs.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest

from services.cli import main
from services.mesh import events
from services.mesh.bus import Bus
from services.mesh.errors import ParseError
from services.mesh.keys import SigningKey
from services.testing.intel_pki import TdFields, td_quote
from services.testing.vectors import Vector, iter_vectors, roots_dir, vectors_root
from services.verifier.families.base import Appraisal, Status, VerifyOptions
from services.verifier.families.dcap import pcsfetch
from services.verifier.families.dcap.ccel import CCEL_FILE
from services.verifier.families.dcap.coco import parse_tdx_document, to_tdx_document
from services.verifier.families.tdx import TdxVerifier
from services.verifier.trust import TrustStore
from services.verifier.worker import VerifierWorker, expected_report_data
from tests.test_tdx_ccel import NOW, PLATFORM, TDX_COLLATERAL, TRUST, boot_log

MALFORMED = "tdx.evidence_malformed"
needs_vectors = pytest.mark.skipif(
    vectors_root() is None or roots_dir() is None,
    reason="shared vectors not found: set ATTESTMESH_VECTORS or provide ../shared/vectors",
)
VECTORS = list(iter_vectors("tdx")) if vectors_root() is not None else []


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def _vector_options(vector: Vector, store: TrustStore) -> VerifyOptions:
    return VerifyOptions(now=vector.at, trust=store, collateral=vector.collateral)


@needs_vectors
@pytest.mark.vectors
@pytest.mark.parametrize("vector", VECTORS, ids=[v.id for v in VECTORS])
def test_real_quote_as_coco_json_verifies_like_the_raw_quote(
    vector: Vector, store: TrustStore
) -> None:
    options = _vector_options(vector, store)
    raw = TdxVerifier().appraise(vector.evidence, options)
    coco = TdxVerifier().appraise(_json(to_tdx_document(vector.evidence)), options)
    assert coco.status is raw.status is Status(vector.expect["status"])
    assert coco.verified is raw.verified
    assert coco.claims == raw.claims
    assert [r.code for r in coco.reasons] == [r.code for r in raw.reasons]
    assert coco.checks[0].name == "evidence_form" and coco.checks[1:] == raw.checks


@needs_vectors
@pytest.mark.vectors
def test_real_quote_changed_inside_the_json_is_contraindicated(store: TrustStore) -> None:
    (vector,) = [v for v in VECTORS if v.id == "tdx-dcaprs-00806f050000"]
    quote = bytearray(vector.evidence)
    quote[0x30 + 136] ^= 1  # a byte of MRTD in the TD report body
    coco = TdxVerifier().appraise(
        _json(to_tdx_document(bytes(quote))), _vector_options(vector, store)
    )
    assert coco.status is Status.CONTRAINDICATED and not coco.verified


@needs_vectors
def test_cli_verifies_a_coco_tdx_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (vector,) = [v for v in VECTORS if v.id == "tdx-dcaprs-00806f050000"]
    path = tmp_path / "evidence.json"
    path.write_bytes(_json(to_tdx_document(vector.evidence)))
    args = ["verify", str(path), "--family", "tdx", "--roots", str(roots_dir())]
    args += ["--collateral", str(vector.dir / "collateral"), "--at", vector.meta["at"]]
    assert main([*args, "--offline", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == vector.expect["status"] == "warning"
    assert out["claims"]["tcb_status"] == vector.expect["tcb_status"]


# --- the CCEL inside the document, with the Intel test PKI ---------------------------------------


def _appraise(data: bytes, collateral: dict[str, bytes] | None = None) -> Appraisal:
    options = VerifyOptions(now=NOW, trust=TRUST, collateral=collateral or dict(TDX_COLLATERAL))
    return TdxVerifier().appraise(data, options)


def test_ccel_in_the_document_is_replayed() -> None:
    log = boot_log()
    quote = td_quote(PLATFORM, TdFields(rtmrs=log.rtmrs()))
    appraisal = _appraise(_json(to_tdx_document(quote, log.encode(fill=4096))))
    assert appraisal.status is Status.AFFIRMING and appraisal.verified, appraisal.reasons
    assert appraisal.claims["ccel_verified"] is True
    assert len(appraisal.claims["ccel_events"]) == 6
    assert "CCEL log area" in appraisal.checks[0].detail


def test_ccel_in_the_document_overrides_a_collateral_file_and_must_match() -> None:
    log = boot_log()
    quote = td_quote(PLATFORM, TdFields(rtmrs=log.rtmrs()))
    other = boot_log().measure(3, 0x80000007, b"an event the quote never saw")
    collateral = {**TDX_COLLATERAL, CCEL_FILE: log.encode()}
    appraisal = _appraise(_json(to_tdx_document(quote, other.encode())), collateral)
    assert appraisal.status is Status.CONTRAINDICATED
    assert [r.code for r in appraisal.reasons] == ["tdx.ccel_rtmr_mismatch"]


def test_without_ccel_nothing_is_replayed_and_empty_means_none() -> None:
    quote = td_quote(PLATFORM, TdFields())
    for document in (
        {"quote": base64.b64encode(quote).decode()},
        {"quote": base64.b64encode(quote).decode(), "cc_eventlog": ""},
        {"quote": base64.b64encode(quote).decode(), "cc_eventlog": None},
    ):
        appraisal = _appraise(_json(document))
        assert appraisal.status is Status.AFFIRMING, appraisal.reasons
        assert "ccel_verified" not in appraisal.claims
        assert not [c for c in appraisal.checks if c.name == "ccel_replay"]


def test_aa_eventlog_is_accepted_but_never_a_claim() -> None:
    quote = td_quote(PLATFORM, TdFields())
    document = {**to_tdx_document(quote), "aa_eventlog": "INIT sha384/0000\nevil claim\n"}
    appraisal = _appraise(_json(document))
    assert appraisal.status is Status.AFFIRMING
    assert "neither replayed nor claimed" in appraisal.checks[0].detail
    assert "evil claim" not in json.dumps(appraisal.to_json()["claims"])


GOOD = base64.b64encode(b"quote").decode()
MALFORMED_DOCUMENTS = [
    ("unknown field", {"quote": GOOD, "tdx_eventlog": GOOD}),
    ("missing quote", {"cc_eventlog": GOOD}),
    ("empty quote", {"quote": ""}),
    ("quote not base64", {"quote": "!!!!"}),
    ("quote unpadded", {"quote": "YWJjZA"}),
    ("quote url-safe", {"quote": "-_-_"}),
    ("quote as bytes array", {"quote": [1, 2, 3]}),
    ("eventlog not base64", {"quote": GOOD, "cc_eventlog": "%%%%"}),
    ("eventlog as number", {"quote": GOOD, "cc_eventlog": 7}),
    ("aa_eventlog as object", {"quote": GOOD, "aa_eventlog": {}}),
    ("huge number", {"quote": GOOD, "aa_eventlog": 10**300}),
]


@pytest.mark.parametrize(
    "document", [d for _, d in MALFORMED_DOCUMENTS], ids=[n for n, _ in MALFORMED_DOCUMENTS]
)
def test_malformed_documents_are_refused(document: dict[str, Any]) -> None:
    with pytest.raises(ParseError) as caught:
        parse_tdx_document(_json(document))
    assert caught.value.reason == MALFORMED
    appraisal = _appraise(_json(document))
    assert appraisal.status is Status.CONTRAINDICATED and not appraisal.verified
    assert [r.code for r in appraisal.reasons] == [MALFORMED]


@pytest.mark.parametrize(
    "data",
    [
        b'{"quote": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"quote":' * 5000 + b'"x"' + b"}" * 5000,
        b'{"quote": "eA==", "quote": "eA=="}',
        b'{"quote": "eA==", "x": 1e999}',
        b'{"quote": "eA==",',
    ],
    ids=["deep-arrays", "deep-objects", "duplicate-key", "float", "truncated"],
)
def test_hostile_json_is_refused_without_crashing(data: bytes) -> None:
    with pytest.raises(ParseError) as caught:
        parse_tdx_document(data)
    assert caught.value.reason == MALFORMED
    assert _appraise(data).status is Status.CONTRAINDICATED


def test_oversized_document_is_refused() -> None:
    data = b'{"quote": "' + b"A" * (3 * 1024 * 1024) + b'"}'
    with pytest.raises(ParseError) as caught:
        parse_tdx_document(data)
    assert "exceeds" in caught.value.detail


def test_pcs_planner_reads_the_quote_inside_the_document() -> None:
    quote = td_quote(PLATFORM, TdFields())
    document = _json(to_tdx_document(quote))
    planned = pcsfetch.requests_for(document, {})
    assert planned and planned == pcsfetch.requests_for(quote, {})
    assert pcsfetch.requests_for(b'{"quote": "!"}', {}) == []


def test_worker_appraises_a_coco_document_carried_in_the_quote_field() -> None:
    """The wire carries the JSON in ``TdxEvidence.quote``; the worker hands it over unchanged
    and checks its REPORT_DATA binding like a raw quote's."""
    log = boot_log()
    nonce, key = b"n" * 32, b"k" * 32
    quote = td_quote(
        PLATFORM, TdFields(rtmrs=log.rtmrs(), report_data=expected_report_data(nonce, key))
    )
    evidence = events.TdxEvidence(quote=_json(to_tdx_document(quote, log.encode())))
    event = events.EvidenceEvent(node="td-1", nonce=nonce, public_key=key, evidence=evidence)
    decoded = events.decode(events.encode(event), events.EvidenceEvent)
    worker = VerifierWorker(
        cast(Bus, None),
        "tdx",
        TdxVerifier(),
        SigningKey.generate("verifier-tdx"),
        TRUST,
        collateral=TDX_COLLATERAL,
        clock=lambda: NOW,
    )
    appraisal = worker.appraise(decoded, "td-1")
    assert appraisal.status is Status.AFFIRMING, appraisal.reasons
    assert appraisal.claims["ccel_verified"] is True
    unbound = msgspec.structs.replace(decoded, nonce=b"m" * 32)
    assert "tdx.report_data_mismatch" in [r.code for r in worker.appraise(unbound, "td-1").reasons]
