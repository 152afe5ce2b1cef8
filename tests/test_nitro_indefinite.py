"""Nitro documents whose payload is an indefinite-length CBOR map, as NSM firmware emits them
since late 2025: each is judged on its merits (signature, chain, debug PCRs), never refused for
its length encoding, while duplicate keys, misplaced breaks and trailing bytes still are."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import cbor2
import pytest

from services.testing.nitro_pki import NitroTestPki, TestEnclave, build_document, indefinite_map
from services.testing.vectors import iter_vectors, pick, vectors_root
from services.verifier.families import cose
from services.verifier.families.base import Appraisal, Status, VerifyOptions
from services.verifier.families.nitro import NitroVerifier
from services.verifier.trust import TrustStore

NOW = datetime(2026, 1, 10, 9, tzinfo=UTC)
BINDING = bytes(range(64))


@pytest.fixture(scope="module")
def pki() -> NitroTestPki:
    return NitroTestPki(now=NOW)


@pytest.fixture(scope="module")
def enclave(pki: NitroTestPki) -> TestEnclave:
    return pki.enclave()


def _appraise(document: bytes, pki: NitroTestPki) -> Appraisal:
    options = VerifyOptions(now=NOW, trust=pki.trust_store(), expected_report_data=BINDING)
    return NitroVerifier().appraise(document, options)


def _codes(appraisal: Appraisal) -> list[str]:
    return [r.code for r in appraisal.reasons]


def _replace_once(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def tamper(payload: bytes) -> bytes:
        assert payload.count(old) == 1 and len(old) == len(new)
        return payload.replace(old, new)

    return tamper


def test_the_builder_emits_the_nsm_shape(enclave: TestEnclave) -> None:
    document = enclave.document(user_data=BINDING, indefinite=True)
    payload = cbor2.loads(document)[2]
    assert payload[0] == 0xBF and payload[-1] == 0xFF
    assert cbor2.loads(payload)["module_id"] == enclave.module_id


def test_an_indefinite_length_document_is_judged_like_a_definite_one(
    pki: NitroTestPki, enclave: TestEnclave
) -> None:
    definite = _appraise(enclave.document(user_data=BINDING), pki)
    indefinite = _appraise(enclave.document(user_data=BINDING, indefinite=True), pki)
    assert indefinite.status is Status.AFFIRMING and indefinite.verified
    assert indefinite.claims == definite.claims
    assert indefinite.trust_vector == definite.trust_vector


def test_a_debug_enclave_is_refused_for_being_debug(
    pki: NitroTestPki, enclave: TestEnclave
) -> None:
    pcrs = {**enclave.pcrs, 0: bytes(48), 1: bytes(48), 2: bytes(48)}
    appraisal = _appraise(enclave.document(user_data=BINDING, pcrs=pcrs, indefinite=True), pki)
    assert appraisal.status is Status.CONTRAINDICATED
    assert appraisal.verified, "signature and chain hold; only the debug PCRs fail"
    assert _codes(appraisal) == ["nitro.debug_enabled"]


def test_a_tampered_document_is_refused_for_its_signature(
    pki: NitroTestPki, enclave: TestEnclave
) -> None:
    pcr1 = enclave.pcrs[1]
    forged = pcr1[:-1] + bytes([pcr1[-1] ^ 0x01])
    document = enclave.document(
        user_data=BINDING, indefinite=True, tamper=_replace_once(pcr1, forged)
    )
    appraisal = _appraise(document, pki)
    assert appraisal.status is Status.CONTRAINDICATED and not appraisal.verified
    assert _codes(appraisal) == ["nitro.signature_invalid"]
    assert appraisal.claims["pcr1"] == forged.hex()


@pytest.mark.parametrize(
    ("rewrite", "fragment"),
    [
        (lambda p: p[:-1] + b"\x41a\x01\xff", "map key"),
        (lambda p: p + b"\x00", "trailing"),
        (lambda p: p[:-1], "truncated"),
        (lambda p: p[:-1] + b"\x66digest\x66SHA384\xff", "undecodable"),
    ],
    ids=["map-key-not-text", "trailing-byte", "missing-break", "duplicate-key"],
)
def test_structural_abuse_of_an_indefinite_payload_is_still_malformed(
    pki: NitroTestPki, enclave: TestEnclave, rewrite: Callable[[bytes], bytes], fragment: str
) -> None:
    """Signed by the enclave's real key, so only the structure can be what is refused."""
    fields = {
        "module_id": enclave.module_id,
        "digest": "SHA384",
        "timestamp": int(NOW.timestamp() * 1000),
        "pcrs": enclave.pcrs,
        "certificate": enclave.certificate,
        "cabundle": enclave.cabundle,
        "public_key": None,
        "user_data": BINDING,
        "nonce": None,
    }
    payload = rewrite(indefinite_map(fields))
    document = cose.sign_sign1(payload, enclave.signing_key, alg=cose.Algorithm.ES384)
    appraisal = _appraise(document, pki)
    assert appraisal.status is Status.CONTRAINDICATED
    assert _codes(appraisal) == ["nitro.cose_malformed"]
    assert fragment in appraisal.reasons[0].message


def test_the_builder_refuses_a_tamper_that_changes_the_length(enclave: TestEnclave) -> None:
    with pytest.raises(ValueError, match="length"):
        build_document(
            enclave.signing_key,
            module_id=enclave.module_id,
            certificate=enclave.certificate,
            cabundle=enclave.cabundle,
            timestamp_ms=0,
            pcrs=enclave.pcrs,
            tamper=lambda p: p + b"\x00",
        )


@pytest.mark.vectors
@pytest.mark.skipif(vectors_root() is None, reason="shared vectors absent (ATTESTMESH_VECTORS)")
def test_the_real_2025_document_is_indefinite_and_its_forgery_fails(store: TrustStore) -> None:
    vector = pick({v.id: v for v in iter_vectors("nitro")}, "nitro-dstack-2025-12-25-nsmqvl")
    payload = cbor2.loads(vector.evidence)[2]
    assert payload[0] == 0xBF, "the vector is meant to exercise the indefinite-length form"
    options = VerifyOptions(now=vector.at, trust=store)
    assert NitroVerifier().appraise(vector.evidence, options).verified
    module_id = b"i-0827e799ec9232d44-enc019b55a68bd2ed4b"
    forged = vector.evidence.replace(module_id, module_id[:-1] + b"c", 1)
    appraisal = NitroVerifier().appraise(forged, options)
    assert appraisal.status is Status.CONTRAINDICATED and not appraisal.verified
    assert "nitro.signature_invalid" in _codes(appraisal)
