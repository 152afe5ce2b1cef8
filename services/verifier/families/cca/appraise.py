"""CCA appraisal: claims, an EAR trust vector and a status, never an exception.

:class:`CcaVerifier` runs parse -> verify -> policy on a raw tag-399 token. Malformed or
untrusted evidence becomes a contraindicated :class:`Appraisal` with every reason found;
``verified`` is true only when both signatures and the RAK binding hold.

Claims (byte strings as lowercase hex)::

    platform_profile platform_challenge platform_implementation_id platform_instance_id
    platform_config platform_lifecycle ("3003": the uint16 as 4 hex digits)
    platform_lifecycle_state platform_hash_algo_id platform_verification_service
    platform_sw_components [{type, measurement, signer_id, version, hash_algo}]
    realm_profile realm_challenge realm_personalization_value realm_initial_measurement
    realm_extensible_measurements [4] realm_hash_algo_id realm_public_key
    realm_public_key_hash_algo_id realm_public_key_sha256 debug trust_anchor ("cpak:<RFC 7638>")

Trust vector (AR4SI): ``hardware`` follows the platform signature and the lifecycle;
``instance-identity`` the token signatures, RAK binding and realm-challenge binding;
``configuration`` the lifecycle, personalization value and platform identity knobs;
``runtime-opaque`` the debug lifecycles; ``executables`` the RIM/REM/software allow-lists (no
claim when none is configured). The rest make no claim.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

from services.mesh.errors import ParseError
from services.verifier.families import hwid
from services.verifier.families.base import (
    TV_AFFIRMING,
    TV_CONTRAINDICATED,
    TV_NO_CLAIM,
    Appraisal,
    Check,
    Reason,
    VerifyOptions,
    trust_vector,
    unparsable,
    worst,
)
from services.verifier.families.cca import policy as cca_policy
from services.verifier.families.cca.parse import DEBUG_LIFECYCLES, CcaToken, parse_token
from services.verifier.families.cca.policy import CcaPolicy
from services.verifier.families.cca.verify import CcaVerification, verify

FAMILY = "cca"

_LIFECYCLE_CODES = frozenset({"cca.debug_enabled", "cca.lifecycle_not_secured"})
_CONFIG_CODES = _LIFECYCLE_CODES | {
    "cca.personalization_value_not_allowed",
    "cca.implementation_id_not_allowed",
    "cca.instance_id_not_allowed",
    "cca.profile_not_allowed",
}
_EXECUTABLE_CODES = frozenset(
    {"cca.rim_not_allowed", "cca.rem_not_allowed", "cca.sw_component_not_allowed"}
)
_HARDWARE_CODES = _LIFECYCLE_CODES | {"cca.implementation_id_not_allowed"}


class CcaVerifier:
    """The Arm CCA family verifier (see the module docstring for claims)."""

    family: ClassVar[str] = FAMILY

    def __init__(self, policy: CcaPolicy | None = None) -> None:
        self.policy = policy if policy is not None else CcaPolicy()

    def appraise(self, evidence: bytes, options: VerifyOptions) -> Appraisal:
        """Parse, verify and appraise ``evidence``; never raises for bad input."""
        try:
            token = parse_token(evidence)
        except ParseError as exc:
            return unparsable(FAMILY, exc)
        result = verify(token, options)
        policy_reasons, policy_checks = cca_policy.evaluate(
            self.policy, token.platform_claims, token.realm_claims
        )
        parse_check = Check(
            "parse", True, f"CCA token, platform profile {token.platform_claims.profile}"
        )
        reasons = [*result.reasons, *policy_reasons]
        return Appraisal(
            family=FAMILY,
            status=worst([r.status for r in reasons]),
            claims=claims(token, result),
            trust_vector=_trust_vector(result, policy_reasons, self.policy),
            reasons=reasons,
            checks=[parse_check, *result.checks, *policy_checks],
            verified=result.verified,
            bound=options.expected_report_data is not None and not result.binding_failures,
            hwid=(hwid.cca(token.platform_claims.instance_id) or "") if result.verified else "",
        )


def claims(token: CcaToken, result: CcaVerification | None = None) -> dict[str, Any]:
    """The token's claims (see the module docstring), plus the anchor verification used."""
    platform, realm = token.platform_claims, token.realm_claims
    return {
        "platform_profile": platform.profile,
        "platform_challenge": platform.challenge.hex(),
        "platform_implementation_id": platform.implementation_id.hex(),
        "platform_instance_id": platform.instance_id.hex(),
        "platform_config": platform.config.hex(),
        "platform_lifecycle": f"{platform.lifecycle:04x}",
        "platform_lifecycle_state": platform.lifecycle_state,
        "platform_hash_algo_id": platform.hash_algo_id,
        "platform_verification_service": platform.verification_service,
        "platform_sw_components": [
            {
                "type": c.type,
                "measurement": c.measurement.hex(),
                "signer_id": c.signer_id.hex(),
                "version": c.version,
                "hash_algo": c.hash_algo,
            }
            for c in platform.sw_components
        ],
        "realm_profile": realm.profile,
        "realm_challenge": realm.challenge.hex(),
        "realm_personalization_value": realm.personalization_value.hex(),
        "realm_initial_measurement": realm.initial_measurement.hex(),
        "realm_extensible_measurements": [m.hex() for m in realm.extensible_measurements],
        "realm_hash_algo_id": realm.hash_algo_id,
        "realm_public_key": realm.public_key.hex(),
        "realm_public_key_hash_algo_id": realm.public_key_hash_algo_id,
        "realm_public_key_sha256": hashlib.sha256(realm.public_key).hexdigest(),
        "debug": platform.lifecycle_state in DEBUG_LIFECYCLES,
        "trust_anchor": result.trust_anchor if result is not None else None,
    }


def _trust_vector(
    result: CcaVerification, policy_reasons: list[Reason], policy: CcaPolicy
) -> dict[str, int]:
    bad = TV_CONTRAINDICATED
    if not result.verified:
        return trust_vector(instance=bad, hardware=bad, configuration=bad, runtime=bad)
    codes = {r.code for r in policy_reasons}

    def tier(relevant: frozenset[str]) -> int:
        return bad if codes & relevant else TV_AFFIRMING

    executables = TV_NO_CLAIM
    if any(
        knob is not None
        for knob in (
            policy.allowed_realm_initial_measurements,
            policy.allowed_realm_extensible_measurements,
            policy.allowed_sw_measurements,
        )
    ):
        executables = tier(_EXECUTABLE_CODES)
    return trust_vector(
        instance=bad if result.binding_failures else TV_AFFIRMING,
        hardware=tier(_HARDWARE_CODES),
        configuration=tier(_CONFIG_CODES),
        runtime=tier(frozenset({"cca.debug_enabled"})),
        executables=executables,
    )
