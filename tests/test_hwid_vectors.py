"""Hardware identities of real evidence: every family names one for each real vector that
verifies, and none for a vector that does not (identities come from verified data only)."""

from __future__ import annotations

import pytest

from services.testing.vectors import Vector, iter_vectors, roots_dir, vectors_root, verify_options
from services.verifier import registry
from services.verifier.trust import TrustStore

pytestmark = [
    pytest.mark.vectors,
    pytest.mark.skipif(
        vectors_root() is None or roots_dir() is None,
        reason="shared vectors not found: set ATTESTMESH_VECTORS or provide ../shared/vectors",
    ),
]

PREFIXES = {
    "snp": ("snp.chip_id:", "snp.vek:"),
    "tdx": ("dcap.platform_instance:", "dcap.ppid:"),
    "sgx": ("dcap.platform_instance:", "dcap.ppid:"),
    "nitro": ("nitro.instance:",),
    "tpm": ("tpm.ak:",),
    "az-snp-vtpm": ("az.ak:",),
    "cca": ("cca.instance:",),
}
VECTORS = (
    [v for family in PREFIXES for v in iter_vectors(family)] if vectors_root() is not None else []
)


@pytest.mark.parametrize("vector", VECTORS, ids=[v.id for v in VECTORS])
def test_real_evidence_names_its_hardware_only_when_it_verifies(
    vector: Vector, store: TrustStore
) -> None:
    appraisal = registry.get(vector.family).appraise(vector.evidence, verify_options(vector, store))
    self_asserted = appraisal.claims.get("ak_trust") == "self-asserted"  # TPM: anyone's key
    if appraisal.verified and not self_asserted:
        assert appraisal.hwid.startswith(PREFIXES[vector.family]), appraisal.hwid
    else:
        assert appraisal.hwid == ""
    assert not appraisal.authenticated  # recorded evidence answers none of our challenges


def test_each_family_with_real_vectors_names_some_hardware(store: TrustStore) -> None:
    named: dict[str, set[str]] = {}
    for vector in VECTORS:
        appraisal = registry.get(vector.family).appraise(
            vector.evidence, verify_options(vector, store)
        )
        if appraisal.hwid:
            named.setdefault(vector.family, set()).add(appraisal.hwid)
    families = {v.family for v in VECTORS if v.kind == "positive"}
    assert set(named) == families, named
