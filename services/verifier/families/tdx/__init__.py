"""Intel TDX: TD quotes (v4, v5 with TDX 1.0 and 1.5 reports) verified with Intel's collateral.

All the work is shared with SGX in :mod:`services.verifier.families.dcap`; this module only fixes
the family name (reason codes read ``tdx.<what>``) and the policy.
"""

from __future__ import annotations

from typing import ClassVar

from services.verifier.families.base import Appraisal, VerifyOptions
from services.verifier.families.dcap import DcapPolicy, appraise_quote

__all__ = ["DcapPolicy", "TdxVerifier"]


class TdxVerifier:
    """Appraises TDX quotes; collateral in ``options.collateral`` in Intel's PCS layout."""

    family: ClassVar[str] = "tdx"

    def __init__(self, policy: DcapPolicy | None = None) -> None:
        self.policy = policy or DcapPolicy()

    def appraise(self, evidence: bytes, options: VerifyOptions) -> Appraisal:
        """Parse, verify and appraise ``evidence``; never raises for bad input."""
        return appraise_quote(self.family, evidence, options, self.policy)
