"""Arm CCA attestation token: bytes -> typed claims, per the RMM spec (DEN0137, section A7).

A CCA token is a CBOR tag 399 map with exactly two entries, each a byte string holding a tagged
COSE_Sign1 (``bstr .cbor COSE_Sign1_Tagged``)::

    44234  platform token   signed by the CPAK (the platform attestation key)
    44241  realm token      signed by the RAK (the realm attestation key it carries itself)

Platform claims (all mandatory but 2400)::

    265 profile (text)     10 challenge = hash of the RAK (32/48/64 bytes)
    2396 implementation id (32 bytes)     256 instance id (33 bytes, UEID type 0x01)
    2401 config (bytes)    2395 lifecycle (uint16, a PSA/CCA security lifecycle state)
    2399 software components [+ {1 type, 2 measurement, 4 version, 5 signer id, 6 hash algo}]
    2400 verification service (text)      2402 hash algo id (text)

Realm claims (all mandatory but 265)::

    10 challenge (64 bytes)               44235 personalization value (64 bytes)
    44238 initial measurement (RIM)       44239 extensible measurements (REM0-3)
    44236 hash algo id (text)             44237 RAK public key (raw EC point or COSE_Key)
    44240 RAK hash algo id (text)         265 realm profile (text)

Unknown integer claims are ignored, as EAT requires; text-keyed claims (CCA defines none) too.
The lifecycle must lie in one of the states of the PSA security lifecycle that CCA adopts (see
:data:`LIFECYCLE_STATES`; the low byte is an IMPLEMENTATION DEFINED sub-state). Codes:
``cca.token_malformed`` (the tag 399 collection), ``cca.cose_malformed`` (a COSE_Sign1) and
``cca.schema_invalid`` (a claim), all :class:`ParseError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

from services.mesh.errors import ParseError
from services.verifier.families import cose

__all__ = [
    "LIFECYCLE_STATES",
    "CcaToken",
    "PlatformClaims",
    "RealmClaims",
    "SwComponent",
    "lifecycle_state",
    "parse_token",
]

CCA_TOKEN_TAG = 399
PLATFORM_TOKEN = 44234
REALM_TOKEN = 44241
MAX_TOKEN_SIZE = 64 * 1024
MAX_SW_COMPONENTS = 64
MAX_TEXT = 256
MAX_CONFIG = 1024
MEASUREMENT_SIZES = (32, 48, 64)

NONCE, INSTANCE_ID, PROFILE = 10, 256, 265
LIFECYCLE, IMPLEMENTATION_ID, SW_COMPONENTS = 2395, 2396, 2399
VERIFICATION_SERVICE, CONFIG, HASH_ALGO = 2400, 2401, 2402
PERSONALIZATION, REALM_HASH_ALGO, REALM_PUBLIC_KEY = 44235, 44236, 44237
REALM_RIM, REALM_REMS, REALM_PUBLIC_KEY_HASH_ALGO = 44238, 44239, 44240

LIFECYCLE_STATES: dict[int, str] = {
    0x0000: "unknown",
    0x1000: "assembly-and-test",
    0x2000: "cca-platform-rot-provisioning",
    0x3000: "secured",
    0x4000: "non-cca-platform-rot-debug",
    0x5000: "recoverable-cca-platform-rot-debug",
    0x6000: "decommissioned",
}
"""Main state (high byte) -> name; each state spans 0xNN00-0xNNFF."""
DEBUG_LIFECYCLES = frozenset({"non-cca-platform-rot-debug", "recoverable-cca-platform-rot-debug"})

SCHEMA = "cca.schema_invalid"
_MALFORMED = "cca.token_malformed"


def lifecycle_state(value: int) -> str | None:
    """The lifecycle state name of ``value``, or ``None`` outside every defined range."""
    return LIFECYCLE_STATES.get(value & 0xFF00) if 0 <= value <= 0xFFFF else None


@dataclass(frozen=True)
class SwComponent:
    """One measured platform software component (claim 2399 entry)."""

    measurement: bytes
    signer_id: bytes
    type: str | None = None
    version: str | None = None
    hash_algo: str | None = None


@dataclass(frozen=True)
class PlatformClaims:
    profile: str
    challenge: bytes
    implementation_id: bytes
    instance_id: bytes
    config: bytes
    lifecycle: int
    sw_components: tuple[SwComponent, ...]
    hash_algo_id: str
    verification_service: str | None = None

    @property
    def lifecycle_state(self) -> str:
        return lifecycle_state(self.lifecycle) or "invalid"


@dataclass(frozen=True)
class RealmClaims:
    challenge: bytes
    personalization_value: bytes
    initial_measurement: bytes
    extensible_measurements: tuple[bytes, ...]
    hash_algo_id: str
    public_key: bytes
    public_key_hash_algo_id: str
    profile: str | None = None


@dataclass(frozen=True)
class CcaToken:
    """Both signed tokens and their claims."""

    platform: cose.CoseSign1
    realm: cose.CoseSign1
    platform_claims: PlatformClaims
    realm_claims: RealmClaims


def parse_token(data: bytes) -> CcaToken:
    """Parse a CCA attestation token (see the module docstring); :class:`ParseError`."""
    value = cose.decode_cbor(
        data,
        what="CCA token",
        code=_MALFORMED,
        max_size=MAX_TOKEN_SIZE,
        tags=frozenset({CCA_TOKEN_TAG}),
    )
    if not isinstance(value, cbor2.CBORTag) or value.tag != CCA_TOKEN_TAG:
        raise ParseError(_MALFORMED, "not a CBOR tag 399 (CCA attestation token) collection")
    collection = value.value
    if not isinstance(collection, Mapping) or set(collection) != {PLATFORM_TOKEN, REALM_TOKEN}:
        raise ParseError(_MALFORMED, "the collection must map exactly 44234 and 44241 to tokens")
    signed = {}
    for label, name in ((PLATFORM_TOKEN, "platform token"), (REALM_TOKEN, "realm token")):
        inner = collection[label]
        if not isinstance(inner, bytes):
            raise ParseError(_MALFORMED, f"{name} is not a byte string wrapping a COSE_Sign1")
        signed[label] = cose.parse_sign1(
            inner, family="cca", max_size=MAX_TOKEN_SIZE, require_tag=True, what=name
        )
    platform, realm = signed[PLATFORM_TOKEN], signed[REALM_TOKEN]
    return CcaToken(
        platform=platform,
        realm=realm,
        platform_claims=parse_platform_claims(platform.payload),
        realm_claims=parse_realm_claims(realm.payload),
    )


def _claims_map(payload: bytes, what: str) -> Mapping[Any, Any]:
    value = cose.decode_cbor(payload, what=what, code="cca.cose_malformed", max_size=MAX_TOKEN_SIZE)
    if not isinstance(value, Mapping):
        raise ParseError(SCHEMA, f"{what} is not a CBOR map")
    return value


def _get(claims: Mapping[Any, Any], label: int, name: str) -> Any:
    if claims.get(label) is None:
        raise ParseError(SCHEMA, f"mandatory claim {name} ({label}) is missing")
    return claims[label]


def _bytes(value: Any, name: str, sizes: tuple[int, ...] | range) -> bytes:
    if not isinstance(value, bytes) or len(value) not in sizes:
        shown = "/".join(map(str, sizes)) if isinstance(sizes, tuple) else f"at most {sizes[-1]}"
        raise ParseError(SCHEMA, f"{name} must be a byte string of {shown} bytes")
    return value


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT:
        raise ParseError(SCHEMA, f"{name} must be a text string of 1 to {MAX_TEXT} characters")
    return value


def parse_platform_claims(payload: bytes) -> PlatformClaims:
    """Parse and check the platform token's claims map."""
    claims = _claims_map(payload, "platform claims")
    instance_id = _bytes(_get(claims, INSTANCE_ID, "instance id"), "instance id", (33,))
    if instance_id[0] != 0x01:
        raise ParseError(SCHEMA, "instance id is not a UEID of type RAND (first byte 0x01)")
    lifecycle = _get(claims, LIFECYCLE, "lifecycle")
    if (
        not isinstance(lifecycle, int)
        or isinstance(lifecycle, bool)
        or not (lifecycle_state(lifecycle))
    ):
        raise ParseError(SCHEMA, f"lifecycle {lifecycle!r:.20} is in no defined lifecycle state")
    service = claims.get(VERIFICATION_SERVICE)
    return PlatformClaims(
        profile=_text(_get(claims, PROFILE, "profile"), "profile"),
        challenge=_bytes(_get(claims, NONCE, "challenge"), "challenge", MEASUREMENT_SIZES),
        implementation_id=_bytes(
            _get(claims, IMPLEMENTATION_ID, "implementation id"), "implementation id", (32,)
        ),
        instance_id=instance_id,
        config=_bytes(_get(claims, CONFIG, "config"), "config", range(MAX_CONFIG + 1)),
        lifecycle=lifecycle,
        sw_components=_sw_components(_get(claims, SW_COMPONENTS, "software components")),
        hash_algo_id=_text(_get(claims, HASH_ALGO, "hash algo id"), "hash algo id"),
        verification_service=None if service is None else _text(service, "verification service"),
    )


