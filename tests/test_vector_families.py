"""Every family the shared vectors hold has tests here that run its vectors.

Why: a family's vector test written ahead of its vectors would be skipped until they
arrived, proving nothing meanwhile (the az-tdx-vtpm one was, and is gone). Instead this
fails as soon as the shared set holds evidence of a family no vector test here reads, so
that test is written then, against real evidence."""

from __future__ import annotations

import pytest

from services.testing.vectors import vectors_root

pytestmark = [
    pytest.mark.vectors,
    pytest.mark.skipif(
        vectors_root() is None,
        reason="shared vectors not found: set ATTESTMESH_VECTORS or provide ../shared/vectors",
    ),
]

TESTED = {
    "snp": "test_snp_vectors, test_snp_mesh_vectors, test_hwid_vectors",
    "tdx": "test_dcap_vectors",
    "sgx": "test_dcap_vectors",
    "nitro": "test_nitro_vectors, test_nitro_indefinite",
    "cca": "test_cca_vectors",
    "tpm": "test_tpm_vectors",
    "az-snp-vtpm": "test_azure_vectors",
}
NOT_FAMILIES = {"negative", "roots"}


def test_every_family_in_the_shared_vectors_has_a_vector_test() -> None:
    root = vectors_root()
    assert root is not None
    held = {p.name for p in root.iterdir() if p.is_dir() and p.name not in NOT_FAMILIES}
    negative = root / "negative"
    if negative.is_dir():
        held |= {p.name for p in negative.iterdir() if p.is_dir()}
    assert held, f"{root} holds no vector families"
    assert held <= set(TESTED), f"vectors without a test here: {sorted(held - set(TESTED))}"
