"""Verify a DCAP quote end to end, the way Intel's Quote Verification Library does.

Steps, each recorded in :class:`Findings` (every failure is reported, not just the first):

1. parse the quote (exact; see :mod:`.quote`) and check it is the expected TEE and Intel's QE;
2. PCK chain from the quote: leaf -> PCK Platform/Processor CA -> pinned Intel SGX Root CA,
   validity at the injected time, the SGX extension;
3. the QE report signed by the PCK key, and its REPORTDATA = SHA-256(attestation key || QE
   authentication data) followed by 32 zero bytes, which binds the attestation key to the QE;
4. the quote signature by the attestation key over header and body;
5. collateral (see :mod:`.collateral`), then revocation of the PCK and its CA by the CRLs;
6. TCB info and QE identity consistency with the quote (FMSPC, PCE ID, TEE, QE identity);
7. Intel's TCB matching and status convergence (see :mod:`.tcb`).

Nothing here reads a clock, a file or the network: time, trust anchors and collateral come in
:class:`VerifyOptions`. Policy (what a status means for the verdict) is :mod:`.appraise`'s job.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from services.mesh.errors import ParseError
from services.verifier.families.base import VerifyOptions
from services.verifier.families.dcap.certs import (
    Lru,
    chain_window,
    load_pem_chain,
    p256_key,
    validity_problem,
    verify_raw_ecdsa,
    verify_raw_ecdsa_cached,
)
from services.verifier.families.dcap.collateral import FILES as COLLATERAL_FILES
from services.verifier.families.dcap.collateral import CollateralView, appraise_collateral
from services.verifier.families.dcap.findings import Findings
from services.verifier.families.dcap.pck import PckChain, SgxExtensions, load_pck_chain
from services.verifier.families.dcap.pcs import QeIdentity, TcbInfo
from services.verifier.families.dcap.quote import INTEL_QE_VENDOR_ID, Quote, TdReport, parse_quote
from services.verifier.families.dcap.tcb import TcbResult, check_qe_identity, evaluate
from services.verifier.trust import Anchor

INTEL_ANCHOR = "intel:sgx_root_ca"


@dataclass
class DcapResult:
    """Everything verification established, for the appraisal to turn into a verdict."""

    findings: Findings = field(default_factory=Findings)
    quote: Quote | None = None
    anchor: Anchor | None = None
    pck: SgxExtensions | None = None
    pck_ca: str | None = None
    tcb_info: TcbInfo | None = None
    qe_identity: QeIdentity | None = None
    tcb: TcbResult | None = None


def intel_anchors(options: VerifyOptions) -> tuple[Anchor, ...]:
    """The Intel SGX Root CA anchors of the trust store, vendor ones first."""
    return tuple(a for a in options.trust.anchors("intel") if a.name == INTEL_ANCHOR)


def _pick_anchor(pem: bytes, anchors: tuple[Anchor, ...]) -> Anchor:
    """The anchor the quote's chain ends in, else the first (the chain check then reports it)."""
    try:
        certs = load_pem_chain(pem, "PCK certificate chain")
    except ParseError:
        return anchors[0]
    return next((a for a in anchors if certs and certs[-1] == a.cert), anchors[0])


def _check_quote_signature(quote: Quote, findings: Findings) -> None:
    """Step 4: the attestation key's signature over header and body."""
    key = p256_key(quote.attestation_key)
    if key is None:
        findings.failed(
            "quote_signature", "dcap.attestation_key_invalid", "attestation key not on P-256"
        )
        return
    findings.expect(
        verify_raw_ecdsa(key, quote.signature, quote.signed),
        "quote_signature",
        "dcap.quote_signature_invalid",
        "quote signature does not verify with the attestation key",
    )


