"""TPM 2.0 quotes: parse (TPMS_ATTEST, TPMT_SIGNATURE) -> verify (AK, PCRs, nonce) -> appraise.

structures.py  TPM2 marshalling readers and writers, bounded and exact
evidence.py    the attestation agent's JSON evidence (ak_public, tpm_quote, ak_cert, event_log)
quote.py       signature by the AK, PCR digest, nonce binding (shared with the Azure families)
akcert.py      AK certificate chain to the pinned TPM roots, link by link
eventlog.py    TCG PC Client crypto-agile event log: parse and replay
policy.py      TpmPolicy: pinned AKs, reference PCRs, banks, event log
appraise.py    claims, EAR trust vector, TpmVerifier (never raises for bad input)
"""

from services.verifier.families.tpm.appraise import TpmVerifier, quote_claims
from services.verifier.families.tpm.evidence import TpmEvidence, encode_evidence, parse_evidence
from services.verifier.families.tpm.policy import TpmPolicy
from services.verifier.families.tpm.quote import QuoteResult, verify_quote
from services.verifier.families.tpm.structures import (
    Attest,
    ClockInfo,
    HashAlg,
    PcrSelection,
    SigAlg,
    Signature,
    encode_attest,
    encode_signature,
    parse_attest,
    parse_signature,
)

__all__ = [
    "Attest",
    "ClockInfo",
    "HashAlg",
    "PcrSelection",
    "QuoteResult",
    "SigAlg",
    "Signature",
    "TpmEvidence",
    "TpmPolicy",
    "TpmVerifier",
    "encode_attest",
    "encode_evidence",
    "encode_signature",
    "parse_attest",
    "parse_evidence",
    "parse_signature",
    "quote_claims",
    "verify_quote",
]
