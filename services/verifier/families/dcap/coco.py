"""Confidential Containers' TDX evidence: the JSON document their attestation agent sends.

    {"quote": "<base64 TD quote>",
     "cc_eventlog": "<base64 CCEL log area>",      optional (null, absent or "" when none)
     "aa_eventlog": "<the agent's own event log>"} optional, older agents only

The quote is the DCAP quote the ``tdx`` family verifies in raw form; the CCEL log area is
what ``/sys/firmware/acpi/tables/data/CCEL`` holds, the same bytes the ``ccel.bin`` collateral
carries, so it is replayed against the quote's RTMRs exactly as that file would be. The
attestation agent's event log is text the agent writes; it is accepted for compatibility but
neither replayed nor turned into claims (nothing here checks it against an RTMR), and the
report says so. Unknown fields are refused: a field this verifier does not read could only be
something a relying party wrongly believes was checked.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Annotated

import msgspec

from services.mesh.errors import ParseError
from services.verifier.families import jsondoc
from services.verifier.families.dcap.ccel import MAX_AREA_SIZE

__all__ = ["MAX_DOCUMENT", "TdxDocument", "parse_tdx_document", "to_tdx_document"]

MAX_QUOTE = 64 * 1024
MAX_AA_EVENTLOG = 64 * 1024
MAX_DOCUMENT = 2 * 1024 * 1024
MAX_DEPTH = 1


def _b64_length(size: int) -> int:
    return 4 * -(-size // 3)


class _Document(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    quote: Annotated[str, msgspec.Meta(min_length=1, max_length=_b64_length(MAX_QUOTE))]
    cc_eventlog: Annotated[str, msgspec.Meta(max_length=_b64_length(MAX_AREA_SIZE))] | None = None
    aa_eventlog: Annotated[str, msgspec.Meta(max_length=MAX_AA_EVENTLOG)] | None = None


@dataclass(frozen=True)
class TdxDocument:
    """The decoded document: quote bytes, the CCEL log area if sent, the AA log if sent."""

    quote: bytes
    cc_eventlog: bytes | None = None
    aa_eventlog: str | None = None


def parse_tdx_document(data: bytes, family: str = "tdx") -> TdxDocument:
    """Decode a CoCo TDX JSON document; raises ``ParseError`` ``<family>.evidence_malformed``."""
    reason = f"{family}.evidence_malformed"
    document = jsondoc.load_document(
        data, reason=reason, max_bytes=MAX_DOCUMENT, max_depth=MAX_DEPTH
    )
    try:
        decoded = msgspec.convert(document, _Document, strict=True)
    except msgspec.ValidationError as exc:
        raise ParseError(reason, f"CoCo TDX evidence: {exc}") from None
    quote = jsondoc.b64decode(decoded.quote, reason=reason, what="quote")
    ccel = None
    if decoded.cc_eventlog:
        ccel = jsondoc.b64decode(decoded.cc_eventlog, reason=reason, what="cc_eventlog")
    return TdxDocument(quote, ccel, decoded.aa_eventlog or None)


def to_tdx_document(quote: bytes, cc_eventlog: bytes | None = None) -> dict[str, str | None]:
    """The document an agent would send for ``quote`` (and the log area, if any)."""
    log = None if cc_eventlog is None else base64.b64encode(cc_eventlog).decode("ascii")
    return {"cc_eventlog": log, "quote": base64.b64encode(quote).decode("ascii")}