def _sw_components(value: Any) -> tuple[SwComponent, ...]:
    if not cose.is_array(value) or not 1 <= len(value) <= MAX_SW_COMPONENTS:
        raise ParseError(SCHEMA, f"software components must be 1 to {MAX_SW_COMPONENTS} entries")
    out = []
    for index, entry in enumerate(value):
        name = f"software component {index}"
        if not isinstance(entry, Mapping):
            raise ParseError(SCHEMA, f"{name} is not a map")
        optional = {key: entry.get(key) for key in (1, 4, 6)}
        for key, item in optional.items():
            if item is not None:
                _text(item, f"{name} claim {key}")
        out.append(
            SwComponent(
                measurement=_bytes(entry.get(2), f"{name} measurement", MEASUREMENT_SIZES),
                signer_id=_bytes(entry.get(5), f"{name} signer id", MEASUREMENT_SIZES),
                type=optional[1],
                version=optional[4],
                hash_algo=optional[6],
            )
        )
    return tuple(out)


def parse_realm_claims(payload: bytes) -> RealmClaims:
    """Parse and check the realm token's claims map."""
    claims = _claims_map(payload, "realm claims")
    rems = _get(claims, REALM_REMS, "extensible measurements")
    if not cose.is_array(rems) or len(rems) != 4:
        raise ParseError(SCHEMA, "extensible measurements must be an array of 4")
    rak = _get(claims, REALM_PUBLIC_KEY, "public key")
    if not isinstance(rak, bytes) or not 0 < len(rak) <= 512:
        raise ParseError(SCHEMA, "realm public key must be a byte string of 1 to 512 bytes")
    profile = claims.get(PROFILE)
    return RealmClaims(
        challenge=_bytes(_get(claims, NONCE, "challenge"), "realm challenge", (64,)),
        personalization_value=_bytes(
            _get(claims, PERSONALIZATION, "personalization value"), "personalization value", (64,)
        ),
        initial_measurement=_bytes(
            _get(claims, REALM_RIM, "initial measurement"),
            "initial measurement",
            MEASUREMENT_SIZES,
        ),
        extensible_measurements=tuple(
            _bytes(rem, f"REM{i}", MEASUREMENT_SIZES) for i, rem in enumerate(rems)
        ),
        hash_algo_id=_text(_get(claims, REALM_HASH_ALGO, "hash algo id"), "realm hash algo id"),
        public_key=rak,
        public_key_hash_algo_id=_text(
            _get(claims, REALM_PUBLIC_KEY_HASH_ALGO, "public key hash algo id"),
            "public key hash algo id",
        ),
        profile=None if profile is None else _text(profile, "realm profile"),
    )
