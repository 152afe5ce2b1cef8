"""AWS Nitro Enclaves: parse (NSM attestation document) -> verify (ES384, chain) -> appraise.

parse.py     COSE_Sign1 envelope and payload schema, exactly as AWS specifies them
certs.py     the pinned root -> cabundle -> document certificate chain, link by link, memoised
verify.py    signature, chain, certificate times, the timestamp/leaf window, user_data binding
policy.py    NitroPolicy: one knob per field (debug, PCR allow-lists, age...), all violations
appraise.py  claims, EAR trust vector, NitroVerifier (never raises for bad input)

The shared COSE/CBOR code is :mod:`services.verifier.families.cose`.
"""

from services.verifier.families.nitro.appraise import NitroVerifier, claims
from services.verifier.families.nitro.parse import (
    NitroDocument,
    SignedDocument,
    parse_document,
    parse_payload,
)
from services.verifier.families.nitro.policy import NitroPolicy, is_debug
from services.verifier.families.nitro.verify import NitroVerification, verify

__all__ = [
    "NitroDocument",
    "NitroPolicy",
    "NitroVerification",
    "NitroVerifier",
    "SignedDocument",
    "claims",
    "is_debug",
    "parse_document",
    "parse_payload",
    "verify",
]