class _Run:
    """One verification: the options, the findings so far and what has been established."""

    def __init__(self, options: VerifyOptions) -> None:
        self.options = options
        self.result = DcapResult()
        self.findings = self.result.findings

    def pck_chain(self, quote: Quote, anchor: Anchor) -> PckChain | None:
        findings = self.findings
        try:
            chain = load_pck_chain(quote.certification.pck_chain_pem, anchor)
        except ParseError as exc:
            findings.failed("pck_chain", "dcap.pck_chain_malformed", exc.detail)
            return None
        if chain.links.problem is not None:
            untrusted = chain.links.untrusted_root
            code = "dcap.pck_root_untrusted" if untrusted else "dcap.pck_chain_invalid"
            findings.failed("pck_chain", code, chain.links.problem)
        elif chain.problem is not None:
            findings.failed("pck_chain", "dcap.pck_chain_invalid", chain.problem)
        else:
            findings.window(*chain_window(chain.infos))
            expired = validity_problem(chain.infos, self.options.now)
            if findings.expect(
                expired is None,
                "pck_chain",
                "dcap.pck_chain_expired",
                expired or "",
                f"PCK <- '{chain.infos[1].cn}' <- {anchor.label}",
            ):
                self.result.pck = chain.extensions
                self.result.pck_ca = chain.ca_kind
        return chain

    def qe_report(self, quote: Quote, chain: PckChain | None) -> None:
        cert = quote.certification
        if chain is not None and chain.leaf_key_der is not None:
            self.findings.expect(
                verify_raw_ecdsa_cached(
                    chain.leaf_key_der, cert.qe_report_signature, cert.qe_report_raw
                ),
                "qe_report_signature",
                "dcap.qe_report_signature_invalid",
                "QE report signature does not verify with the PCK key",
            )
        digest = hashlib.sha256(quote.attestation_key + cert.qe_auth_data).digest()
        self.findings.expect(
            cert.qe_report.report_data == digest + bytes(32),
            "qe_report_data",
            "dcap.qe_report_data_mismatch",
            "QE REPORTDATA is not SHA-256(attestation key || QE authentication data)",
        )

    def revocation(self, chain: PckChain | None, view: CollateralView) -> None:
        if chain is None or len(chain.infos) != 3:
            return
        leaf, ca = chain.infos[0], chain.infos[1]
        if view.root_crl is not None and view.root_crl.revokes(ca):
            self.findings.failed("pck_revocation", "dcap.pck_ca_revoked", f"'{ca.cn}' revoked")
            return
        if view.pck_crl is None:
            return
        if view.pck_crl.issuer_der != leaf.issuer_der:
            self.findings.failed(
                "pck_revocation",
                "dcap.pck_crl_issuer_mismatch",
                f"PCK CRL is from '{view.pck_crl.issuer_cn}', the PCK from '{ca.cn}'",
            )
            return
        self.findings.expect(
            not view.pck_crl.revokes(leaf),
            "pck_revocation",
            "dcap.pck_revoked",
            f"PCK certificate serial {leaf.serial:#x} is revoked",
            "PCK and its CA not revoked",
        )

    def consistency(self, quote: Quote, view: CollateralView) -> None:
        tcb_info, qe_identity, pck = view.tcb_info, view.qe_identity, self.result.pck
        if tcb_info is not None and pck is not None:
            wanted = ("TDX", 3) if quote.is_tdx else ("SGX", 2)
            problems = []
            if tcb_info.id != wanted[0] or tcb_info.version < wanted[1]:
                problems.append(f"TCB info is {tcb_info.id} v{tcb_info.version}")
            if tcb_info.fmspc != pck.fmspc:
                problems.append(f"FMSPC {tcb_info.fmspc.hex()} != PCK's {pck.fmspc.hex()}")
            if tcb_info.pce_id != pck.pce_id:
                problems.append(f"PCE ID {tcb_info.pce_id.hex()} != PCK's {pck.pce_id.hex()}")
            if self.findings.expect(
                not problems,
                "tcb_info_match",
                "dcap.tcb_info_mismatch",
                "; ".join(problems),
                f"FMSPC {pck.fmspc.hex()}",
            ):
                self.result.tcb_info = tcb_info
        if qe_identity is not None:
            wanted_id = "TD_QE" if quote.is_tdx else "QE"
            mismatches = check_qe_identity(qe_identity, quote.certification.qe_report)
            if qe_identity.id != wanted_id:
                self.findings.failed(
                    "qe_identity_match",
                    "dcap.qe_identity_mismatch",
                    f"QE identity is for {qe_identity.id}, the quote needs {wanted_id}",
                )
            elif mismatches:
                for mismatch in mismatches:
                    self.findings.failed("qe_identity_match", mismatch.code, mismatch.message)
            else:
                self.findings.passed("qe_identity_match", f"{qe_identity.id}")
                self.result.qe_identity = qe_identity

    def tcb_status(self, quote: Quote) -> None:
        tcb_info, pck, qe_identity = self.result.tcb_info, self.result.pck, self.result.qe_identity
        if tcb_info is None or pck is None:
            return
        td = quote.body if isinstance(quote.body, TdReport) else None
        outcome = evaluate(
            tcb_info,
            pck.tcb_components,
            pck.pce_svn,
            td=td,
            qe_identity=qe_identity,
            qe=quote.certification.qe_report,
        )
        self.result.tcb = outcome
        if outcome.failure is not None:
            self.findings.failed(
                "tcb_level", outcome.failure.code, outcome.failure.message, integrity=False
            )
        elif outcome.status is not None:
            level = outcome.platform_level
            self.findings.passed(
                "tcb_level", f"{outcome.status} (level of {level.date if level else '?'})"
            )


