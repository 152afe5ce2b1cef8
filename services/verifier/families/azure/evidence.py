"""Evidence JSON of the Azure families, as Confidential Containers' attestation agent emits it.

Three generations, told apart by ``version``:

    v0 (no version)  az-snp-vtpm: {"quote": Q0, "report": [bytes], "vcek": "<PEM>"}
                     az-tdx-vtpm: {"tpm_quote": Q0, "hcl_report": [bytes], "td_quote": [bytes]}
                     Q0 = {"signature": [bytes], "message": [bytes], "pcrs": [[32 bytes], ...]}
    v1, v2           {"version": n, "tpm_quote": Q1, "hcl_report": "<base64url>",
                      "vcek": "<base64url DER>" | "td_quote": "<base64url>"}
                     Q1 = {"signature": "<hex>", "message": "<hex>", "pcrs": ["<hex>", ...]}

"[bytes]" is a JSON array of integers 0..255. v2 equals v1 except that the runtime data's
``user-data`` carries the report data (checked by the verifiers). The quote's ``signature`` is
the raw RSASSA-PKCS1-v1_5/SHA-256 signature of the vTPM AK (Azure's AK scheme), or a marshalled
TPMT_SIGNATURE. Errors are :class:`ParseError` ``az.evidence_invalid``.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Annotated, TypeVar

import msgspec

from services.mesh.boundedjson import check_depth
from services.mesh.errors import ParseError

MAX_DOCUMENT = 1024 * 1024
_Byte = Annotated[int, msgspec.Meta(ge=0, le=255)]
_Bytes = Annotated[list[_Byte], msgspec.Meta(max_length=64 * 1024)]
_Text = Annotated[str, msgspec.Meta(max_length=128 * 1024)]
_Pcrs0 = Annotated[list[Annotated[list[_Byte], msgspec.Meta(max_length=64)]],
                   msgspec.Meta(max_length=32)]  # fmt: skip
_Pcrs1 = Annotated[list[Annotated[str, msgspec.Meta(max_length=128)]], msgspec.Meta(max_length=32)]
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")
_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")
S = TypeVar("S", bound=msgspec.Struct)


class _Quote0(msgspec.Struct, frozen=True):
    signature: _Bytes
    message: _Bytes
    pcrs: _Pcrs0


class _Quote1(msgspec.Struct, frozen=True):
    signature: _Text
    message: _Text
    pcrs: _Pcrs1


class _Probe(msgspec.Struct, frozen=True):
    version: int | None = None


class _Snp0(msgspec.Struct, frozen=True):
    quote: _Quote0
    report: _Bytes
    vcek: _Text


class _Tdx0(msgspec.Struct, frozen=True):
    tpm_quote: _Quote0
    hcl_report: _Bytes
    td_quote: _Bytes


class _Snp1(msgspec.Struct, frozen=True):
    version: int
    tpm_quote: _Quote1
    hcl_report: _Text
    vcek: _Text


class _Tdx1(msgspec.Struct, frozen=True):
    version: int
    tpm_quote: _Quote1
    hcl_report: _Text
    td_quote: _Text


@dataclass(frozen=True)
class VtpmQuote:
    """The vTPM quote as sent: TPMS_ATTEST, signature (raw or TPMT), PCR values."""

    message: bytes
    signature: bytes
    pcrs: tuple[bytes, ...]


@dataclass(frozen=True)
class AzureEvidence:
    """One decoded Azure evidence document; ``vcek`` (SNP) or ``td_quote`` (TDX) is set."""

    version: int
    hcl_report: bytes
    quote: VtpmQuote
    vcek: bytes | None = None
    td_quote: bytes | None = None


def _hex(text: str, what: str) -> bytes:
    if not _HEX.fullmatch(text):
        raise ParseError("az.evidence_invalid", f"{what} is not hex")
    return bytes.fromhex(text)


def _b64url(text: str, what: str) -> bytes:
    if not _B64URL.fullmatch(text) or len(text.rstrip("=")) % 4 == 1:
        raise ParseError("az.evidence_invalid", f"{what} is not base64url")
    try:
        return base64.urlsafe_b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ParseError("az.evidence_invalid", f"{what} is not base64url") from exc


def _decode(data: bytes, kind: type[S]) -> S:
    try:
        return msgspec.json.decode(data, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ParseError("az.evidence_invalid", f"not Azure vTPM evidence: {exc}") from None


def _quote0(quote: _Quote0) -> VtpmQuote:
    return VtpmQuote(bytes(quote.message), bytes(quote.signature), tuple(map(bytes, quote.pcrs)))


def _quote1(quote: _Quote1) -> VtpmQuote:
    pcrs = tuple(_hex(v, f"tpm_quote.pcrs[{i}]") for i, v in enumerate(quote.pcrs))
    return VtpmQuote(_hex(quote.message, "message"), _hex(quote.signature, "signature"), pcrs)


def parse_evidence(data: bytes, *, tdx: bool) -> AzureEvidence:
    """Decode az-snp-vtpm (``tdx=False``) or az-tdx-vtpm evidence of any version."""
    if len(data) > MAX_DOCUMENT:
        raise ParseError("az.evidence_invalid", f"evidence is {len(data)} bytes")
    check_depth(data, f"az-{'tdx' if tdx else 'snp'}-vtpm.evidence_malformed")
    probe = _decode(data, _Probe)
    if probe.version is None:
        if tdx:
            doc0 = _decode(data, _Tdx0)
            return AzureEvidence(
                0, bytes(doc0.hcl_report), _quote0(doc0.tpm_quote), td_quote=bytes(doc0.td_quote)
            )
        snp0 = _decode(data, _Snp0)
        return AzureEvidence(0, bytes(snp0.report), _quote0(snp0.quote), vcek=snp0.vcek.encode())
    if probe.version not in (1, 2):
        raise ParseError("az.evidence_invalid", f"evidence version {probe.version} is unknown")
    if tdx:
        doc1 = _decode(data, _Tdx1)
        return AzureEvidence(
            doc1.version,
            _b64url(doc1.hcl_report, "hcl_report"),
            _quote1(doc1.tpm_quote),
            td_quote=_b64url(doc1.td_quote, "td_quote"),
        )
    snp1 = _decode(data, _Snp1)
    return AzureEvidence(
        snp1.version,
        _b64url(snp1.hcl_report, "hcl_report"),
        _quote1(snp1.tpm_quote),
        vcek=_b64url(snp1.vcek, "vcek"),
    )
