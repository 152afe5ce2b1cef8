"""The ``tpm`` family's evidence: the JSON Confidential Containers' attestation agent emits.

    {"ak_public": "<base64 SubjectPublicKeyInfo DER>",
     "tpm_quote": {"message": "<base64 TPMS_ATTEST>",
                   "signature": "<base64 TPMT_SIGNATURE>",
                   "pcrs": ["<hex PCR value>", ...]},
     "ak_cert": "<base64 DER>",          optional, else collateral ak_cert.der
     "event_log": "<base64 TCG log>"}    optional, crypto-agile PC Client event log

so an agent's output verifies unchanged. Unknown top-level fields are ignored (the agent may
grow new ones); the known ones are decoded strictly (standard padded base64, even-length hex)
and bounded, and the quote structures are parsed here, so anything malformed is a
:class:`ParseError` before verification starts.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import msgspec

from services.mesh.boundedjson import check_depth
from services.mesh.errors import ParseError
from services.verifier.families.tpm.quote import PublicKey, load_public_key
from services.verifier.families.tpm.structures import (
    Attest,
    Signature,
    parse_attest,
    parse_signature,
)

MAX_DOCUMENT = 1024 * 1024
_B64 = Annotated[str, msgspec.Meta(max_length=768 * 1024)]
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


class _QuoteJson(msgspec.Struct, frozen=True):
    message: Annotated[str, msgspec.Meta(max_length=4096)]
    signature: Annotated[str, msgspec.Meta(max_length=4096)]
    pcrs: Annotated[list[Annotated[str, msgspec.Meta(max_length=128)]], msgspec.Meta(max_length=32)]


class _DocumentJson(msgspec.Struct, frozen=True):
    ak_public: Annotated[str, msgspec.Meta(max_length=8192)]
    tpm_quote: _QuoteJson
    ak_cert: _B64 | None = None
    event_log: _B64 | None = None


_DECODER = msgspec.json.Decoder(_DocumentJson)


@dataclass(frozen=True)
class TpmEvidence:
    """Decoded and parsed ``tpm`` evidence; ``ak_public`` is the SPKI DER exactly as sent."""

    ak_public: bytes
    ak_key: PublicKey
    attest: Attest
    signature: Signature
    pcrs: tuple[bytes, ...]
    ak_cert: bytes | None = None
    event_log: bytes | None = None


def b64decode(text: str, what: str) -> bytes:
    """Strict standard base64 (padding required, no stray characters)."""
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise ParseError("tpm.evidence_invalid", f"{what} is not base64") from exc


def hexdecode(text: str, what: str) -> bytes:
    """Strict hex: an even number of hex digits, nothing else."""
    if not _HEX.fullmatch(text):
        raise ParseError("tpm.evidence_invalid", f"{what} is not hex")
    return bytes.fromhex(text)


def parse_evidence(data: bytes) -> TpmEvidence:
    """Decode the evidence JSON and parse the AK, TPMS_ATTEST and TPMT_SIGNATURE in it."""
    if len(data) > MAX_DOCUMENT:
        raise ParseError("tpm.evidence_invalid", f"evidence is {len(data)} bytes")
    check_depth(data, "tpm.evidence_malformed")
    try:
        doc = _DECODER.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ParseError("tpm.evidence_invalid", f"not TPM evidence JSON: {exc}") from None
    ak_public = b64decode(doc.ak_public, "ak_public")
    key = load_public_key(ak_public)
    quote = doc.tpm_quote
    attest = parse_attest(b64decode(quote.message, "tpm_quote.message"))
    signature = parse_signature(b64decode(quote.signature, "tpm_quote.signature"))
    pcrs = tuple(hexdecode(v, f"tpm_quote.pcrs[{i}]") for i, v in enumerate(quote.pcrs))
    return TpmEvidence(
        ak_public=ak_public,
        ak_key=key,
        attest=attest,
        signature=signature,
        pcrs=pcrs,
        ak_cert=b64decode(doc.ak_cert, "ak_cert") if doc.ak_cert is not None else None,
        event_log=b64decode(doc.event_log, "event_log") if doc.event_log is not None else None,
    )


def encode_evidence(
    ak_public: bytes,
    attest: bytes,
    signature: bytes,
    pcrs: Sequence[bytes],
    *,
    ak_cert: bytes | None = None,
    event_log: bytes | None = None,
) -> bytes:
    """Evidence JSON as the attestation agent writes it (what :func:`parse_evidence` reads)."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    quote = {"message": b64(attest), "signature": b64(signature), "pcrs": [v.hex() for v in pcrs]}
    doc: dict[str, object] = {"ak_public": b64(ak_public), "tpm_quote": quote}
    if ak_cert is not None:
        doc["ak_cert"] = b64(ak_cert)
    if event_log is not None:
        doc["event_log"] = b64(event_log)
    return json.dumps(doc).encode()
