"""The two CCA keys: the CPAK (configured, as a JWK) and the RAK (carried in the realm token).

The CPAK is the trust anchor of a CCA platform, so it arrives as collateral
(``cpak.jwk.json``, an RFC 7517 JSON Web Key) rather than from the evidence. Only public EC keys
on P-256, P-384 or P-521 are accepted, with ``x``/``y`` in unpadded base64url of exactly the
curve's size; a JWK carrying a private ``d`` is refused, since collateral is no place for a
private key. Its RFC 7638 thumbprint names the anchor in claims.

The RAK travels in realm claim 44237 either as a raw uncompressed SEC1 point (the original
profile) or as a CBOR-encoded COSE_Key (later profiles); the leading byte tells them apart
(``0x04`` versus a CBOR map). The platform token binds exactly those bytes by hash.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from services.mesh.boundedjson import check_depth
from services.mesh.errors import ParseError
from services.verifier.families import cose

MAX_JWK_SIZE = 8 * 1024
_JWK_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}
_POINT_CURVES: dict[int, ec.EllipticCurve] = {
    1 + 2 * 32: ec.SECP256R1(),
    1 + 2 * 48: ec.SECP384R1(),
    1 + 2 * 66: ec.SECP521R1(),
}
HASHES: dict[str, str] = {"sha-256": "sha256", "sha-384": "sha384", "sha-512": "sha512"}
"""IANA "Named Information Hash Algorithm" names -> hashlib names, for the RAK binding."""


@dataclass(frozen=True)
class Cpak:
    """The configured platform attestation key and its RFC 7638 thumbprint."""

    key: ec.EllipticCurvePublicKey
    thumbprint: str


def _b64url(value: Any, name: str, size: int) -> bytes:
    if not isinstance(value, str) or "=" in value:
        raise ParseError("cca.cpak_invalid", f"JWK {name} must be unpadded base64url text")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ParseError("cca.cpak_invalid", f"JWK {name} is not base64url") from exc
    if len(raw) != size:
        raise ParseError("cca.cpak_invalid", f"JWK {name} must decode to {size} bytes")
    return raw


@functools.lru_cache(maxsize=64)
def parse_cpak(data: bytes) -> Cpak:
    """Parse ``cpak.jwk.json``; :class:`ParseError` with code ``cca.cpak_invalid``.

    Memoised on the exact bytes: every token of a platform is checked against the same CPAK.
    """
    if len(data) > MAX_JWK_SIZE:
        raise ParseError("cca.cpak_invalid", f"JWK is larger than {MAX_JWK_SIZE} bytes")
    check_depth(data, "cca.cpak_invalid")
    try:
        jwk = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ParseError("cca.cpak_invalid", "CPAK is not JSON") from exc
    if not isinstance(jwk, Mapping):
        raise ParseError("cca.cpak_invalid", "CPAK JWK is not a JSON object")
    if jwk.get("kty") != "EC":
        raise ParseError("cca.cpak_invalid", "CPAK JWK kty is not EC")
    if "d" in jwk:
        raise ParseError("cca.cpak_invalid", "CPAK JWK carries a private key (d)")
    crv = jwk.get("crv")
    curve = _JWK_CURVES.get(crv) if isinstance(crv, str) else None
    if curve is None:
        raise ParseError("cca.cpak_invalid", "CPAK JWK crv is not P-256, P-384 or P-521")
    size = (curve.key_size + 7) // 8
    x, y = _b64url(jwk.get("x"), "x", size), _b64url(jwk.get("y"), "y", size)
    key = cose.ec_from_point(b"\x04" + x + y, curve, code="cca.cpak_invalid")
    canonical = json.dumps(
        {"crv": crv, "kty": "EC", "x": jwk["x"], "y": jwk["y"]}, separators=(",", ":")
    )
    digest = hashlib.sha256(canonical.encode()).digest()
    return Cpak(key, base64.urlsafe_b64encode(digest).rstrip(b"=").decode())


def parse_rak(data: bytes) -> ec.EllipticCurvePublicKey:
    """The RAK from realm claim 44237 (raw point or COSE_Key); code ``cca.rak_invalid``."""
    if data[:1] == b"\x04":
        curve = _POINT_CURVES.get(len(data))
        if curve is None:
            raise ParseError("cca.rak_invalid", f"a {len(data)}-byte point fits no NIST curve")
        return cose.ec_from_point(data, curve, code="cca.rak_invalid")
    value = cose.decode_cbor(data, what="RAK COSE_Key", code="cca.rak_invalid", max_size=512)
    if not isinstance(value, Mapping):
        raise ParseError("cca.rak_invalid", "RAK is neither an EC point nor a COSE_Key map")
    return cose.ec_from_cose_key(value, code="cca.rak_invalid")


def rak_digest(rak: bytes, algorithm: str) -> bytes | None:
    """``algorithm``(``rak``) for a supported hash name, else ``None``."""
    name = HASHES.get(algorithm)
    return None if name is None else hashlib.new(name, rak).digest()
