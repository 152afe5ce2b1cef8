"""Confidential Containers' SNP JSON evidence: exact re-encoding, real reports, attacks, the bus.

Real reports are turned into the agent's JSON form here (our own renderer) and must verify
exactly as their binary form does; every JSON change either breaks the signature over the
re-encoded bytes or is refused before verification.
"""

from __future__ import annotations

import copy
import functools
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.cli import main
from services.collector.simulator.snp import SnpSimulator
from services.mesh import boundedjson, events
from services.mesh.bus import Bus
from services.mesh.errors import ParseError
from services.mesh.server import NatsServer
from services.testing.amd_pki import AmdTestPki
from services.testing.mesh import TestMesh
from services.testing.vectors import Vector, iter_vectors, roots_dir, vectors_root
from services.verifier.families import jsondoc
from services.verifier.families.base import Appraisal, Status, VerifyOptions
from services.verifier.families.snp import SnpVerifier, kds
from services.verifier.families.snp.certtable import VCEK_GUID, VLEK_GUID, CertTable
from services.verifier.families.snp.coco import (
    MALFORMED,
    parse_coco_evidence,
    to_coco_document,
)
from services.verifier.families.snp.evidence import load_evidence
from services.verifier.families.snp.parse import (
    Product,
    SigningKey,
    SnpEvidence,
    encode_report,
    parse_evidence,
    parse_report,
)
from services.verifier.trust import TrustStore

NOW = datetime(2025, 3, 1, tzinfo=UTC)
NONCE = bytes(range(64))
SEV_FIELD_ORDER = [
    "version", "guest_svn", "policy", "family_id", "image_id", "vmpl", "sig_algo",
    "current_tcb", "plat_info", "key_info", "report_data", "measurement", "host_data",
    "id_key_digest", "author_key_digest", "report_id", "report_id_ma", "reported_tcb",
    "cpuid_fam_id", "cpuid_mod_id", "cpuid_step", "chip_id", "committed_tcb", "current",
    "committed", "launch_tcb", "launch_mit_vector", "current_mit_vector", "signature",
]  # fmt: skip

needs_vectors = pytest.mark.skipif(
    vectors_root() is None or roots_dir() is None,
    reason="shared vectors not found: set ATTESTMESH_VECTORS or provide ../shared/vectors",
)
VECTORS = list(iter_vectors("snp")) if vectors_root() is not None else []


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def _with_vek(vector: Vector) -> SnpEvidence:
    """The vector's evidence with its VEK collateral moved into the certificate table, as the
    agent's ``cert_chain`` would carry it."""
    parsed = parse_evidence(vector.evidence)
    vek = vector.collateral.get("vcek.der")
    guid = VCEK_GUID
    if vek is None:
        vek, guid = vector.collateral["vlek.der"], VLEK_GUID
    return SnpEvidence(parsed.report, CertTable(((guid, vek),)))


def _options(vector: Vector, store: TrustStore, *, with_vek: bool) -> VerifyOptions:
    collateral = {} if not with_vek else vector.collateral
    return VerifyOptions(now=vector.at, trust=store, collateral=collateral)


@needs_vectors
@pytest.mark.vectors
@pytest.mark.parametrize("vector", VECTORS, ids=[v.id for v in VECTORS])
def test_real_report_as_coco_json_verifies_like_the_binary(
    vector: Vector, store: TrustStore
) -> None:
    binary = SnpVerifier().appraise(vector.evidence, _options(vector, store, with_vek=True))
    document = _json(to_coco_document(_with_vek(vector)))
    assert parse_coco_evidence(document).report.raw == vector.evidence
    coco = SnpVerifier().appraise(document, _options(vector, store, with_vek=False))
    assert coco.status is binary.status
    assert coco.status is Status(vector.expect["status"])
    assert coco.verified is binary.verified
    assert coco.claims == binary.claims
    assert [r.code for r in coco.reasons] == [r.code for r in binary.reasons]
    assert coco.trust_vector == binary.trust_vector


