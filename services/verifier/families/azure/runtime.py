"""The HCL runtime data: the JSON whose digest the hardware report binds, carrying the vTPM AK.

    {"keys": [{"kid": "HCLAkPub", "kty": "RSA", "n": "<base64url>", "e": "<base64url>", ...},
              {"kid": "HCLEkPub", ...}],
     "vm-configuration": {"secure-boot": true, "tpm-enabled": true, "vmUniqueId": "...", ...},
     "user-data": "<hex, 64 bytes>"}

Only ``keys`` is required. The AK (``HCLAkPub``) is what makes the vTPM quote hardware-rooted:
the SNP/TD report signs the digest of these exact bytes, so the key inside is as trustworthy as
the hardware report. The JWK is decoded strictly (RSA only, base64url without padding, as
RFC 7517/7518 require). Errors are :class:`ParseError` ``az.runtime_data_invalid``.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from cryptography.hazmat.primitives.asymmetric import rsa

from services.mesh.boundedjson import check_depth
from services.mesh.errors import ParseError

AK_KEY_ID = "HCLAkPub"
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_Text = Annotated[str, msgspec.Meta(max_length=4096)]


class _Jwk(msgspec.Struct, frozen=True):
    kty: _Text
    kid: _Text | None = None
    n: _Text | None = None
    e: _Text | None = None


class _RuntimeJson(msgspec.Struct, frozen=True):
    keys: Annotated[list[_Jwk], msgspec.Meta(max_length=16)]
    vm_configuration: dict[str, Any] | None = msgspec.field(default=None, name="vm-configuration")
    user_data: _Text | None = msgspec.field(default=None, name="user-data")


_DECODER = msgspec.json.Decoder(_RuntimeJson)


@dataclass(frozen=True)
class RuntimeData:
    """The decoded runtime data: the AK, the VM configuration and the user data."""

    ak: rsa.RSAPublicKey
    vm_configuration: dict[str, Any] = field(default_factory=dict)
    user_data: bytes | None = None


def _b64url_int(text: str, what: str) -> int:
    if not text or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ParseError("az.runtime_data_invalid", f"HCLAkPub {what} is not base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ParseError("az.runtime_data_invalid", f"HCLAkPub {what} is not base64url") from exc
    return int.from_bytes(raw, "big")


def parse_runtime_data(data: bytes) -> RuntimeData:
    """Decode the runtime data and the RSA AK in it; raises ``ParseError``."""
    check_depth(data, "az.runtime_data_invalid")
    try:
        doc = _DECODER.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ParseError("az.runtime_data_invalid", f"runtime data is not JSON: {exc}") from None
    found = [k for k in doc.keys if k.kid == AK_KEY_ID]
    if len(found) != 1:
        raise ParseError("az.runtime_data_invalid", f"{len(found)} HCLAkPub keys in runtime data")
    jwk = found[0]
    if jwk.kty != "RSA" or jwk.n is None or jwk.e is None:
        raise ParseError("az.runtime_data_invalid", "HCLAkPub is not an RSA JWK")
    modulus, exponent = _b64url_int(jwk.n, "n"), _b64url_int(jwk.e, "e")
    if modulus.bit_length() < 2048 or exponent < 3 or exponent % 2 == 0:
        raise ParseError("az.runtime_data_invalid", "HCLAkPub is not a usable RSA key")
    try:
        key = rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except ValueError as exc:
        raise ParseError("az.runtime_data_invalid", "HCLAkPub is not an RSA key") from exc
    user_data = None
    if doc.user_data is not None:
        if not re.fullmatch(r"(?:[0-9a-fA-F]{2})*", doc.user_data):
            raise ParseError("az.runtime_data_invalid", "user-data is not hex")
        user_data = bytes.fromhex(doc.user_data)
    return RuntimeData(key, dict(doc.vm_configuration or {}), user_data)
