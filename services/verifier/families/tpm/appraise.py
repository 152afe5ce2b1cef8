"""TPM appraisal: AK trust, quote, PCR policy and event log -> claims, EAR vector and status.

:class:`TpmVerifier` never raises for bad input. The AK is trusted one of three ways, named in
the ``ak_trust`` claim: ``certificate`` (an AK certificate, in the evidence or as collateral
``ak_cert.der``, chains to a TPM anchor and certifies ak_public), ``pinned`` (its SHA-256 is in
:attr:`TpmPolicy.trusted_ak_sha256`) or ``self-asserted`` (neither: the quote verifies, but the
key could be anyone's, so the status is at best ``warning`` with ``tpm.ak_not_anchored``). A
certificate that is present but fails makes the evidence contraindicated; it is never ignored.

Claims (byte strings as lowercase hex)::

    nonce (extraData) pcr_bank pcr_select pcr0..pcr23 (selected PCRs, only once pcrDigest holds)
    firmware_version (16 hex digits) clock reset_count restart_count clock_safe qualified_signer
    signature_scheme signature_hash ak_public_sha256 ak_trust trust_anchor
    events event_log_pcrs (with an event log: every event, and the PCRs its replay verified)

Reasons, besides those of :mod:`.quote` and :mod:`.akcert`: ``tpm.ak_not_anchored``,
``tpm.test_anchor_not_allowed``, ``tpm.pcr_not_allowed``, ``tpm.pcr_bank_not_allowed``,
``tpm.eventlog_missing``, ``tpm.eventlog_malformed``, ``tpm.eventlog_mismatch``.

Trust vector: ``instance-identity`` and ``hardware`` follow the AK's trust (warning when
self-asserted) and, for identity, the nonce binding; ``executables`` the reference PCRs and
the event-log replay (no claim when neither applies).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from services.mesh.errors import ParseError
from services.verifier.families import hwid
from services.verifier.families.base import (
    TRUST_CLAIMS,
    TV_AFFIRMING,
    TV_CONTRAINDICATED,
    TV_NO_CLAIM,
    TV_WARNING,
    Appraisal,
    Check,
    Reason,
    Status,
    VerifyOptions,
    worst,
)
from services.verifier.families.tpm import eventlog
from services.verifier.families.tpm.akcert import verify_ak_cert
from services.verifier.families.tpm.evidence import TpmEvidence, parse_evidence
from services.verifier.families.tpm.policy import TpmPolicy
from services.verifier.families.tpm.quote import QuoteResult, spki_der, verify_quote
from services.verifier.families.tpm.structures import Attest, Signature

FAMILY = "tpm"
AK_CERT_NAME = "ak_cert.der"


@dataclass
class Findings:
    """Checks and reasons of one appraisal; integrity failures clear ``verified``."""

    checks: list[Check] = field(default_factory=list)
    integrity: list[Reason] = field(default_factory=list)
    policy: list[Reason] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))

    def integrity_failure(self, name: str, code: str, detail: str) -> None:
        self.check(name, False, detail)
        self.integrity.append(Reason(code, detail))

    def policy_failure(
        self, name: str, code: str, detail: str, status: Status = Status.CONTRAINDICATED
    ) -> None:
        self.check(name, False, detail)
        self.policy.append(Reason(code, detail, status))

    @property
    def reasons(self) -> list[Reason]:
        return [*self.integrity, *self.policy]


def assess_ak(
    ak_public: bytes,
    *,
    canonical_spki: bytes,
    ak_cert: bytes | None,
    options: VerifyOptions,
    policy: TpmPolicy,
    findings: Findings,
) -> tuple[str, str | None]:
    """How the AK is trusted (``certificate``/``pinned``/``self-asserted``/``invalid``), anchor."""
    if ak_cert is not None:
        chain = verify_ak_cert(ak_cert, canonical_spki, options.trust, options.now)
        for code, detail in chain.problems:
            findings.integrity_failure("ak_cert", code, detail)
        if not chain.ok or chain.anchor is None:
            return "invalid", None
        findings.check("ak_cert", True, " <- ".join(chain.path))
        if chain.anchor.origin == "test" and not policy.allow_test_anchor:
            findings.policy_failure(
                "ak_anchor", "tpm.test_anchor_not_allowed", f"{chain.anchor.label} is a test root"
            )
        return "certificate", chain.anchor.label
    digest = hashlib.sha256(ak_public).digest()
    if policy.trusted_ak_sha256 is not None and digest in policy.trusted_ak_sha256:
        findings.check("ak_pinned", True, f"AK {digest.hex()[:16]}... is pinned by policy")
        return "pinned", None
    status = Status.CONTRAINDICATED if policy.require_ak_cert else Status.WARNING
    findings.policy_failure(
        "ak_anchor",
        "tpm.ak_not_anchored",
        "the AK has no certificate and is not pinned: it is self-asserted",
        status,
    )
    return "self-asserted", None


def quote_claims(result: QuoteResult, signature: Signature) -> dict[str, Any]:
    """Claims of one quote; PCR values only when the pcrDigest over them held."""
    attest: Attest = result.attest
    clock = attest.clock_info
    claims: dict[str, Any] = {
        "nonce": attest.extra_data.hex(),
        "firmware_version": f"{attest.firmware_version:016x}",
        "clock": clock.clock,
        "reset_count": clock.reset_count,
        "restart_count": clock.restart_count,
        "clock_safe": clock.safe,
        "qualified_signer": attest.qualified_signer.hex(),
        "signature_scheme": signature.sig_alg.name.lower(),
        "signature_hash": signature.hash.label,
        "pcr_select": {s.hash.label: list(s.indices) for s in attest.pcr_select if s.indices},
    }
    if result.bank is not None:
        claims["pcr_bank"] = result.bank.label
        claims.update({f"pcr{i}": value.hex() for i, value in sorted(result.pcrs.items())})
    return claims


def pcr_policy(result: QuoteResult, policy: TpmPolicy, findings: Findings) -> bool | None:
    """Bank and reference-PCR knobs; ``None`` when no reference PCRs are configured."""
    bank = result.bank
    banks = policy.allowed_pcr_banks
    if bank is not None and banks is not None and bank.label not in banks:
        findings.policy_failure(
            "pcr_bank", "tpm.pcr_bank_not_allowed", f"the {bank.label} bank is not allowed"
        )
    if policy.reference_pcrs is None:
        return None
    good = True
    for index, allowed in sorted(policy.reference_pcrs.items()):
        value = result.pcrs.get(index)
        if value is None or value not in allowed:
            good = False
            shown = value.hex() if value is not None else "not quoted"
            findings.policy_failure(
                "reference_pcrs", "tpm.pcr_not_allowed", f"PCR{index} ({shown}) is not allowed"
            )
    if good:
        findings.check("reference_pcrs", True, f"{len(policy.reference_pcrs)} PCRs as expected")
    return good


def event_log_claims(
    log_bytes: bytes | None, result: QuoteResult, policy: TpmPolicy, findings: Findings
) -> tuple[dict[str, Any], bool | None]:
    """Replay the event log against the quoted PCRs: its claims and whether it held."""
    if log_bytes is None:
        if policy.require_event_log:
            findings.policy_failure("event_log", "tpm.eventlog_missing", "no event log supplied")
        return {}, None
    if result.bank is None:
        findings.check("event_log", False, "not replayed: the quoted PCRs did not verify")
        return {}, None
    try:
        log = eventlog.parse_event_log(log_bytes)
        replayed = eventlog.replay(log, result.bank, result.pcrs)
    except ParseError as exc:
        findings.policy_failure("event_log", exc.reason, exc.detail)
        return {}, False
    claims: dict[str, Any] = {
        "events": eventlog.event_claims(log, result.bank),
        "event_count": len(log.events),
    }
    if replayed.mismatched:
        listed = ", ".join(f"PCR{i}" for i in replayed.mismatched)
        findings.policy_failure(
            "event_log", "tpm.eventlog_mismatch", f"replaying the event log does not give {listed}"
        )
        return claims, False
    verified = sorted(set(replayed.values) - set(replayed.unquoted))
    claims["event_log_pcrs"] = verified
    findings.check("event_log", True, f"{len(log.events)} events replay to the quoted PCRs")
    return claims, True


ANCHORED = frozenset({"certificate", "pinned"})
"""AK trust that ties the key to a machine: a certificate chain to a TPM root, or a pin."""


def trust_vector(
    verified: bool, ak_trust: str, bound: bool, executables: bool | None
) -> dict[str, int]:
    """The AR4SI vector (see the module docstring)."""
    vector = dict.fromkeys(TRUST_CLAIMS, TV_NO_CLAIM)
    if not verified:
        for name in ("instance-identity", "hardware", "runtime-opaque"):
            vector[name] = TV_CONTRAINDICATED
        return vector
    anchored = TV_WARNING if ak_trust == "self-asserted" else TV_AFFIRMING
    vector["hardware"] = anchored
    vector["instance-identity"] = anchored if bound else TV_CONTRAINDICATED
    if executables is not None:
        vector["executables"] = TV_AFFIRMING if executables else TV_CONTRAINDICATED
    return vector


def _failed_parse(exc: ParseError) -> Appraisal:
    detail = exc.detail or exc.reason
    return Appraisal(
        family=FAMILY,
        status=Status.CONTRAINDICATED,
        trust_vector=trust_vector(False, "invalid", False, None),
        reasons=[Reason(exc.reason, detail)],
        checks=[Check("parse", False, detail)],
    )


class TpmVerifier:
    """The TPM 2.0 quote family verifier (see the module docstring for claims and reasons)."""

    family: ClassVar[str] = FAMILY

    def __init__(self, policy: TpmPolicy | None = None) -> None:
        self.policy = policy if policy is not None else TpmPolicy()

    def appraise(self, evidence: bytes, options: VerifyOptions) -> Appraisal:
        """Parse, verify and appraise ``evidence``; never raises for bad input."""
        try:
            parsed = parse_evidence(evidence)
        except ParseError as exc:
            return _failed_parse(exc)
        return self.appraise_parsed(parsed, options)

    def appraise_parsed(self, parsed: TpmEvidence, options: VerifyOptions) -> Appraisal:
        """Verify and appraise already parsed evidence."""
        findings = Findings()
        findings.check("parse", True, f"TPMS_ATTEST quote, {len(parsed.pcrs)} PCR values")
        result = verify_quote(
            parsed.attest,
            parsed.signature,
            parsed.pcrs,
            parsed.ak_key,
            options.expected_report_data,
        )
        findings.checks += result.checks
        findings.integrity += result.failures
        findings.policy += result.binding_failures
        cert = parsed.ak_cert
        if cert is None:
            cert = options.collateral.get(AK_CERT_NAME)
        ak_trust, anchor = assess_ak(
            parsed.ak_public,
            canonical_spki=spki_der(parsed.ak_key),
            ak_cert=cert,
            options=options,
            policy=self.policy,
            findings=findings,
        )
        pcrs_ok = pcr_policy(result, self.policy, findings)
        log_claims, log_ok = event_log_claims(parsed.event_log, result, self.policy, findings)
        claims = quote_claims(result, parsed.signature)
        claims.update(
            ak_public_sha256=hashlib.sha256(parsed.ak_public).hexdigest(),
            ak_trust=ak_trust,
            trust_anchor=anchor,
            **log_claims,
        )
        verified = not findings.integrity
        executables = (
            None
            if pcrs_ok is None and log_ok is None
            else bool(pcrs_ok is not False and log_ok is not False)
        )
        reasons = findings.reasons
        return Appraisal(
            family=FAMILY,
            status=worst([r.status for r in reasons]),
            claims=claims,
            trust_vector=trust_vector(verified, ak_trust, not result.binding_failures, executables),
            reasons=reasons,
            checks=findings.checks,
            verified=verified,
            bound=options.expected_report_data is not None and not result.binding_failures,
            # An AK nobody vouches for proves no machine: anyone with a software TPM can make
            # one, so it must not pin a node name (or stand in for one in re-appraisal).
            hwid=hwid.tpm(parsed.ak_public) if verified and ak_trust in ANCHORED else "",
        )
