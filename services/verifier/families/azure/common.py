"""What az-snp-vtpm and az-tdx-vtpm share: runtime-data binding and the vTPM quote.

The chain of trust is hardware report -> runtime data -> AK -> quote -> PCRs: the hardware
report (verified by the snp or tdx family's own code) binds the digest of the HCL runtime data in
the first bytes of its REPORT_DATA; the runtime data carries the vTPM's AK; the AK signs the
quote; the quote's pcrDigest covers the PCR values. The mesh's nonce binding
(``options.expected_report_data``) goes into the vTPM quote's extraData: the guest cannot choose
the hardware report's REPORT_DATA on Azure, the HCL fills it. Evidence v2 also copies the report
data into the runtime data's ``user-data``, which is then checked too. Codes (besides the
``tpm.`` ones of the quote):

    az.runtime_data_mismatch   digest(runtime data) is not the start of REPORT_DATA
    az.runtime_data_invalid    the runtime data is not JSON with an RSA HCLAkPub
    az.user_data_mismatch      v2: user-data does not start with the expected report data
    az.vtpm_quote_invalid      the vTPM quote's TPMS_ATTEST or signature cannot be parsed

Claims added: the quote's (``nonce``, ``pcr_bank``, ``pcr0``..), ``hcl_ak_sha256`` (SHA-256 of
the AK's SPKI DER, also as ``ak_public_sha256``), ``vm_configuration``, ``user_data``,
``hcl_version``, ``evidence_version``.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from services.mesh.errors import ParseError
from services.verifier.families.azure.evidence import AzureEvidence, VtpmQuote
from services.verifier.families.azure.hcl import HclReport
from services.verifier.families.azure.runtime import RuntimeData, parse_runtime_data
from services.verifier.families.base import (
    TRUST_CLAIMS,
    TV_AFFIRMING,
    TV_CONTRAINDICATED,
    TV_NO_CLAIM,
    TV_WARNING,
    Reason,
    Status,
    VerifyOptions,
)
from services.verifier.families.tpm.appraise import Findings, pcr_policy, quote_claims
from services.verifier.families.tpm.policy import TpmPolicy
from services.verifier.families.tpm.quote import spki_der, verify_quote
from services.verifier.families.tpm.structures import (
    HashAlg,
    SigAlg,
    Signature,
    parse_attest,
    parse_signature,
)


def check_runtime_binding(hcl: HclReport, report_data: bytes, findings: Findings) -> None:
    """The hardware report's REPORT_DATA must start with digest(runtime data)."""
    digest = hcl.runtime_data_digest()
    name = hcl.hash_type.name
    if hmac.compare_digest(report_data[: len(digest)], digest):
        findings.check("runtime_data", True, f"REPORT_DATA starts with {name} of the runtime data")
    else:
        findings.integrity_failure(
            "runtime_data",
            "az.runtime_data_mismatch",
            f"{name} of the HCL runtime data is not the start of the hardware REPORT_DATA",
        )


def vtpm_signature(raw: bytes, ak: rsa.RSAPublicKey) -> Signature:
    """A raw AK signature (modulus-sized) as RSASSA/SHA-256, else a marshalled TPMT_SIGNATURE."""
    if len(raw) == (ak.key_size + 7) // 8:
        return Signature(SigAlg.RSASSA, HashAlg.SHA256, rsa=raw)
    return parse_signature(raw)


def _runtime(hcl: HclReport, findings: Findings) -> RuntimeData | None:
    try:
        runtime = parse_runtime_data(hcl.variable_data)
    except ParseError as exc:
        findings.integrity_failure("runtime_data_json", exc.reason, exc.detail)
        return None
    findings.check("runtime_data_json", True, "runtime data carries an RSA HCLAkPub")
    return runtime


def _user_data(
    runtime: RuntimeData, version: int, expected: bytes | None, findings: Findings
) -> None:
    if version < 2 or expected is None:
        return
    user = runtime.user_data or b""
    if hmac.compare_digest(user[: len(expected)], expected):
        findings.check("user_data", True, "runtime data user-data carries the report data")
    else:
        detail = "runtime data user-data does not start with the expected report data"
        findings.check("user_data", False, detail)
        findings.policy.append(Reason("az.user_data_mismatch", detail))


def verify_vtpm(
    evidence: AzureEvidence,
    hcl: HclReport,
    options: VerifyOptions,
    policy: TpmPolicy,
    findings: Findings,
) -> tuple[dict[str, Any], bool | None]:
    """Runtime data, AK, vTPM quote, PCR policy: the claims and the reference-PCR outcome.

    Every failure goes into ``findings``; the outcome is ``None`` when no reference PCRs are set.
    """
    claims: dict[str, Any] = {"hcl_version": hcl.version, "evidence_version": evidence.version}
    runtime = _runtime(hcl, findings)
    if runtime is None:
        return claims, None
    ak_hash = hashlib.sha256(spki_der(runtime.ak)).hexdigest()
    claims.update(
        hcl_ak_sha256=ak_hash,
        ak_public_sha256=ak_hash,
        vm_configuration=runtime.vm_configuration,
        user_data=runtime.user_data.hex() if runtime.user_data is not None else None,
    )
    _user_data(runtime, evidence.version, options.expected_report_data, findings)
    quote: VtpmQuote = evidence.quote
    try:
        attest = parse_attest(quote.message)
        signature = vtpm_signature(quote.signature, runtime.ak)
    except ParseError as exc:
        findings.integrity_failure("vtpm_quote", "az.vtpm_quote_invalid", exc.detail or exc.reason)
        return claims, None
    result = verify_quote(attest, signature, quote.pcrs, runtime.ak, options.expected_report_data)
    findings.checks += result.checks
    findings.integrity += result.failures
    findings.policy += result.binding_failures
    pcrs_ok = pcr_policy(result, policy, findings)
    claims.update(quote_claims(result, signature))
    return claims, pcrs_ok


def trust_vector(
    verified: bool, bound: bool, configuration: list[Reason], debug: bool, pcrs_ok: bool | None
) -> dict[str, int]:
    """AR4SI vector of an Azure CVM: hardware and identity from the chain of trust above."""
    vector = dict.fromkeys(TRUST_CLAIMS, TV_NO_CLAIM)
    if not verified:
        for name in ("instance-identity", "hardware", "runtime-opaque"):
            vector[name] = TV_CONTRAINDICATED
        return vector
    statuses = {r.status for r in configuration}
    vector["hardware"] = TV_AFFIRMING
    vector["instance-identity"] = TV_AFFIRMING if bound else TV_CONTRAINDICATED
    vector["configuration"] = (
        TV_CONTRAINDICATED
        if Status.CONTRAINDICATED in statuses
        else TV_WARNING
        if statuses
        else TV_AFFIRMING
    )
    vector["runtime-opaque"] = TV_CONTRAINDICATED if debug else TV_AFFIRMING
    if pcrs_ok is not None:
        vector["executables"] = TV_AFFIRMING if pcrs_ok else TV_CONTRAINDICATED
    return vector
