"""The public CCA vector: Veraison's synthetic example token, verified with its example CPAK."""

from __future__ import annotations

import cbor2
import pytest

from services.testing.cca_tokens import CcaTestPlatform
from services.testing.vectors import Vector, iter_vectors, vectors_root
from services.verifier.families.base import TV_CONTRAINDICATED, Status, VerifyOptions
from services.verifier.families.cca import CcaVerifier, parse_token
from services.verifier.trust import TrustStore

pytestmark = [
    pytest.mark.vectors,
    pytest.mark.skipif(
        vectors_root() is None,
        reason="shared vectors not found: set ATTESTMESH_VECTORS or provide ../shared/vectors",
    ),
]

VECTORS = list(iter_vectors("cca")) if vectors_root() is not None else []
TOKEN = "cca-trustee-example-token"


def _vector() -> Vector:
    for vector in VECTORS:
        if vector.id == TOKEN:
            return vector
    pytest.fail(f"vector {TOKEN} is missing from the shared vectors this suite pins")


def _options(vector: Vector, **changes: object) -> VerifyOptions:
    values: dict[str, object] = {
        "now": vector.at,
        "trust": TrustStore(),
        "collateral": vector.collateral,
    }
    values.update(changes)
    return VerifyOptions(**values)  # type: ignore[arg-type]


def _codes(evidence: bytes, options: VerifyOptions) -> list[str]:
    return [r.code for r in CcaVerifier().appraise(evidence, options).reasons]


@pytest.mark.parametrize("vector", VECTORS, ids=[v.id for v in VECTORS])
def test_vector_verifies_as_expected(vector: Vector) -> None:
    appraisal = CcaVerifier().appraise(vector.evidence, _options(vector))
    expect = vector.expect
    assert appraisal.status == Status(expect["status"]), appraisal.reasons
    assert appraisal.verified is expect["verifies"]
    assert appraisal.claims["debug"] is expect["debug"]
    for name, value in expect["claims"].items():
        assert appraisal.claims[name] == value, name
    assert appraisal.claims["trust_anchor"].startswith("cpak:")
    assert appraisal.claims["platform_lifecycle_state"] == "secured"
    assert (
        appraisal.claims["realm_public_key_hash_algo_id"] == vector.meta["checks"]["rak_hash_alg"]
    )
    assert len(appraisal.claims["platform_sw_components"]) == 13


def _regions(token: bytes) -> dict[str, range]:
    """Byte ranges of each token's protected header, payload and signature in the evidence."""
    parsed = parse_token(token)
    out = {}
    for which, sign1 in (("platform", parsed.platform), ("realm", parsed.realm)):
        for part in ("protected", "payload", "signature"):
            encoded = cbor2.dumps(getattr(sign1, part))
            start = token.index(encoded)
            out[f"{which}-{part}"] = range(start, start + len(encoded))
    return out


@pytest.mark.parametrize(
    ("region", "stride"),
    [
        ("platform-protected", 1),
        ("platform-payload", 1),
        ("platform-signature", 1),
        ("realm-protected", 1),
        ("realm-payload", 1),
        ("realm-signature", 1),
    ],
)
def test_byte_flips_of_every_signed_region_are_contraindicated(region: str, stride: int) -> None:
    vector = _vector()
    options = _options(vector)
    verifier = CcaVerifier()
    assert verifier.appraise(vector.evidence, options).status is Status.AFFIRMING
    accepted = []
    for offset in _regions(vector.evidence)[region][::stride]:
        flipped = bytearray(vector.evidence)
        flipped[offset] ^= 0x01
        appraisal = verifier.appraise(bytes(flipped), options)
        if appraisal.status is not Status.CONTRAINDICATED or appraisal.verified:
            accepted.append(offset)
    assert accepted == []


def test_without_or_with_another_cpak() -> None:
    vector = _vector()
    appraisal = CcaVerifier().appraise(vector.evidence, _options(vector, collateral={}))
    assert [r.code for r in appraisal.reasons] == ["cca.no_trust_anchor"]
    assert appraisal.trust_vector["hardware"] == TV_CONTRAINDICATED
    other = CcaTestPlatform().collateral()
    assert _codes(vector.evidence, _options(vector, collateral=other)) == [
        "cca.platform_signature_invalid"
    ]


def test_binding_is_the_realm_challenge() -> None:
    vector = _vector()
    challenge = bytes.fromhex(vector.expect["claims"]["realm_challenge"])
    assert _codes(vector.evidence, _options(vector, expected_report_data=challenge)) == []
    appraisal = CcaVerifier().appraise(
        vector.evidence, _options(vector, expected_report_data=bytes(64))
    )
    assert [r.code for r in appraisal.reasons] == ["cca.report_data_mismatch"]
    assert appraisal.verified and appraisal.trust_vector["instance-identity"] == TV_CONTRAINDICATED
