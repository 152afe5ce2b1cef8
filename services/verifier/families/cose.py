"""COSE_Sign1 (RFC 9052/9053) for the families whose evidence is CBOR: Nitro and Arm CCA.

Why not ``pycose``: it does not work with ``cbor2`` 6 and refuses the *untagged* COSE_Sign1 the
Nitro Secure Module emits. What a verifier needs is small and is all here:

* :func:`decode_cbor` -- bounded decoding. Attacker-controlled CBOR is first walked by a small
  structural scanner that rejects what ``cbor2`` would happily accept: trailing bytes, nesting
  deeper than a few levels, tags the format does not use (``cbor2`` would otherwise build
  datetimes, bignums or shared references from them), map keys other than integers and text,
  breaks out of place, and declared lengths the input cannot hold (so a three-byte input cannot
  make the decoder reserve room for four billion items). Indefinite-length items are accepted:
  the NSM emits them, and signatures cover the bytes as encoded. Only then does ``cbor2`` build the
  value, with duplicate map keys refused. Every failure is a :class:`ParseError`.
* :func:`parse_sign1` -- the four-element array, tagged (18) or not, with the protected header
  decoded; ``alg`` must be protected (an unprotected ``alg`` could be swapped without breaking the
  signature) and ``crit`` is refused because no critical header is understood here.
* :func:`sig_structure` and :func:`verify_sign1` -- ``["Signature1", protected, external_aad,
  payload]`` verified with ES256/ES384/ES512, whose signatures are raw ``r || s`` big-endian
  integers of the curve's size rather than DER. The key's curve must be the algorithm's.
* :func:`sign_sign1` and :func:`ec_from_cose_key` -- the inverse, for simulators and builders,
  and COSE_Key (EC2) public keys.

Error codes are the caller's family prefix plus ``cose_malformed`` (structure), so a Nitro
verdict says ``nitro.cose_malformed`` and a CCA one ``cca.cose_malformed``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from services.mesh.errors import ParseError

__all__ = [
    "COSE_SIGN1_TAG",
    "Algorithm",
    "CoseSign1",
    "algorithm",
    "decode_cbor",
    "ec_from_cose_key",
    "ec_from_point",
    "is_array",
    "parse_sign1",
    "sig_structure",
    "sign_sign1",
    "verify_sign1",
]

COSE_SIGN1_TAG = 18
HEADER_ALG = 1
HEADER_CRIT = 2
MAX_DEPTH = 8
MAX_ITEMS = 4096
"""Most data items one decode may hold: a Nitro document has ~60, a CCA token ~150."""


class Algorithm(enum.IntEnum):
    """The COSE ECDSA algorithms (RFC 9053 section 2.1) and what each needs."""

    ES256 = -7
    ES384 = -35
    ES512 = -36

    @property
    def curve(self) -> ec.EllipticCurve:
        return {-7: ec.SECP256R1(), -35: ec.SECP384R1(), -36: ec.SECP521R1()}[self.value]

    @property
    def hash(self) -> hashes.HashAlgorithm:
        return {-7: hashes.SHA256(), -35: hashes.SHA384(), -36: hashes.SHA512()}[self.value]

    @property
    def component_size(self) -> int:
        """Bytes of each of r and s in the raw signature: the curve order's size."""
        return {-7: 32, -35: 48, -36: 66}[self.value]


_BREAK = 0xFF
_INDEFINITE = -1
"""Marks an open array or map of indefinite length on the scanner's stack: it ends at a break."""


