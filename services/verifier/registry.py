"""Family name -> verifier class, imported lazily so one broken family can't stop the others."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from services.mesh.errors import ConfigError, PolicyError
from services.verifier.collateral import CollateralRequest, Planner
from services.verifier.families.base import FamilyVerifier

_FAMILIES: dict[str, str] = {
    "snp": "services.verifier.families.snp:SnpVerifier",
    "tdx": "services.verifier.families.tdx:TdxVerifier",
    "sgx": "services.verifier.families.sgx:SgxVerifier",
    "nitro": "services.verifier.families.nitro:NitroVerifier",
    "cca": "services.verifier.families.cca:CcaVerifier",
    "tpm": "services.verifier.families.tpm:TpmVerifier",
    "az-snp-vtpm": "services.verifier.families.azure:AzSnpVtpmVerifier",
    "az-tdx-vtpm": "services.verifier.families.azure:AzTdxVtpmVerifier",
}


# family -> (planner, {planner keyword: vendor URL name})
_PLANNERS: dict[str, tuple[str, dict[str, str]]] = {
    "snp": ("services.verifier.families.snp.kds:requests_for", {"base": "kds"}),
    "tdx": (
        "services.verifier.families.dcap.pcsfetch:requests_for",
        {"base": "pcs", "root_crl_url": "intel_root_crl"},
    ),
    "sgx": (
        "services.verifier.families.dcap.pcsfetch:requests_for",
        {"base": "pcs", "root_crl_url": "intel_root_crl"},
    ),
}


def families() -> list[str]:
    return sorted(_FAMILIES)


# family -> its appraisal policy class (each has ``from_mapping``)
_POLICIES: dict[str, str] = {
    "snp": "services.verifier.families.snp.policy:SnpPolicy",
    "tdx": "services.verifier.families.dcap.appraise:DcapPolicy",
    "sgx": "services.verifier.families.dcap.appraise:DcapPolicy",
    "nitro": "services.verifier.families.nitro.policy:NitroPolicy",
    "cca": "services.verifier.families.cca.policy:CcaPolicy",
    "tpm": "services.verifier.families.tpm.policy:TpmPolicy",
}


def _load(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def get(family: str, settings: Mapping[str, Any] | None = None) -> FamilyVerifier:
    """A ready verifier for ``family``, its appraisal policy built from ``settings`` (the
    family's section of the configuration: minimum TCB, allowed measurements, debug...).

    Unknown families, settings for a family without a policy, and invalid settings are
    configuration errors: a verifier never starts on a policy it did not understand.
    """
    target = _FAMILIES.get(family)
    if target is None:
        raise ConfigError("verifier.unknown_family", f"{family!r}; known: {', '.join(families())}")
    cls = _load(target)
    if not settings:
        verifier: FamilyVerifier = cls()
        return verifier
    policy = _POLICIES.get(family)
    if policy is None:
        raise ConfigError("verifier.no_policy", f"{family} takes no appraisal settings")
    try:
        built = _load(policy).from_mapping(settings)
    except PolicyError as exc:
        raise ConfigError(exc.reason, exc.detail) from None
    configured: FamilyVerifier = cls(policy=built)
    return configured


def planner(family: str, urls: Mapping[str, str]) -> Planner | None:
    """The family's collateral planner (what to fetch for a piece of evidence), bound to the
    vendor service URLs in ``urls`` (``kds``, ``pcs``, ``intel_root_crl``); None if it has none.
    """
    entry = _PLANNERS.get(family)
    if entry is None:
        return None
    target, keywords = entry
    module_name, _, attr = target.partition(":")
    plan: Callable[..., Sequence[CollateralRequest]] = getattr(
        importlib.import_module(module_name), attr
    )
    bound = {keyword: urls[name] for keyword, name in keywords.items() if name in urls}
    return functools.partial(plan, **bound)
