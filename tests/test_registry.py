"""The family registry: every family is reachable, and appraisal settings from the
configuration change verdicts the way they say, or stop the verifier from starting."""

from __future__ import annotations

import pytest

from services.mesh.errors import ConfigError
from services.testing.vectors import load_vector, roots_dir, vectors_root
from services.verifier import registry
from services.verifier.families.base import Status, VerifyOptions
from services.verifier.trust import TrustStore

ROOT = vectors_root()
needs_vectors = pytest.mark.skipif(
    ROOT is None or roots_dir() is None,
    reason="shared vectors not found: set ATTESTMESH_VECTORS or provide ../shared/vectors",
)


def test_every_family_is_registered() -> None:
    assert registry.families() == sorted(
        ["snp", "tdx", "sgx", "nitro", "cca", "tpm", "az-snp-vtpm", "az-tdx-vtpm"]
    )
    for family in registry.families():
        assert registry.get(family).family == family


@needs_vectors
def test_settings_loosen_snp_debug_only_when_configured() -> None:
    assert ROOT is not None
    vector = load_vector(ROOT / "snp" / "snp-gosev-milan-v2")
    options = VerifyOptions(
        now=vector.at, trust=TrustStore.load(roots_dir()), collateral=vector.collateral
    )
    assert registry.get("snp").appraise(vector.evidence, options).status is Status.CONTRAINDICATED
    loosened = registry.get("snp", {"allow_debug": True}).appraise(vector.evidence, options)
    assert loosened.status is not Status.CONTRAINDICATED


@needs_vectors
def test_settings_tighten_intel_statuses() -> None:
    assert ROOT is not None
    vector = load_vector(ROOT / "tdx" / "tdx-dcaprs-00806f050000")  # OutOfDate -> warning
    options = VerifyOptions(
        now=vector.at, trust=TrustStore.load(roots_dir()), collateral=vector.collateral
    )
    assert registry.get("tdx").appraise(vector.evidence, options).status is Status.WARNING
    strict = registry.get("tdx", {"out_of_date": "contraindicated"})
    assert strict.appraise(vector.evidence, options).status is Status.CONTRAINDICATED


@pytest.mark.parametrize(
    ("family", "settings", "reason"),
    [
        ("snp", {"no_such_knob": 1}, "snp.policy_invalid"),
        ("tdx", {"out_of_date": "maybe"}, "dcap.policy_invalid"),
        ("az-snp-vtpm", {"allow_debug": True}, "verifier.no_policy"),
        ("quantum", None, "verifier.unknown_family"),
    ],
)
def test_bad_settings_stop_the_verifier(
    family: str, settings: dict[str, object] | None, reason: str
) -> None:
    with pytest.raises(ConfigError) as err:
        registry.get(family, settings)
    assert err.value.reason == reason
