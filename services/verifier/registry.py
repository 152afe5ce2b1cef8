"""Family name -> verifier class, imported lazily so one broken family can't stop the others."""

from __future__ import annotations

import importlib

from services.mesh.errors import ConfigError
from services.verifier.families.base import FamilyVerifier

_FAMILIES: dict[str, str] = {
    "snp": "services.verifier.families.snp:SnpVerifier",
    "tdx": "services.verifier.families.tdx:TdxVerifier",
    "sgx": "services.verifier.families.sgx:SgxVerifier",
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
