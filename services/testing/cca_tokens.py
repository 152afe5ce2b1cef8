"""Real-format Arm CCA attestation tokens signed by test keys, with one knob per way to break one.

A token is built exactly as the RMM emits it: CBOR tag 399 around a map whose 44234 and 44241
entries are byte strings wrapping tagged COSE_Sign1 structures; the platform token is signed by
a test CPAK, the realm token by a test RAK whose public key the realm token carries (a raw SEC1
point, or a COSE_Key), and the platform challenge is the RAK's hash. The CPAK is handed to the
verifier as ``cpak.jwk.json`` collateral, as a real deployment would provision it.

Claims can be overridden by label (``None`` removes one), the signers swapped, the binding broken
and the envelope reshaped, so each verification step can be failed on its own.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.testing.amd_pki import ec_key
from services.verifier.families import cose
from services.verifier.families.cca import parse as p
from services.verifier.families.cca.keys import HASHES

SECURED = 0x3000
PLATFORM_PROFILE = "tag:arm.com,2023:cca_platform#1.0.0"
REALM_PROFILE = "tag:arm.com,2023:realm#1.0.0"
_CRV = {"secp256r1": ("P-256", 1), "secp384r1": ("P-384", 2), "secp521r1": ("P-521", 3)}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _coordinates(key: ec.EllipticCurvePublicKey) -> tuple[bytes, bytes]:
    point = key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    size = (len(point) - 1) // 2
    return point[1 : 1 + size], point[1 + size :]


def jwk(key: ec.EllipticCurvePublicKey, **extra: Any) -> bytes:
    """``key`` as the JSON Web Key a deployment configures as ``cpak.jwk.json``."""
    x, y = _coordinates(key)
    body = {"kty": "EC", "crv": _CRV[key.curve.name][0], "x": _b64url(x), "y": _b64url(y)}
    body.update(extra)
    return json.dumps(body).encode()


def rak_bytes(key: ec.EllipticCurvePublicKey, encoding: str = "raw") -> bytes:
    """Realm claim 44237: the raw uncompressed point, or a CBOR COSE_Key (``"cose_key"``)."""
    if encoding == "raw":
        return key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    x, y = _coordinates(key)
    return cbor2.dumps({1: 2, -1: _CRV[key.curve.name][1], -2: x, -3: y})


def sw_components(count: int = 3) -> list[dict[int, Any]]:
    """Measured boot components as a CCA platform reports them (claim 2399)."""
    names = ["RSE_BL1_2", "RSE_BL2", "RSE_S", "AP_BL1", "AP_BL2", "AP_BL31", "RMM"]
    out = []
    for index in range(count):
        name = names[index % len(names)]
        out.append(
            {
                1: name,
                2: hashlib.sha256(f"measurement:{name}:{index}".encode()).digest(),
                4: "1.0.0",
                5: hashlib.sha256(b"attestmesh test firmware signer").digest(),
                6: "sha-256",
            }
        )
    return out


@dataclass
class CcaTestPlatform:
    """A CCA platform (CPAK) hosting one realm (RAK), producing tokens on demand."""

    __test__ = False

    cpak: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec_key("cca:cpak"))
    rak: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec_key("cca:rak"))
    initial_measurement: bytes = field(
        default_factory=lambda: hashlib.sha512(b"attestmesh test realm image").digest()
    )
    personalization_value: bytes = bytes(64)
    implementation_id: bytes = hashlib.sha256(b"attestmesh test CCA platform").digest()
    instance_id: bytes = b"\x01" + hashlib.sha256(b"attestmesh test CCA instance").digest()

    def collateral(self, **extra: Any) -> dict[str, bytes]:
        """The CPAK as the verifier's collateral (``extra`` adds JWK members)."""
        return {"cpak.jwk.json": jwk(self.cpak.public_key(), **extra)}

    def platform_claims(self, rak_claim: bytes, rak_hash: str) -> dict[int, Any]:
        return {
            p.PROFILE: PLATFORM_PROFILE,
            p.NONCE: hashlib.new(HASHES[rak_hash], rak_claim).digest(),
            p.IMPLEMENTATION_ID: self.implementation_id,
            p.INSTANCE_ID: self.instance_id,
            p.CONFIG: b"\xcf\xcf\xcf\xcf",
            p.LIFECYCLE: SECURED,
            p.SW_COMPONENTS: sw_components(),
            p.VERIFICATION_SERVICE: "https://attestmesh.invalid/verify",
            p.HASH_ALGO: "sha-256",
        }

    def realm_claims(self, challenge: bytes, rak_claim: bytes, rak_hash: str) -> dict[int, Any]:
        return {
            p.PROFILE: REALM_PROFILE,
            p.NONCE: challenge,
            p.PERSONALIZATION: self.personalization_value,
            p.REALM_RIM: self.initial_measurement,
            p.REALM_REMS: [bytes(64)] * 4,
            p.REALM_HASH_ALGO: "sha-512",
            p.REALM_PUBLIC_KEY: rak_claim,
            p.REALM_PUBLIC_KEY_HASH_ALGO: rak_hash,
        }

    def token(
        self,
        challenge: bytes,
        *,
        lifecycle: int = SECURED,
        rak_encoding: str = "raw",
        rak_hash: str = "sha-256",
        platform: Mapping[Any, Any] | None = None,
        realm: Mapping[Any, Any] | None = None,
        platform_signer: ec.EllipticCurvePrivateKey | None = None,
        realm_signer: ec.EllipticCurvePrivateKey | None = None,
        platform_alg: int | None = None,
        realm_alg: int | None = None,
        tagged: bool = True,
        wrap: bool = True,
        collection: Mapping[Any, Any] | None = None,
    ) -> bytes:
        """A token whose realm challenge is ``challenge``; every knob breaks one thing."""
        rak_claim = rak_bytes(self.rak.public_key(), rak_encoding)
        platform_claims = self.platform_claims(rak_claim, rak_hash)
        platform_claims[p.LIFECYCLE] = lifecycle
        realm_claims = self.realm_claims(challenge, rak_claim, rak_hash)
        _apply(platform_claims, platform)
        _apply(realm_claims, realm)
        platform_token = cose.sign_sign1(
            cbor2.dumps(platform_claims),
            platform_signer or self.cpak,
            alg=platform_alg,
            tagged=tagged,
        )
        realm_token = cose.sign_sign1(
            cbor2.dumps(realm_claims), realm_signer or self.rak, alg=realm_alg, tagged=tagged
        )
        body: dict[int, Any] = {
            p.PLATFORM_TOKEN: platform_token if wrap else cbor2.loads(platform_token),
            p.REALM_TOKEN: realm_token if wrap else cbor2.loads(realm_token),
        }
        _apply(body, collection)
        return cbor2.dumps(cbor2.CBORTag(p.CCA_TOKEN_TAG, body))


def _apply(claims: dict[Any, Any], changes: Mapping[Any, Any] | None) -> None:
    for label, value in (changes or {}).items():
        if value is None:
            claims.pop(label, None)
        else:
            claims[label] = value