def _scan(data: bytes, what: str, code: str, tags: frozenset[int]) -> int:
    """Walk the CBOR structure of ``data`` once; returns where its first item ends.

    Iterative (an explicit stack of the arrays, maps and tags still open), so hostile nesting
    cannot exhaust Python's stack, and cheap per item, because it runs on every byte of attacker
    input before ``cbor2`` builds anything. Indefinite-length arrays, maps and strings (RFC 8949
    section 3.2) are accepted because current NSM firmware emits them and a signature covers the
    encoded bytes whatever their length form; each chunk and break still counts towards the item
    bound, so a stream of empty chunks cannot make the scan unbounded.
    """
    size = len(data)
    pos = items = 0
    # Per open container: [items still owed, or _INDEFINITE; 1 if a map; items seen so far].
    stack: list[list[int]] = []

    def fail(detail: str) -> ParseError:
        return ParseError(code, f"{what}: {detail}")

    def head(expect_major: int | None = None) -> tuple[int, int, int]:
        """Read one item head at ``pos``: (major type, additional information, argument)."""
        nonlocal pos, items
        items += 1
        if items > MAX_ITEMS:
            raise fail(f"more than {MAX_ITEMS} CBOR data items")
        if pos >= size:
            raise fail("truncated CBOR")
        initial = data[pos]
        major, info = initial >> 5, initial & 0x1F
        pos += 1
        if expect_major is not None and initial != _BREAK and major != expect_major:
            raise fail("a chunk of an indefinite-length string has another major type")
        if info < 24:
            return major, info, info
        if info < 28:
            width = 1 << (info - 24)
            if pos + width > size:
                raise fail("truncated CBOR")
            arg = int.from_bytes(data[pos : pos + width], "big")
            pos += width
            return major, info, arg
        if info == 31 and (major in (2, 3, 4, 5) or initial == _BREAK):
            return major, info, _INDEFINITE
        raise fail(f"reserved additional information (initial byte 0x{initial:02x})")

    while True:
        if len(stack) > MAX_DEPTH:
            raise fail(f"CBOR nested deeper than {MAX_DEPTH}")
        major, info, arg = head()
        if major == 7 and info == 31:
            parent = stack[-1] if stack else None
            if parent is None or parent[0] != _INDEFINITE:
                raise fail("CBOR break outside an indefinite-length array or map")
            if parent[1] and parent[2] % 2:
                raise fail("CBOR break between a map key and its value")
            stack.pop()
        else:
            if stack:
                parent = stack[-1]
                key_slot = parent[2] % 2 == 0
                if parent[1] and key_slot and major not in (0, 1, 3):
                    raise fail("CBOR map key is not an integer or a text string")
                parent[2] += 1
                if parent[0] != _INDEFINITE:
                    parent[0] -= 1
            remaining = size - pos
            if major in (2, 3) and arg == _INDEFINITE:
                while True:
                    _, chunk_info, chunk = head(expect_major=major)
                    if chunk_info == 31:
                        if chunk != _INDEFINITE or data[pos - 1] != _BREAK:
                            raise fail("a chunk of an indefinite-length string is indefinite")
                        break
                    if chunk > size - pos:
                        raise fail("CBOR string longer than the input")
                    pos += chunk
            elif major in (2, 3):
                if arg > remaining:
                    raise fail("CBOR string longer than the input")
                pos += arg
            elif major == 4:
                if arg > remaining:
                    raise fail("CBOR array longer than the input")
                if arg:
                    stack.append([arg, 0, 0])
            elif major == 5:
                if arg != _INDEFINITE and 2 * arg > remaining:
                    raise fail("CBOR map longer than the input")
                if arg:
                    stack.append([arg if arg == _INDEFINITE else 2 * arg, 1, 0])
            elif major == 6:
                if arg not in tags:
                    raise fail(f"CBOR tag {arg} is not expected here")
                stack.append([1, 0, 0])
            elif major == 7 and not (20 <= info <= 23 or info in (25, 26, 27)):
                raise fail(f"CBOR simple value {arg} is not accepted")
        while stack and stack[-1][0] == 0:
            stack.pop()
        if not stack:
            return pos


