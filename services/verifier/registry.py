"""Family name -> verifier class, imported lazily so one broken family can't stop the others."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from services.mesh.errors import ConfigError
from services.verifier.collateral import CollateralRequest
from services.verifier.families.base import FamilyVerifier

_FAMILIES: dict[str, str] = {
    "snp": "services.verifier.families.snp:SnpVerifier",
    "tdx": "services.verifier.families.tdx:TdxVerifier",
    "sgx": "services.verifier.families.sgx:SgxVerifier",
}


_PLANNERS: dict[str, str] = {
    "snp": "services.verifier.families.snp.kds:requests_for",
}


def families() -> list[str]:
    return sorted(_FAMILIES)


def get(family: str) -> FamilyVerifier:
    """A ready verifier for ``family``; unknown families are a configuration error."""
    target = _FAMILIES.get(family)
    if target is None:
        raise ConfigError("verifier.unknown_family", f"{family!r}; known: {', '.join(families())}")
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    verifier: FamilyVerifier = cls()
    return verifier


def planner(family: str) -> Callable[..., Sequence[CollateralRequest]] | None:
    """The family's collateral planner (what to fetch for a piece of evidence), if it has one."""
    target = _PLANNERS.get(family)
    if target is None:
        return None
    module_name, _, attr = target.partition(":")
    found: Callable[..., Sequence[CollateralRequest]] = getattr(
        importlib.import_module(module_name), attr
    )
    return found
