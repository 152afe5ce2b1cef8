"""Compact JWS with ES256, the form of every token the mesh signs (EARs, decisions, audit
checkpoints): sign, split, check the signature, read the payload.

Why not PyJWT on the hot path: reading one token through it decoded every segment twice
(``get_unverified_header``, then ``decode``) and checked the base64url alphabet character by
character in Python, close to a millisecond for a 4 KB EAR, most of it before the signature
was even looked at. Here one regular expression checks the whole token against the compact
alphabet, the C codec decodes it, and the signature is checked before the payload is parsed,
so a tampered payload is refused as ``token.invalid`` without being parsed at all. Tokens are
standard RFC 7515 compact serialisations: PyJWT reads ours, and we read its.

Only what the mesh issues is accepted: a ``kid`` naming a trusted signer, ``alg`` exactly
``ES256`` (never ``none``, never an algorithm chosen by the token), no ``crit`` extensions,
a 64-byte ``r || s`` signature, and a payload that is a JSON object. The reasons are those
the mesh gave before: ``token.malformed`` when the header cannot be read, then the signer's
``token.unknown_signer`` or ``token.wrong_signer``, then ``token.invalid``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from services.mesh.boundedjson import check_depth
from services.mesh.errors import ParseError, VerificationError

ALGORITHM = "ES256"
MAX_HEADER_BYTES = 1024
_COORDINATE = 32
_COMPACT = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)\.([A-Za-z0-9_-]*)")
_ECDSA = ec.ECDSA(hashes.SHA256())


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(segment: str, what: str) -> bytes:
    """Decode one segment; the caller has already checked its alphabet."""
    if len(segment) % 4 == 1:
        raise VerificationError("token.malformed", f"{what} is not base64url")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise VerificationError("token.malformed", f"{what} is not base64url") from None


def sign(claims: Mapping[str, Any], key: ec.EllipticCurvePrivateKey, kid: str) -> str:
    """``claims`` as a compact ES256 JWS whose header names ``kid``."""
    header = json.dumps({"alg": ALGORITHM, "kid": kid, "typ": "JWT"}, separators=(",", ":"))
    payload = json.dumps(dict(claims), separators=(",", ":"))
    signing_input = f"{b64url(header.encode())}.{b64url(payload.encode())}"
    r, s = decode_dss_signature(key.sign(signing_input.encode("ascii"), _ECDSA))
    raw = r.to_bytes(_COORDINATE, "big") + s.to_bytes(_COORDINATE, "big")
    return f"{signing_input}.{b64url(raw)}"


@dataclass(frozen=True)
class Compact:
    """A token split into its parts; nothing in it is trusted until :func:`check` passes."""

    header: dict[str, Any]
    signing_input: bytes
    payload_segment: str
    signature_segment: str

    @property
    def kid(self) -> str | None:
        kid = self.header.get("kid")
        return kid if isinstance(kid, str) else None


def split(token: str) -> Compact:
    """Split ``token`` and read its header; raise ``token.malformed`` unless it is three
    base64url segments with a JSON object for a header."""
    match = _COMPACT.fullmatch(token)
    if match is None:
        raise VerificationError("token.malformed", "not a compact JWS")
    header_segment, payload_segment, signature_segment = match.groups()
    if len(header_segment) > MAX_HEADER_BYTES * 4 // 3 + 4:
        raise VerificationError("token.malformed", "header too large")
    try:
        header = msgspec.json.decode(_unb64url(header_segment, "header"))
    except msgspec.DecodeError:
        raise VerificationError("token.malformed", "header is not JSON") from None
    if not isinstance(header, dict):
        raise VerificationError("token.malformed", "header is not an object")
    signing_input = token[: len(header_segment) + 1 + len(payload_segment)].encode("ascii")
    return Compact(header, signing_input, payload_segment, signature_segment)


def check(parts: Compact, key: ec.EllipticCurvePublicKey) -> None:
    """Raise ``token.invalid`` unless ``key`` signed ``parts`` with ES256 and the header
    asks for nothing else (no other algorithm, no critical extensions)."""
    if parts.header.get("alg") != ALGORITHM:
        raise VerificationError("token.invalid", f"alg must be {ALGORITHM}")
    if "crit" in parts.header:
        raise VerificationError("token.invalid", "critical header extensions not supported")
    try:
        signature = _unb64url(parts.signature_segment, "signature")
    except VerificationError:
        raise VerificationError("token.invalid", "the signature is not base64url") from None
    if len(signature) != 2 * _COORDINATE:
        raise VerificationError("token.invalid", "an ES256 signature is 64 bytes")
    r = int.from_bytes(signature[:_COORDINATE], "big")
    s = int.from_bytes(signature[_COORDINATE:], "big")
    try:
        key.verify(encode_dss_signature(r, s), parts.signing_input, _ECDSA)
    except InvalidSignature:
        raise VerificationError("token.invalid", "the signature does not verify") from None


def payload(payload_segment: str) -> dict[str, Any]:
    """The claims of a token whose signature has been checked: a fresh dict on every call,
    so no caller can change what another reads."""
    data = _unb64url(payload_segment, "payload")
    try:
        check_depth(data, "token.malformed")
        claims = msgspec.json.decode(data)
    except (msgspec.DecodeError, ParseError):
        raise VerificationError("token.invalid", "payload is not bounded JSON") from None
    if not isinstance(claims, dict):
        raise VerificationError("token.invalid", "payload is not a JSON object")
    return claims