def decode_cbor(
    data: bytes,
    *,
    what: str,
    code: str,
    max_size: int,
    tags: frozenset[int] = frozenset(),
) -> Any:
    """Decode exactly one bounded CBOR item spanning all of ``data``; :class:`ParseError` else.

    ``tags`` are the CBOR tags the format allows (any other is refused); ``code`` is the reason
    code of every failure and ``what`` names the structure in messages.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ParseError(code, f"{what}: expected bytes")
    data = bytes(data)
    if not data:
        raise ParseError(code, f"{what}: empty")
    if len(data) > max_size:
        raise ParseError(code, f"{what}: {len(data)} bytes, more than the {max_size} allowed")
    end = _scan(data, what, code, tags)
    if end != len(data):
        raise ParseError(code, f"{what}: {len(data) - end} trailing bytes after the CBOR item")
    try:
        return cbor2.loads(
            data, max_depth=MAX_DEPTH + 2, allow_indefinite=True, allow_duplicate_keys=False
        )
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError) as exc:
        raise ParseError(code, f"{what}: undecodable CBOR ({exc})") from exc


def is_array(value: object) -> bool:
    """A decoded CBOR array (``cbor2`` yields tuples inside tags, lists elsewhere)."""
    return isinstance(value, list | tuple)


@dataclass(frozen=True)
class CoseSign1:
    """A parsed COSE_Sign1; ``protected`` is the header's exact serialized bytes (signed)."""

    protected: bytes
    protected_header: Mapping[int | str, Any]
    unprotected_header: Mapping[int | str, Any]
    payload: bytes
    signature: bytes
    tagged: bool

    @property
    def alg(self) -> int | None:
        """The protected ``alg`` label's value (an int for the algorithms used here)."""
        value = self.protected_header.get(HEADER_ALG)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def to_be_signed(self, external_aad: bytes = b"") -> bytes:
        return sig_structure(self.protected, self.payload, external_aad)


def sig_structure(protected: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    """The ``Sig_structure`` for COSE_Sign1 (RFC 9052 section 4.4), CBOR-encoded."""
    return cbor2.dumps(["Signature1", protected, external_aad, payload])


def parse_sign1(
    data: bytes,
    *,
    family: str,
    max_size: int,
    require_tag: bool = False,
    what: str = "COSE_Sign1",
) -> CoseSign1:
    """Parse a COSE_Sign1 from at most ``max_size`` bytes.

    Tagged (18) and untagged forms are both accepted unless ``require_tag``. Raises
    :class:`ParseError` with code ``<family>.cose_malformed``.
    """
    code = f"{family}.cose_malformed"
    tags = frozenset({COSE_SIGN1_TAG})
    value = decode_cbor(data, what=what, code=code, max_size=max_size, tags=tags)
    tagged = isinstance(value, cbor2.CBORTag)
    if isinstance(value, cbor2.CBORTag):
        value = value.value
    elif require_tag:
        raise ParseError(code, f"{what}: COSE_Sign1 must carry CBOR tag 18")
    if not is_array(value) or len(value) != 4:
        raise ParseError(code, f"{what}: not a four-element COSE_Sign1 array")
    protected, unprotected, payload, signature = value
    if not isinstance(protected, bytes):
        raise ParseError(code, f"{what}: protected header is not a byte string")
    if not isinstance(unprotected, Mapping):
        raise ParseError(code, f"{what}: unprotected header is not a map")
    if not isinstance(payload, bytes):
        detail = "detached payload" if payload is None else "payload is not a byte string"
        raise ParseError(code, f"{what}: {detail}")
    if not isinstance(signature, bytes):
        raise ParseError(code, f"{what}: signature is not a byte string")
    header: Mapping[int | str, Any] = {}
    if protected:
        header = decode_cbor(
            protected, what=f"{what} protected header", code=code, max_size=len(protected)
        )
        if not isinstance(header, Mapping):
            raise ParseError(code, f"{what}: protected header is not a map")
    if HEADER_CRIT in header:
        raise ParseError(code, f"{what}: critical header parameters are not supported")
    if HEADER_ALG not in header:
        raise ParseError(code, f"{what}: alg is not in the protected header")
    if set(header) & set(unprotected):
        raise ParseError(code, f"{what}: a header label is both protected and unprotected")
    return CoseSign1(protected, header, dict(unprotected), payload, signature, tagged)


def algorithm(sign1: CoseSign1) -> Algorithm | None:
    """The signature algorithm if it is one of ES256/ES384/ES512, else ``None``."""
    alg = sign1.alg
    return Algorithm(alg) if alg is not None and alg in Algorithm._value2member_map_ else None


def verify_sign1(
    sign1: CoseSign1, key: ec.EllipticCurvePublicKey, *, external_aad: bytes = b""
) -> bool:
    """True when ``key`` signed ``sign1`` with its protected ECDSA algorithm; never raises.

    False for an unsupported algorithm, a key on another curve than the algorithm's, or a raw
    signature of the wrong length or with r or s out of range.
    """
    alg = algorithm(sign1)
    if alg is None or key.curve.name != alg.curve.name:
        return False
    size = alg.component_size
    if len(sign1.signature) != 2 * size:
        return False
    r = int.from_bytes(sign1.signature[:size], "big")
    s = int.from_bytes(sign1.signature[size:], "big")
    if r == 0 or s == 0:
        return False
    try:
        key.verify(encode_dss_signature(r, s), sign1.to_be_signed(external_aad), ec.ECDSA(alg.hash))
    except InvalidSignature:
        return False
    return True


def sign_sign1(
    payload: bytes,
    key: ec.EllipticCurvePrivateKey,
    *,
    alg: Algorithm | int | None = None,
    protected: Mapping[int | str, Any] | None = None,
    unprotected: Mapping[int | str, Any] | None = None,
    tagged: bool = False,
) -> bytes:
    """A COSE_Sign1 over ``payload`` by ``key`` (the inverse of parse + verify).

    ``alg`` defaults to the key's curve's algorithm; ``protected`` replaces the default
    ``{1: alg}`` header entirely (builders use it to produce malformed headers on purpose). The
    raw signature has the key's size, so a deliberately mismatched ``alg`` still encodes.
    """
    chosen = Algorithm(alg) if alg is not None else _alg_for_curve(key.curve)
    header = dict(protected) if protected is not None else {HEADER_ALG: int(chosen)}
    protected_bytes = cbor2.dumps(header) if header else b""
    to_sign = sig_structure(protected_bytes, payload)
    r, s = decode_dss_signature(key.sign(to_sign, ec.ECDSA(chosen.hash)))
    size = (key.curve.key_size + 7) // 8
    signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    body = [protected_bytes, dict(unprotected or {}), payload, signature]
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, body) if tagged else body)


