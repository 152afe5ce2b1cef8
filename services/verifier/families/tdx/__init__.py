"""Intel TDX: TD quotes (v4, v5 with TDX 1.0 and 1.5 reports) verified with Intel's collateral.

All the work is shared with SGX in :mod:`services.verifier.families.dcap`; this module fixes
the family name (reason codes read ``tdx.<what>``) and the policy, and accepts the quote in
either form it arrives in: raw, or inside Confidential Containers' JSON document
(:mod:`services.verifier.families.dcap.coco`), whose CCEL log then takes the place of the
``ccel.bin`` collateral.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from services.mesh.errors import ParseError
from services.verifier.families import jsondoc
from services.verifier.families.base import Appraisal, Check, VerifyOptions, unparsable
from services.verifier.families.dcap import DcapPolicy, appraise_quote
from services.verifier.families.dcap.ccel import CCEL_FILE
from services.verifier.families.dcap.coco import parse_tdx_document

__all__ = ["DcapPolicy", "TdxVerifier"]


class TdxVerifier:
    """Appraises TDX quotes; collateral in ``options.collateral`` in Intel's PCS layout."""

    family: ClassVar[str] = "tdx"

    def __init__(self, policy: DcapPolicy | None = None) -> None:
        self.policy = policy or DcapPolicy()

    def appraise(self, evidence: bytes, options: VerifyOptions) -> Appraisal:
        """Parse, verify and appraise ``evidence``; never raises for bad input."""
        if not jsondoc.is_json_document(evidence):
            return appraise_quote(self.family, evidence, options, self.policy)
        try:
            document = parse_tdx_document(evidence, self.family)
        except ParseError as exc:
            return unparsable(self.family, exc)
        if document.cc_eventlog is not None:
            collateral = {**options.collateral, CCEL_FILE: document.cc_eventlog}
            options = dataclasses.replace(options, collateral=collateral)
        appraisal = appraise_quote(self.family, document.quote, options, self.policy)
        detail = "Confidential Containers JSON: base64 quote"
        if document.cc_eventlog is not None:
            detail += f", CCEL log area of {len(document.cc_eventlog)} bytes"
        if document.aa_eventlog is not None:
            detail += "; its AA event log is neither replayed nor claimed"
        appraisal.checks.insert(0, Check("evidence_form", True, detail))
        return appraisal
