"""SEV-SNP verification: report signature, VEK chain, VEK-to-report consistency, binding.

Pure and synchronous: the clock, trust anchors and collateral come from
:class:`~services.verifier.families.base.VerifyOptions`; nothing here reads files or the network.
The steps are independent where they can be, and every failing one is reported (a report whose
bytes were altered usually fails both its signature and the TCB match), each as a
:class:`~services.verifier.families.base.Reason` with a stable code:

    snp.unsupported_signature_algo  SIGNATURE_ALGO is not 1 (ECDSA P-384 with SHA-384)
    snp.report_unsigned             SIGNING_KEY is "none", or MASK_CHIP_KEY hides the VCEK
    snp.{vcek,vlek}_missing         neither the certificate table nor the collateral has it
    snp.{vcek,vlek}_malformed       not a certificate
    snp.{vcek,vlek}_key_invalid     not an ECDSA P-384 key
    snp.{vcek,vlek}_oid_invalid     an AMD KDS extension is missing or malformed
    snp.signing_key_mismatch        the certificate is of the other kind than SIGNING_KEY says
    snp.no_trust_anchor             no trusted ASK/ASVK carries the VEK's issuer name
    snp.{vcek,vlek}_chain_invalid   the ASK/ASVK did not sign the VEK
    snp.cert_expired / snp.cert_not_yet_valid   a chain certificate is outside its validity
    snp.crl_malformed / snp.crl_invalid / snp.crl_stale   a supplied ``crl.der`` is unusable
    snp.cert_revoked                the ARK's CRL revokes the ASK/ASVK
    snp.product_mismatch            VEK product, anchor product and report CPUID disagree
    snp.tcb_mismatch                REPORTED_TCB is not the TCB the VEK certifies
    snp.chip_id_mismatch            CHIP_ID is not the VCEK's hardware ID
    snp.report_signature_invalid    the ECDSA signature over [0, 0x2A0) does not verify
    snp.report_data_mismatch        REPORT_DATA is not the expected binding value

``verified`` covers everything but the binding: the evidence is authentic AMD evidence even when
it is bound to somebody else's nonce (that is still contraindicated, by its own reason). A naive
``options.now`` is taken as UTC rather than failing the comparison with certificate times.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from services.mesh.errors import AttestmeshError, CollateralError
from services.verifier.families.base import Check, Reason, VerifyOptions
from services.verifier.families.snp import certs
from services.verifier.families.snp.certs import Issuer, Vek
from services.verifier.families.snp.crl import crl_problems
from services.verifier.families.snp.parse import (
    SIG_ALGO_ECDSA_P384_SHA384,
    AttestationReport,
    Product,
    SigningKey,
    SnpEvidence,
    TcbLayout,
)
from services.verifier.trust import AmdAnchors

_ECDSA_SHA384 = ec.ECDSA(hashes.SHA384())
_COLLATERAL_NAMES = {SigningKey.VCEK: "vcek.der", SigningKey.VLEK: "vlek.der"}
CRL_NAME = "crl.der"


@dataclass
class SnpVerification:
    """Everything verification established, for appraisal and the human-readable report."""

    report: AttestationReport
    vek: Vek | None = None
    anchors: AmdAnchors | None = None
    product: Product | None = None
    checks: list[Check] = field(default_factory=list)
    failures: list[Reason] = field(default_factory=list)
    binding_failures: list[Reason] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        """Signature, chain and VEK/report consistency all hold."""
        return not self.failures

    @property
    def reasons(self) -> list[Reason]:
        return [*self.failures, *self.binding_failures]

    @property
    def trust_anchor(self) -> str | None:
        return self.anchors.label if self.anchors is not None else None

    def _check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))

    def _fail(self, name: str, code: str, detail: str) -> None:
        self.checks.append(Check(name, False, detail))
        self.failures.append(Reason(code, detail))

    def _fail_error(self, name: str, error: AttestmeshError) -> None:
        self._fail(name, error.reason, error.detail or error.reason)


def verify(evidence: SnpEvidence, options: VerifyOptions) -> SnpVerification:
    """Verify parsed SNP evidence against ``options`` (time, anchors, collateral, binding)."""
    report = evidence.report
    result = SnpVerification(report=report)
    algo_ok = report.signature_algo == SIG_ALGO_ECDSA_P384_SHA384
    if algo_ok:
        result._check("signature_algo", True, "ECDSA P-384 with SHA-384")
    else:
        result._fail(
            "signature_algo",
            "snp.unsupported_signature_algo",
            f"SIGNATURE_ALGO {report.signature_algo} is not 1 (ECDSA P-384 with SHA-384)",
        )
    if report.signing_key is SigningKey.NONE or (
        report.signing_key is SigningKey.VCEK and report.mask_chip_key
    ):
        why = "SIGNING_KEY is none" if report.signing_key is SigningKey.NONE else "MASK_CHIP_KEY"
        result._fail("signing_key", "snp.report_unsigned", f"report is not signed ({why})")
    else:
        result._check("signing_key", True, report.signing_key.name)
        result.vek = _endorsement_key(result, evidence, options.collateral)
    if result.vek is not None:
        _verify_chain(result, result.vek, options)
        if algo_ok:
            _verify_signature(result, result.vek)
    _verify_binding(result, options.expected_report_data)
    return result


def verify_report_signature(report: AttestationReport, key: ec.EllipticCurvePublicKey) -> bool:
    """ECDSA P-384/SHA-384 over bytes [0, 0x2A0) with the report's little-endian R and S."""
    r, s = report.signature_rs
    if r <= 0 or s <= 0:
        return False
    try:
        key.verify(encode_dss_signature(r, s), report.signed_bytes, _ECDSA_SHA384)
    except InvalidSignature:
        return False
    return True