def _alg_for_curve(curve: ec.EllipticCurve) -> Algorithm:
    for alg in Algorithm:
        if alg.curve.name == curve.name:
            return alg
    raise ValueError(f"no COSE ECDSA algorithm for curve {curve.name}")


_COSE_KEY_CURVES: dict[int, ec.EllipticCurve] = {
    1: ec.SECP256R1(),
    2: ec.SECP384R1(),
    3: ec.SECP521R1(),
}
_KTY_EC2 = 2


def ec_from_cose_key(key: Mapping[Any, Any], *, code: str) -> ec.EllipticCurvePublicKey:
    """An EC2 COSE_Key (RFC 9053 section 7.1) as a public key; :class:`ParseError` otherwise.

    Only uncompressed points (``y`` a byte string) are accepted; a private ``d`` is refused,
    because a key meant to be public must not carry its secret half.
    """
    if key.get(1) != _KTY_EC2:
        raise ParseError(code, "COSE_Key kty is not EC2 (2)")
    if -4 in key:
        raise ParseError(code, "COSE_Key carries a private key (d)")
    crv = key.get(-1)
    curve = _COSE_KEY_CURVES.get(crv) if isinstance(crv, int) else None
    x, y = key.get(-2), key.get(-3)
    if curve is None:
        raise ParseError(code, "COSE_Key crv is not P-256, P-384 or P-521")
    size = (curve.key_size + 7) // 8
    if not (isinstance(x, bytes) and isinstance(y, bytes) and len(x) == len(y) == size):
        raise ParseError(code, f"COSE_Key x and y must be {size}-byte strings")
    return ec_from_point(b"\x04" + x + y, curve, code=code)


def ec_from_point(point: bytes, curve: ec.EllipticCurve, *, code: str) -> ec.EllipticCurvePublicKey:
    """A public key from an uncompressed SEC1 point, checked to be on ``curve``."""
    size = (curve.key_size + 7) // 8
    if len(point) != 1 + 2 * size or point[0] != 0x04:
        raise ParseError(code, f"not an uncompressed {curve.name} point")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    except ValueError as exc:
        raise ParseError(code, f"point is not on {curve.name}") from exc
