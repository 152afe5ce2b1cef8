"""Arm CCA: parse (tag 399 token) -> verify (CPAK, RAK, their binding) -> appraise.

The only public vector is synthetic; that proves the format, not hardware trust.
(``cca-trustee-example-token`` is Veraison's example token signed by example keys: it shows this
code reads and verifies the real token format, but no Arm hardware produced it, so it says
nothing about how a real platform's CPAK provisioning or firmware behave.)

parse.py     the tag 399 collection, both COSE_Sign1 tokens, platform and realm claims
keys.py      the CPAK (JWK collateral) and the RAK (raw point or COSE_Key)
verify.py    platform signature by the CPAK, realm signature by the RAK, RAK binding, challenge
policy.py    CcaPolicy: lifecycle (secured only by default), RIM/REM/software reference values
appraise.py  claims, EAR trust vector, CcaVerifier (never raises for bad input)
"""

from services.verifier.families.cca.appraise import CcaVerifier, claims
from services.verifier.families.cca.keys import Cpak, parse_cpak, parse_rak
from services.verifier.families.cca.parse import (
    LIFECYCLE_STATES,
    CcaToken,
    PlatformClaims,
    RealmClaims,
    SwComponent,
    lifecycle_state,
    parse_token,
)
from services.verifier.families.cca.policy import CcaPolicy
from services.verifier.families.cca.verify import CcaVerification, verify

__all__ = [
    "LIFECYCLE_STATES",
    "CcaPolicy",
    "CcaToken",
    "CcaVerification",
    "CcaVerifier",
    "Cpak",
    "PlatformClaims",
    "RealmClaims",
    "SwComponent",
    "claims",
    "lifecycle_state",
    "parse_cpak",
    "parse_rak",
    "parse_token",
    "verify",
]
