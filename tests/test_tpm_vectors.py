"""Real TPM quotes (a GCE vTPM with its AK certificate, trustee's swtpm quote) at their `at`."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import timedelta
from typing import Any

import pytest

from services.testing.vectors import (
    Vector,
    iter_vectors,
    pick,
    roots_dir,
    vectors_root,
    verify_options,
)
from services.verifier.families.base import Status
from services.verifier.families.tpm import TpmPolicy, TpmVerifier, parse_attest
from services.verifier.trust import TrustStore

pytestmark = [
    pytest.mark.vectors,
    pytest.mark.skipif(
        vectors_root() is None or roots_dir() is None,
        reason="shared vectors not found: set ATTESTMESH_VECTORS or provide ../shared/vectors",
    ),
]

VECTORS = list(iter_vectors("tpm")) if vectors_root() is not None else []
BY_ID = {v.id: v for v in VECTORS}
GCE = "tpm-gotpm-gce-cos85-nonce9009"
TRUSTEE = "tpm-trustee-tpm-evidence"


def _document(vector: Vector) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(vector.evidence)
    return document


def _encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


@pytest.mark.parametrize("vector", VECTORS, ids=[v.id for v in VECTORS])
def test_vector_verifies_as_expected(vector: Vector, store: TrustStore) -> None:
    appraisal = TpmVerifier().appraise(vector.evidence, verify_options(vector, store))
    expect = vector.expect
    assert appraisal.status == Status(expect["status"]), appraisal.reasons
    assert appraisal.verified is expect["verifies"]
    for name, value in expect["claims"].items():
        assert appraisal.claims[name] == value, name
    assert appraisal.claims["pcr_select"] == {"sha256": list(range(24))}


def test_gce_quote_rests_on_the_pinned_gce_root(store: TrustStore) -> None:
    vector = pick(BY_ID, GCE)
    appraisal = TpmVerifier().appraise(vector.evidence, verify_options(vector, store))
    assert appraisal.claims["ak_trust"] == "certificate"
    assert appraisal.claims["trust_anchor"] == "tpm:gce_tpm_ek_root_1"
    assert appraisal.trust_vector["hardware"] == 2
    assert appraisal.claims["signature_scheme"] == "rsassa"


def test_self_asserted_ak_is_a_warning_until_pinned(store: TrustStore) -> None:
    vector = pick(BY_ID, TRUSTEE)
    appraisal = TpmVerifier().appraise(vector.evidence, verify_options(vector, store))
    assert [r.code for r in appraisal.reasons] == ["tpm.ak_not_anchored"]
    assert appraisal.claims["ak_trust"] == "self-asserted"
    assert appraisal.trust_vector["instance-identity"] == 32
    pin = bytes.fromhex(vector.expect["claims"]["ak_public_sha256"])
    pinned = TpmVerifier(TpmPolicy(trusted_ak_sha256=frozenset({pin})))
    appraisal = pinned.appraise(vector.evidence, verify_options(vector, store))
    assert appraisal.status is Status.AFFIRMING and appraisal.reasons == []
    assert appraisal.claims["ak_trust"] == "pinned"
    strict = TpmVerifier(TpmPolicy(require_ak_cert=True))
    assert (
        strict.appraise(vector.evidence, verify_options(vector, store)).status
        is Status.CONTRAINDICATED
    )


@pytest.mark.parametrize("vector_id", [GCE, TRUSTEE])
def test_nonce_binding_on_real_quotes(vector_id: str, store: TrustStore) -> None:
    vector = pick(BY_ID, vector_id)
    nonce = bytes.fromhex(vector.expect["claims"]["nonce"])
    bound = TpmVerifier().appraise(
        vector.evidence, verify_options(vector, store, expected_report_data=nonce)
    )
    assert bound.status == Status(vector.expect["status"])
    assert any(c.name == "nonce" and c.ok for c in bound.checks)
    padded = TpmVerifier().appraise(
        vector.evidence,
        verify_options(vector, store, expected_report_data=nonce.rstrip(b"\0").ljust(64, b"\0")),
    )
    assert padded.status == Status(vector.expect["status"])
    unbound = TpmVerifier().appraise(
        vector.evidence, verify_options(vector, store, expected_report_data=b"\x01" * 64)
    )
    assert "tpm.nonce_mismatch" in [r.code for r in unbound.reasons]
    assert unbound.status is Status.CONTRAINDICATED and unbound.verified
    assert unbound.trust_vector["instance-identity"] == 96


@pytest.mark.parametrize("vector_id", [GCE, TRUSTEE])
@pytest.mark.parametrize("part", ["message", "signature"])
def test_every_byte_flip_of_a_signed_region_is_contraindicated(
    vector_id: str, part: str, store: TrustStore
) -> None:
    vector = pick(BY_ID, vector_id)
    document = _document(vector)
    raw = base64.b64decode(document["tpm_quote"][part])
    options = verify_options(vector, store)
    verifier = TpmVerifier()
    accepted = []
    for offset in range(len(raw)):
        flipped = bytearray(raw)
        flipped[offset] ^= 0x01
        document["tpm_quote"][part] = base64.b64encode(bytes(flipped)).decode()
        appraisal = verifier.appraise(_encode(document), options)
        if appraisal.status is not Status.CONTRAINDICATED or appraisal.verified:
            accepted.append(offset)
    assert accepted == []


@pytest.mark.parametrize("vector_id", [GCE, TRUSTEE])
def test_a_changed_pcr_value_breaks_the_digest(vector_id: str, store: TrustStore) -> None:
    vector = pick(BY_ID, vector_id)
    document = _document(vector)
    for index in (0, 7, 23):
        changed = _document(vector)
        value = bytearray(bytes.fromhex(changed["tpm_quote"]["pcrs"][index]))
        value[0] ^= 0x80
        changed["tpm_quote"]["pcrs"][index] = value.hex()
        appraisal = TpmVerifier().appraise(_encode(changed), verify_options(vector, store))
        assert appraisal.reasons[0].code == "tpm.pcr_digest_mismatch"
        assert not appraisal.verified and "pcr0" not in appraisal.claims
    assert document == _document(vector)


def test_another_ak_does_not_verify_the_quote(store: TrustStore) -> None:
    gce, trustee = pick(BY_ID, GCE), pick(BY_ID, TRUSTEE)
    document = _document(gce)
    document["ak_public"] = _document(trustee)["ak_public"]
    appraisal = TpmVerifier().appraise(_encode(document), verify_options(gce, store))
    codes = [r.code for r in appraisal.reasons]
    assert "tpm.signature_invalid" in codes and "tpm.ak_cert_key_mismatch" in codes


def test_gce_ak_certificate_checks(store: TrustStore) -> None:
    vector = pick(BY_ID, GCE)
    verifier = TpmVerifier()
    missing = verifier.appraise(vector.evidence, verify_options(vector, store, collateral={}))
    assert [r.code for r in missing.reasons] == ["tpm.ak_not_anchored"]
    no_roots = verifier.appraise(vector.evidence, verify_options(vector, TrustStore()))
    assert [r.code for r in no_roots.reasons] == ["tpm.ak_cert_untrusted"]
    assert no_roots.status is Status.CONTRAINDICATED and not no_roots.verified
    late = verifier.appraise(
        vector.evidence, verify_options(vector, store, now=vector.at.replace(year=2052))
    )
    assert [r.code for r in late.reasons] == ["tpm.ak_cert_expired"]
    early = verifier.appraise(
        vector.evidence,
        verify_options(vector, store, now=vector.at.replace(year=2021, month=8, day=1)),
    )
    assert [r.code for r in early.reasons] == ["tpm.ak_cert_not_yet_valid"]
    der = vector.collateral["ak_cert.der"]
    accepted = []
    for offset in range(len(der) - 256, len(der)):
        flipped = bytearray(der)
        flipped[offset] ^= 0x01
        options = verify_options(vector, store, collateral={"ak_cert.der": bytes(flipped)})
        appraisal = verifier.appraise(vector.evidence, options)
        if appraisal.status is not Status.CONTRAINDICATED or appraisal.verified:
            accepted.append(offset)
    assert accepted == []


def test_ak_certificate_inside_the_evidence(store: TrustStore) -> None:
    vector = pick(BY_ID, GCE)
    document = _document(vector)
    document["ak_cert"] = base64.b64encode(vector.collateral["ak_cert.der"]).decode()
    appraisal = TpmVerifier().appraise(
        _encode(document), verify_options(vector, store, collateral={})
    )
    assert appraisal.status is Status.AFFIRMING and appraisal.claims["ak_trust"] == "certificate"


def test_claims_describe_the_quote(store: TrustStore) -> None:
    vector = pick(BY_ID, TRUSTEE)
    appraisal = TpmVerifier().appraise(vector.evidence, verify_options(vector, store))
    attest = parse_attest(base64.b64decode(_document(vector)["tpm_quote"]["message"]))
    claims = appraisal.claims
    assert claims["clock"] == attest.clock_info.clock
    assert claims["clock_safe"] is attest.clock_info.safe
    assert claims["qualified_signer"] == attest.qualified_signer.hex()
    assert claims["pcr17"] == "ff" * 32
    ak = base64.b64decode(_document(vector)["ak_public"])
    assert claims["ak_public_sha256"] == hashlib.sha256(ak).hexdigest()
    assert vector.at + timedelta(days=1) > vector.at