_PlatformKey = tuple[object, ...]
_PLATFORMS: Lru[_PlatformKey, DcapResult] = Lru(256)


def _platform_key(quote: Quote, anchor: Anchor, options: VerifyOptions) -> _PlatformKey:
    """Every input of the platform checks except the clock (handled by the findings' span)."""
    cert = quote.certification
    body = quote.body
    td = (
        (body.tee_tcb_svn, body.mr_signer_seam, body.seam_attributes)
        if isinstance(body, TdReport)
        else None
    )
    files = options.collateral
    return (
        anchor.label,
        anchor.fingerprint,
        quote.is_tdx,
        quote.header.qe_vendor_id,
        quote.attestation_key,
        cert.qe_report_raw,
        cert.qe_report_signature,
        cert.qe_auth_data,
        cert.pck_chain_pem,
        td,
        tuple(files.get(name) for name in COLLATERAL_FILES),
    )


def _verify_platform(quote: Quote, anchor: Anchor, options: VerifyOptions) -> DcapResult:
    """Steps 2, 3, 5, 6 and 7: everything that is the same for every quote of one platform.

    The outcome is cached by its exact inputs and reused while the clock stays inside the span
    in which every certificate, CRL and collateral document it relied on is valid, so a verifier
    fed many quotes from the same platforms verifies one signature per quote.
    """
    key = _platform_key(quote, anchor, options)
    cached = _PLATFORMS.lookup(key)
    if cached is not None and cached.findings.holds_at(options.now):
        return cached
    run = _Run(options)
    run.result.anchor = anchor
    run.findings.expect(
        quote.header.qe_vendor_id == INTEL_QE_VENDOR_ID,
        "qe_vendor",
        "dcap.qe_vendor_unknown",
        f"QE vendor ID {quote.header.qe_vendor_id.hex()} is not Intel's",
    )
    chain = run.pck_chain(quote, anchor)
    run.qe_report(quote, chain)
    view = appraise_collateral(options.collateral, anchor, options.now, run.findings)
    run.revocation(chain, view)
    run.consistency(quote, view)
    run.tcb_status(quote)
    if run.findings.holds_at(options.now):
        _PLATFORMS.put(key, run.result)
    return run.result


def verify_quote(evidence: bytes, options: VerifyOptions, *, tdx: bool) -> DcapResult:
    """Run every verification step on ``evidence``; failures are findings, never exceptions."""
    result = DcapResult()
    findings = result.findings
    try:
        quote = parse_quote(evidence)
    except ParseError as exc:
        findings.failed("parse", exc.reason, exc.detail)
        return result
    kind = "TDX" if quote.is_tdx else "SGX"
    findings.passed(
        "parse",
        f"{kind} quote v{quote.header.version}, {quote.body_type.name} body, {quote.length} bytes",
    )
    if quote.is_tdx != tdx:
        findings.failed(
            "tee_type",
            "dcap.wrong_tee_type",
            f"a {kind} quote given to the {'SGX' if tdx else 'TDX'} verifier",
        )
        return result
    result.quote = quote
    _check_quote_signature(quote, findings)
    anchors = intel_anchors(options)
    if not anchors:
        findings.failed("pck_chain", "dcap.no_trust_anchor", "no Intel SGX Root CA is trusted")
        return result
    platform = _verify_platform(
        quote, anchor=_pick_anchor(quote.certification.pck_chain_pem, anchors), options=options
    )
    findings.extend(platform.findings)
    result.anchor = platform.anchor
    result.pck = platform.pck
    result.pck_ca = platform.pck_ca
    result.tcb_info = platform.tcb_info
    result.qe_identity = platform.qe_identity
    result.tcb = platform.tcb
    return result