@needs_vectors
@pytest.mark.vectors
def test_real_report_json_change_breaks_the_signature(store: TrustStore) -> None:
    (vector,) = [v for v in VECTORS if v.id == "snp-trustee-milan-vlek-v3"]
    document = to_coco_document(_with_vek(vector))
    options = _options(vector, store, with_vek=False)
    assert SnpVerifier().appraise(_json(document), options).status is Status.AFFIRMING
    for path in (("measurement", 0), ("guest_svn",), ("report_data", 63), ("vmpl",)):
        changed = copy.deepcopy(document)
        report = changed["attestation_report"]
        if len(path) == 2:
            report[path[0]][path[1]] ^= 1
        else:
            report[path[0]] ^= 1
        appraisal = SnpVerifier().appraise(_json(changed), options)
        assert appraisal.status is Status.CONTRAINDICATED, path
        assert "snp.report_signature_invalid" in [r.code for r in appraisal.reasons], path


# --- simulated reports: every version and product ----------------------------------------------


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> dict[Product, tuple[AmdTestPki, TrustStore]]:
    out = {}
    for product in Product:
        pki = AmdTestPki(product, now=NOW)
        root = pki.write_trust_dir(tmp_path_factory.mktemp(product.value))
        out[product] = (pki, TrustStore.load(None, test_dir=root))
    return out


CASES = [
    (Product.MILAN, 2, SigningKey.VCEK),
    (Product.MILAN, 3, SigningKey.VLEK),
    (Product.GENOA, 3, SigningKey.VCEK),
    (Product.GENOA, 5, SigningKey.VCEK),
    (Product.TURIN, 3, SigningKey.VCEK),
    (Product.TURIN, 5, SigningKey.VLEK),
]


def _sim_document(
    pkis: dict[Product, tuple[AmdTestPki, TrustStore]],
    product: Product,
    version: int,
    signing_key: SigningKey = SigningKey.VCEK,
) -> tuple[dict[str, Any], TrustStore]:
    pki, store = pkis[product]
    sim = SnpSimulator(pki, signing_key=signing_key, version=version)
    return to_coco_document(parse_evidence(sim.evidence(NONCE))), store


def _appraise(document: dict[str, Any] | bytes, store: TrustStore) -> Appraisal:
    data = document if isinstance(document, bytes) else _json(document)
    options = VerifyOptions(now=NOW, trust=store, expected_report_data=NONCE)
    return SnpVerifier().appraise(data, options)


@pytest.mark.parametrize(("product", "version", "signing_key"), CASES)
def test_reencode_parse_render_is_the_identity(
    pkis: dict[Product, tuple[AmdTestPki, TrustStore]],
    product: Product,
    version: int,
    signing_key: SigningKey,
) -> None:
    document, store = _sim_document(pkis, product, version, signing_key)
    report = document["attestation_report"]
    assert list(report) == SEV_FIELD_ORDER
    assert list(report["launch_tcb"]) == ["fmc", "bootloader", "tee", "snp", "microcode"]
    assert list(report["current"]) == ["major", "minor", "build"]
    assert list(report["signature"]) == ["r", "s"]
    assert [c["cert_type"] for c in document["cert_chain"]] == [signing_key.name, "ASK", "ARK"]
    first = parse_coco_evidence(_json(document))
    assert to_coco_document(first) == document
    again = parse_coco_evidence(_json(to_coco_document(first)))
    assert again.report.raw == first.report.raw == encode_report(parse_report(first.report.raw))
    tcb = document["attestation_report"]["reported_tcb"]
    assert (tcb["fmc"] is not None) is (product is Product.TURIN)
    appraisal = _appraise(document, store)
    assert appraisal.status is Status.AFFIRMING, appraisal.reasons
    assert appraisal.claims["version"] == version
    assert "Confidential Containers JSON" in appraisal.checks[0].detail