def _endorsement_key(
    result: SnpVerification, evidence: SnpEvidence, collateral: Mapping[str, bytes]
) -> Vek | None:
    kind = evidence.report.signing_key
    name = _COLLATERAL_NAMES[kind]
    blob, source = None, ""
    if evidence.cert_table is not None:
        table = evidence.cert_table
        blob = table.vcek if kind is SigningKey.VCEK else table.vlek
        source = "certificate table"
    if blob is None:
        blob, source = collateral.get(name), f"collateral {name}"
    if blob is None:
        result._fail(
            "vek",
            f"snp.{kind.name.lower()}_missing",
            f"no {kind.name} in the evidence's certificate table or collateral {name}",
        )
        return None
    try:
        vek = certs.load_vek(blob, kind)
    except CollateralError as exc:
        result._fail_error("vek", exc)
        return None
    result._check("vek", True, f"{kind.name} from {source} ({vek.product_name})")
    return vek


def _verify_chain(result: SnpVerification, vek: Vek, options: VerifyOptions) -> None:
    try:
        issuer = certs.find_anchor(vek, options.trust)
    except AttestmeshError as exc:
        result._fail_error("chain", exc)
        return
    result.anchors = anchors = issuer.anchors
    result.product = product = Product(anchors.product)
    result._check("chain", True, f"{vek.name} <- {issuer.cn} <- {issuer.ark_cn} ({anchors.label})")
    now = options.now if options.now.tzinfo else options.now.replace(tzinfo=UTC)
    _check_validity(result, vek, issuer, now)
    _check_revocation(result, issuer, options.collateral.get(CRL_NAME), now)
    _check_product(result, vek, product)
    _check_tcb_and_chip(result, vek, product)


def _check_validity(result: SnpVerification, vek: Vek, issuer: Issuer, now: datetime) -> None:
    problems = certs.validity_problems(vek, issuer, now)
    for code, detail in problems:
        result._fail("validity", code, detail)
    if not problems:
        result._check("validity", True, f"all chain certificates valid at {now:{certs.TS}}")


def _check_revocation(
    result: SnpVerification, issuer: Issuer, crl: bytes | None, now: datetime
) -> None:
    if crl is None:
        result._check("revocation", True, f"no {CRL_NAME} in collateral; revocation not checked")
        return
    problems = crl_problems(crl, issuer, now)
    for code, detail in problems:
        result._fail("revocation", code, detail)
    if not problems:
        result._check("revocation", True, f"{issuer.cn} is not revoked by {issuer.ark_cn}")


def _check_tcb_and_chip(result: SnpVerification, vek: Vek, product: Product) -> None:
    report = result.report
    mismatches = certs.tcb_mismatches(vek, report.reported_tcb, product)
    if mismatches:
        detail = f"REPORTED_TCB differs from the {vek.name}: {'; '.join(mismatches)}"
        result._fail("reported_tcb", "snp.tcb_mismatch", detail)
    else:
        result._check("reported_tcb", True, f"REPORTED_TCB is certified by the {vek.name}")
    if vek.kind is not SigningKey.VCEK:
        return
    if report.chip_id_masked:
        result._check("chip_id", True, "CHIP_ID masked by the host; hwID not compared")
    elif certs.hwid_matches(vek, report.chip_id):
        result._check("chip_id", True, "CHIP_ID equals the VCEK hwID")
    else:
        result._fail("chip_id", "snp.chip_id_mismatch", "CHIP_ID differs from the VCEK hwID")


def _check_product(result: SnpVerification, vek: Vek, product: Product) -> None:
    report = result.report
    problems = []
    if certs.product_of(vek) != product.value:
        problems.append(f"{vek.name} product name {vek.product_name!r} is not {product.value}")
    hint = report.product_hint
    if hint is not None and hint is not product:
        problems.append(f"report CPUID names {hint.value}, the chain {product.value}")
    if (product is Product.TURIN) != (report.tcb_layout is TcbLayout.TURIN):
        problems.append(f"VERSION {report.version}/CPUID do not fit a {product.value} chip")
    if problems:
        result._fail("product", "snp.product_mismatch", "; ".join(problems))
    else:
        result._check("product", True, product.value)


def _verify_signature(result: SnpVerification, vek: Vek) -> None:
    if verify_report_signature(result.report, vek.public_key):
        result._check("report_signature", True, f"ECDSA P-384 signature by the {vek.name} holds")
    else:
        result._fail(
            "report_signature",
            "snp.report_signature_invalid",
            f"report signature does not verify with the {vek.name} key",
        )


def _verify_binding(result: SnpVerification, expected: bytes | None) -> None:
    if expected is None:
        return
    actual = result.report.report_data
    if len(expected) == len(actual) and hmac.compare_digest(expected, actual):
        result._check("report_data", True, "REPORT_DATA equals the expected binding")
        return
    detail = "REPORT_DATA does not equal the expected binding value"
    if len(expected) != len(actual):
        detail += f" (expected value is {len(expected)} bytes, REPORT_DATA is {len(actual)})"
    result.checks.append(Check("report_data", False, detail))
    result.binding_failures.append(Reason("snp.report_data_mismatch", detail))
