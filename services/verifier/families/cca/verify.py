"""CCA verification: platform signature by the CPAK, realm signature by the RAK, their binding.

The chain of trust is short and has no certificates: the configured CPAK
(``options.collateral["cpak.jwk.json"]``) signs the platform token; the platform token's
challenge (claim 10) is the hash of the RAK, with the hash named by realm claim 44240; the RAK,
carried in the realm token (claim 44237), signs the realm token. Each step is checked and every
failing one reported, as a :class:`~services.verifier.families.base.Reason`:

    cca.no_trust_anchor             no ``cpak.jwk.json`` in the collateral
    cca.cpak_invalid                the JWK is not a public EC key on a supported curve
    cca.unsupported_algorithm       a token's alg is not ES256/ES384/ES512 for its key's curve
    cca.platform_signature_invalid  the CPAK did not sign the platform token
    cca.rak_invalid                 claim 44237 is not a usable public key
    cca.realm_signature_invalid     the RAK did not sign the realm token
    cca.unsupported_hash_algorithm  claim 44240 names a hash other than sha-256/384/512
    cca.rak_binding_invalid         the platform challenge is not the hash of the RAK
    cca.report_data_mismatch        the realm challenge is not the expected binding value

Binding: the realm challenge (64 bytes) carries the mesh's ``SHA-512(nonce || public key)``,
exactly as REPORT_DATA does for SNP and TDX. ``verified`` covers everything but that binding.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec

from services.mesh.errors import ParseError
from services.verifier.families import cose
from services.verifier.families.base import Check, Reason, VerifyOptions
from services.verifier.families.cca.keys import Cpak, parse_cpak, parse_rak, rak_digest
from services.verifier.families.cca.parse import CcaToken

CPAK_COLLATERAL = "cpak.jwk.json"


@dataclass
class CcaVerification:
    """Everything verification established, for appraisal and the human-readable report."""

    token: CcaToken
    cpak: Cpak | None = None
    checks: list[Check] = field(default_factory=list)
    failures: list[Reason] = field(default_factory=list)
    binding_failures: list[Reason] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        """Both signatures and the RAK binding hold."""
        return not self.failures

    @property
    def reasons(self) -> list[Reason]:
        return [*self.failures, *self.binding_failures]

    @property
    def trust_anchor(self) -> str | None:
        return None if self.cpak is None else f"cpak:{self.cpak.thumbprint}"

    def passed(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, True, detail))

    def fail(self, name: str, code: str, detail: str) -> None:
        self.checks.append(Check(name, False, detail))
        self.failures.append(Reason(code, detail))


def verify(token: CcaToken, options: VerifyOptions) -> CcaVerification:
    """Verify a parsed token against ``options`` (CPAK collateral, expected binding)."""
    result = CcaVerification(token=token)
    blob = options.collateral.get(CPAK_COLLATERAL)
    if blob is None:
        result.fail("cpak", "cca.no_trust_anchor", f"no {CPAK_COLLATERAL} in the collateral")
    else:
        try:
            result.cpak = parse_cpak(bytes(blob))
            result.passed("cpak", f"CPAK {result.cpak.thumbprint}")
        except ParseError as exc:
            result.fail("cpak", exc.reason, exc.detail)
    if result.cpak is not None:
        _signature(result, "platform", token.platform, result.cpak.key)
    try:
        rak = parse_rak(token.realm_claims.public_key)
        result.passed("rak", f"RAK on {rak.curve.name}")
    except ParseError as exc:
        result.fail("rak", exc.reason, exc.detail)
    else:
        _signature(result, "realm", token.realm, rak)
    _rak_binding(result, token)
    _report_data(result, options.expected_report_data)
    return result


def _signature(
    result: CcaVerification, which: str, sign1: cose.CoseSign1, key: ec.EllipticCurvePublicKey
) -> None:
    alg = cose.algorithm(sign1)
    if alg is None or alg.curve.name != key.curve.name:
        result.fail(
            f"{which}_signature",
            "cca.unsupported_algorithm",
            f"{which} token alg {sign1.alg!r} does not fit a {key.curve.name} key",
        )
    elif cose.verify_sign1(sign1, key):
        result.passed(f"{which}_signature", f"{alg.name} signature of the {which} token holds")
    else:
        signer = "CPAK" if which == "platform" else "RAK"
        result.fail(
            f"{which}_signature",
            f"cca.{which}_signature_invalid",
            f"the {which} token's signature does not verify with the {signer}",
        )


def _rak_binding(result: CcaVerification, token: CcaToken) -> None:
    realm = token.realm_claims
    digest = rak_digest(realm.public_key, realm.public_key_hash_algo_id)
    if digest is None:
        result.fail(
            "rak_binding",
            "cca.unsupported_hash_algorithm",
            f"RAK hash algorithm {realm.public_key_hash_algo_id!r:.40} is not supported",
        )
    elif hmac.compare_digest(digest, token.platform_claims.challenge):
        result.passed("rak_binding", f"platform challenge = {realm.public_key_hash_algo_id}(RAK)")
    else:
        result.fail(
            "rak_binding",
            "cca.rak_binding_invalid",
            f"platform challenge is not {realm.public_key_hash_algo_id}(RAK)",
        )


def _report_data(result: CcaVerification, expected: bytes | None) -> None:
    if expected is None:
        return
    actual = result.token.realm_claims.challenge
    if len(actual) == len(expected) and hmac.compare_digest(actual, expected):
        result.passed("report_data", "realm challenge equals the expected binding")
        return
    detail = "realm challenge does not equal the expected binding value"
    if len(actual) != len(expected):
        detail += f" (expected value is {len(expected)} bytes, the challenge {len(actual)})"
    result.checks.append(Check("report_data", False, detail))
    result.binding_failures.append(Reason("cca.report_data_mismatch", detail))
