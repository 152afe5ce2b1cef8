"""SNP evidence in either form it arrives in, told apart by content.

The raw form is the 1184-byte ATTESTATION_REPORT, optionally followed by the host's
certificate table (:func:`.parse.parse_evidence`); the other is Confidential Containers' JSON
document (:mod:`.coco`). A binary report starts with its little-endian VERSION (2..5), so a
first non-space byte ``{`` can only mean JSON. Both become the same :class:`SnpEvidence`, so
everything after parsing (signature, chain, policy, the KDS planner) is shared.
"""

from __future__ import annotations

from services.verifier.families import jsondoc
from services.verifier.families.snp.coco import parse_coco_evidence
from services.verifier.families.snp.parse import SnpEvidence, parse_evidence


def is_coco(data: bytes) -> bool:
    """True for Confidential Containers' JSON form."""
    return jsondoc.is_json_document(data)


def load_evidence(data: bytes) -> SnpEvidence:
    """Parse SNP evidence of either form; raises :class:`ParseError`."""
    if is_coco(data):
        return parse_coco_evidence(data)
    return parse_evidence(data)
