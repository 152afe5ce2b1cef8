"""Intel DCAP (ECDSA) quote verification shared by the TDX and SGX families.

Modules, each with one job: :mod:`.quote` (bytes -> structs), :mod:`.pck` and :mod:`.certs`
(the PCK chain and Intel's PKI), :mod:`.pcs` and :mod:`.collateral` (TCB info, QE identity,
CRLs), :mod:`.tcb` (Intel's TCB matching rules), :mod:`.verify` (all checks, in order) and
:mod:`.appraise` (policy, claims, verdict).
"""

from __future__ import annotations

from services.mesh.errors import ParseError
from services.verifier.families.base import Appraisal, Reason, Status, VerifyOptions
from services.verifier.families.dcap.appraise import DcapPolicy, to_appraisal
from services.verifier.families.dcap.certs import DECODE_ERRORS
from services.verifier.families.dcap.collateral import FILES as COLLATERAL_FILES
from services.verifier.families.dcap.pcs import TcbStatus
from services.verifier.families.dcap.quote import Quote, parse_quote
from services.verifier.families.dcap.verify import DcapResult, verify_quote

__all__ = [
    "COLLATERAL_FILES",
    "DcapPolicy",
    "DcapResult",
    "ParseError",
    "Quote",
    "Status",
    "TcbStatus",
    "appraise_quote",
    "parse_quote",
    "verify_quote",
]


def appraise_quote(
    family: str, evidence: bytes, options: VerifyOptions, policy: DcapPolicy
) -> Appraisal:
    """Parse, verify and appraise one quote for ``family`` ("tdx" or "sgx"); never raises.

    Malformed input is turned into findings by the parsers; the handler below is the last line
    for what a third-party decoder might still raise on hostile bytes.
    """
    try:
        result = verify_quote(evidence, options, tdx=family == "tdx")
        return to_appraisal(family, result, options, policy)
    except DECODE_ERRORS as exc:
        reason = Reason(f"{family}.evidence_invalid", f"undecodable input: {type(exc).__name__}")
        return Appraisal(family=family, status=Status.CONTRAINDICATED, reasons=[reason])