def _edit(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(document)
    *parents, last = path.split(".")
    node: Any = changed
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return changed


_DELETE = object()

MALFORMED_EDITS = [
    ("extra top-level field", "evil", 1),
    ("extra report field", "attestation_report.evil", 1),
    ("extra tcb field", "attestation_report.reported_tcb.evil", 1),
    ("missing field", "attestation_report.measurement", _DELETE),
    ("short array", "attestation_report.measurement", [0] * 47),
    ("long array", "attestation_report.signature.r", [0] * 73),
    ("byte above 255", "attestation_report.chip_id.0", 256),
    ("negative byte", "attestation_report.chip_id.0", -1),
    ("huge number", "attestation_report.policy", 1 << 70),
    ("enormous number", "attestation_report.guest_svn", int("9" * 400)),
    ("bool for int", "attestation_report.vmpl", True),
    ("float for int", "attestation_report.vmpl", 0.0),
    ("string for int", "attestation_report.version", "3"),
    ("hex string for bytes", "attestation_report.measurement", "00" * 48),
    ("reserved key_info bits", "attestation_report.key_info", 1 << 5),
    ("reserved signing key", "attestation_report.key_info", 2 << 2),
    ("fmc in a Milan report", "attestation_report.current_tcb.fmc", 1),
    ("cpuid missing in v3", "attestation_report.cpuid_fam_id", None),
    ("mitigation vector in v3", "attestation_report.launch_mit_vector", 0),
    ("unknown version", "attestation_report.version", 6),
    ("unknown cert type", "cert_chain.0.cert_type", "OTHER"),
    ("cert type as object", "cert_chain.0.cert_type", {"OTHER": "00"}),
    ("empty cert", "cert_chain.0.data", []),
    ("duplicate cert kind", "cert_chain.1.cert_type", "VCEK"),
    ("report is a list", "attestation_report", []),
]


@pytest.mark.parametrize(
    ("what", "path", "value"), MALFORMED_EDITS, ids=[e[0] for e in MALFORMED_EDITS]
)
def test_malformed_json_is_refused_with_a_reason(
    pkis: dict[Product, tuple[AmdTestPki, TrustStore]], what: str, path: str, value: Any
) -> None:
    document, store = _sim_document(pkis, Product.MILAN, 3)
    changed = _edit(document, path, value)
    with pytest.raises(ParseError) as caught:
        parse_coco_evidence(_json(changed))
    assert caught.value.reason == MALFORMED
    appraisal = _appraise(changed, store)
    assert appraisal.status is Status.CONTRAINDICATED and not appraisal.verified
    assert [r.code for r in appraisal.reasons] == [MALFORMED]


def test_version_specific_fields_must_match_the_version(
    pkis: dict[Product, tuple[AmdTestPki, TrustStore]],
) -> None:
    v2, _ = _sim_document(pkis, Product.MILAN, 2)
    v5, _ = _sim_document(pkis, Product.GENOA, 5)
    turin, _ = _sim_document(pkis, Product.TURIN, 3)
    refused = [
        _edit(v2, "attestation_report.cpuid_fam_id", 0x19),
        _edit(v5, "attestation_report.current_mit_vector", None),
        _edit(v5, "attestation_report.launch_mit_vector", _DELETE),
        _edit(turin, "attestation_report.launch_tcb.fmc", None),
        _edit(v2, "attestation_report.reported_tcb.fmc", 0),
    ]
    for document in refused:
        with pytest.raises(ParseError) as caught:
            parse_coco_evidence(_json(document))
        assert caught.value.reason == MALFORMED
    older_sev = _edit(
        _edit(v2, "attestation_report.launch_mit_vector", _DELETE),
        "attestation_report.current_mit_vector",
        _DELETE,
    )
    assert parse_coco_evidence(_json(older_sev)).report.version == 2


def test_signature_is_checked_over_the_reencoded_bytes(
    pkis: dict[Product, tuple[AmdTestPki, TrustStore]],
) -> None:
    document, store = _sim_document(pkis, Product.GENOA, 3)
    r = document["attestation_report"]["signature"]["r"]
    for changed in (
        _edit(document, "attestation_report.signature.r.0", r[0] ^ 1),
        _edit(document, "attestation_report.measurement.5", 7),
        _edit(document, "attestation_report.current.build", 99),
        _edit(document, "attestation_report.plat_info", 3),
    ):
        appraisal = _appraise(changed, store)
        assert appraisal.status is Status.CONTRAINDICATED
        assert "snp.report_signature_invalid" in [r.code for r in appraisal.reasons]


def test_duplicate_keys_floats_and_garbage_are_refused() -> None:
    for data in (
        b'{"cert_chain": null, "cert_chain": null}',
        b'{"attestation_report": 1.5}',
        b'{"attestation_report": NaN}',
        b'{"attestation_report": {}} trailing',
        b"{",
        b'{"attestation_report": "\xff"}',
    ):
        with pytest.raises(ParseError) as caught:
            load_evidence(data)
        assert caught.value.reason == MALFORMED, data


@pytest.mark.parametrize(
    "data",
    [
        b'{"attestation_report": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
        b"{" + b"[" * 100_000,
    ],
    ids=["deep-arrays", "deep-objects", "unclosed"],
)
def test_deep_json_is_refused_before_decoding(data: bytes) -> None:
    with pytest.raises(ParseError) as caught:
        load_evidence(data)
    assert caught.value.reason == MALFORMED
    assert "nested deeper" in caught.value.detail
    appraisal = SnpVerifier().appraise(data, VerifyOptions(now=NOW, trust=TrustStore.load(None)))
    assert appraisal.status is Status.CONTRAINDICATED


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    assert boundedjson.depth(b'{"a": "[[[[{{{{\\"[["}') == 1
    assert boundedjson.depth(b'{"a": [[1], {"b": []}]}') == 4


def test_oversized_document_is_refused() -> None:
    data = b'{"x": "' + b"a" * (600 * 1024) + b'"}'
    with pytest.raises(ParseError) as caught:
        load_evidence(data)
    assert caught.value.reason == MALFORMED and "exceeds" in caught.value.detail


def test_ark_and_ask_in_the_evidence_are_never_anchors(
    pkis: dict[Product, tuple[AmdTestPki, TrustStore]],
) -> None:
    """A Milan chain carried in cert_chain (ARK, ASK, VCEK, all consistent) against a store
    that trusts only the Genoa test roots: nothing in the evidence becomes an anchor."""
    document, _ = _sim_document(pkis, Product.MILAN, 3)
    assert [c["cert_type"] for c in document["cert_chain"]] == ["VCEK", "ASK", "ARK"]
    _, genoa_store = pkis[Product.GENOA]
    appraisal = _appraise(document, genoa_store)
    assert appraisal.status is Status.CONTRAINDICATED and not appraisal.verified
    assert "snp.no_trust_anchor" in [r.code for r in appraisal.reasons]


def test_lower_case_cert_types_and_leading_space_are_accepted(
    pkis: dict[Product, tuple[AmdTestPki, TrustStore]],
) -> None:
    document, store = _sim_document(pkis, Product.MILAN, 3)
    for cert in document["cert_chain"]:
        cert["cert_type"] = cert["cert_type"].lower()
    assert _appraise(b"\n  " + _json(document), store).status is Status.AFFIRMING


def test_without_cert_chain_the_vek_comes_from_collateral_or_the_kds_plan(
    pkis: dict[Product, tuple[AmdTestPki, TrustStore]],
) -> None:
    pki, store = pkis[Product.MILAN]
    sim = SnpSimulator(pki)
    document = to_coco_document(parse_evidence(sim.evidence(NONCE, attach_certs=False)))
    assert document["cert_chain"] is None
    data = _json(document)
    assert [r.name for r in kds.requests_for(data, {})] == ["vcek.der", "crl.der"]
    assert kds.requests_for(data, {}) == kds.requests_for(sim.report(NONCE), {})
    with_chain = _json(to_coco_document(parse_evidence(sim.evidence(NONCE))))
    assert [r.name for r in kds.requests_for(with_chain, {})] == ["crl.der"]
    options = VerifyOptions(now=NOW, trust=store, collateral=sim.collateral())
    assert SnpVerifier().appraise(data, options).status is Status.AFFIRMING


@needs_vectors
def test_cli_verifies_a_coco_json_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (vector,) = [v for v in VECTORS if v.id == "snp-trustee-milan-vcek-v2"]
    path = tmp_path / "evidence.json"
    path.write_bytes(_json(to_coco_document(_with_vek(vector))))
    args = ["verify", str(path), "--family", "snp", "--roots", str(roots_dir())]
    assert main([*args, "--at", vector.meta["at"], "--offline", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "affirming"
    path.write_bytes(path.read_bytes().replace(b'"version": 2', b'"version": 2, "x": 0', 1))
    assert main([*args, "--at", vector.meta["at"], "--offline", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [r["code"] for r in out["reasons"]] == [MALFORMED]


# --- through the bus ------------------------------------------------------------------------------


def _as_coco(evidence: events.SnpEvidence) -> events.SnpEvidence:
    """What a CoCo agent would publish: its JSON document in the report field, no table."""
    parsed = parse_evidence(events.evidence_bytes(evidence))
    return events.SnpEvidence(report=_json(to_coco_document(parsed)))


async def test_coco_json_snp_evidence_gets_a_verdict_on_the_bus(
    nats_server: NatsServer, tmp_path: Path, bus: Bus
) -> None:
    mesh = TestMesh(nats_server, tmp_path)
    await mesh.start()
    try:
        received: dict[str, bytes] = {}
        node = mesh.node(bus, "coco-1", tamper=_as_coco, received=received)
        result = await node.attest_once()
        assert result.status == "affirming" and result.released, result
        assert received == {"coco-1": await mesh.stored_secret(bus)}

        def tampered(evidence: events.SnpEvidence) -> events.SnpEvidence:
            document = msgspec.json.decode(_as_coco(evidence).report)
            document["attestation_report"]["measurement"][0] ^= 1
            return events.SnpEvidence(report=_json(document))

        bad = await mesh.node(bus, "coco-2", tamper=tampered).attest_once()
        assert bad.status == "contraindicated" and not bad.released
    finally:
        await mesh.stop()


def test_a_table_beside_a_json_report_on_the_wire_is_refused(
    pkis: dict[Product, tuple[AmdTestPki, TrustStore]],
) -> None:
    """The wire's certificate table belongs to the binary form; behind a JSON document it is
    trailing data, and the document is refused rather than half-read."""
    pki, store = pkis[Product.MILAN]
    sim = SnpSimulator(pki)
    document = _json(to_coco_document(parse_evidence(sim.evidence(NONCE))))
    wire = events.SnpEvidence(report=document, certificates=sim.cert_table())
    decoded = events.decode(
        events.encode(
            events.EvidenceEvent(node="n", nonce=b"n" * 16, public_key=b"k" * 32, evidence=wire)
        ),
        events.EvidenceEvent,
    )
    appraisal = _appraise(events.evidence_bytes(decoded.evidence), store)
    assert appraisal.status is Status.CONTRAINDICATED
    assert [r.code for r in appraisal.reasons] == [MALFORMED]


@functools.cache
def _base_document() -> dict[str, Any]:
    pki = AmdTestPki(Product.MILAN, now=NOW)
    return to_coco_document(parse_evidence(SnpSimulator(pki).evidence(NONCE)))


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(
    index=st.integers(min_value=0, max_value=len(SEV_FIELD_ORDER) - 1),
    value=_JSON_VALUES,
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=4),
)
def test_arbitrary_values_and_bytes_only_ever_give_a_parse_error(
    index: int, value: Any, flips: list[tuple[int, int]]
) -> None:
    changed = _edit(_base_document(), f"attestation_report.{SEV_FIELD_ORDER[index]}", value)
    data = bytearray(_json(changed))
    for position, byte in flips:
        data[position % len(data)] = byte
    try:
        parsed = load_evidence(bytes(data))
    except ParseError as exc:
        assert exc.reason == MALFORMED or not jsondoc.is_json_document(bytes(data))
    else:
        assert (
            to_coco_document(parsed)["attestation_report"] == json.loads(data)["attestation_report"]
        )
