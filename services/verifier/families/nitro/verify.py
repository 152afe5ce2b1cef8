"""Nitro verification: COSE signature, certificate chain to the pinned root, time, binding.

Pure and synchronous: the clock and the AWS anchors come from
:class:`~services.verifier.families.base.VerifyOptions` (``options.trust.anchors("aws")``);
nothing here reads files or the network. Every failing step is reported, each as a
:class:`~services.verifier.families.base.Reason` with a stable code:

    nitro.unsupported_algorithm          the protected alg is not ES384 (-35)
    nitro.cert_malformed                 the document certificate or a cabundle entry is not DER
    nitro.signing_key_invalid            the document certificate's key is not ECDSA P-384
    nitro.signature_invalid              the ES384 signature over the Sig_structure fails
    nitro.no_trust_anchor                no AWS root is trusted, or cabundle[0] is not one
    nitro.chain_invalid                  a link's issuer/signature or a CA constraint is wrong
    nitro.cert_expired / nitro.cert_not_yet_valid   a chain certificate is outside its validity
    nitro.timestamp_outside_leaf_validity   the document's timestamp is outside its certificate
    nitro.report_data_mismatch           user_data is not the expected binding value

Binding: the mesh binds evidence to ``SHA-512(nonce || ephemeral public key)`` (64 bytes) in
every family. SNP and TDX carry it in REPORT_DATA; a Nitro enclave puts the same 64 bytes in the
document's ``user_data``, so one rule holds across families. The document's own ``nonce`` and
``public_key`` fields are reported as claims for protocols that use them instead.

``verified`` covers everything but the binding: a document bound to somebody else's nonce is
still authentic AWS evidence (and still contraindicated, by its own reason). A naive
``options.now`` is taken as UTC.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric import ec

from services.verifier.families import cose
from services.verifier.families.base import Check, Reason, VerifyOptions
from services.verifier.families.nitro import certs
from services.verifier.families.nitro.certs import TS, CertFacts, CertificateError
from services.verifier.families.nitro.parse import NitroDocument, SignedDocument

AWS_VENDOR = "aws"


@dataclass
class NitroVerification:
    """Everything verification established, for appraisal and the human-readable report."""

    document: NitroDocument
    leaf: CertFacts | None = None
    trust_anchor: str | None = None
    checks: list[Check] = field(default_factory=list)
    failures: list[Reason] = field(default_factory=list)
    binding_failures: list[Reason] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        """Signature, chain and validity all hold."""
        return not self.failures

    @property
    def reasons(self) -> list[Reason]:
        return [*self.failures, *self.binding_failures]

    def passed(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, True, detail))

    def fail(self, name: str, code: str, detail: str) -> None:
        self.checks.append(Check(name, False, detail))
        self.failures.append(Reason(code, detail))


def verify(signed: SignedDocument, options: VerifyOptions) -> NitroVerification:
    """Verify a parsed document against ``options`` (time, AWS anchors, binding)."""
    document = signed.document
    result = NitroVerification(document=document)
    now = options.now if options.now.tzinfo else options.now.replace(tzinfo=UTC)
    algorithm_ok = cose.algorithm(signed.cose) is cose.Algorithm.ES384
    if algorithm_ok:
        result.passed("algorithm", "ES384 (ECDSA P-384 with SHA-384)")
    else:
        result.fail(
            "algorithm",
            "nitro.unsupported_algorithm",
            f"COSE alg {signed.cose.alg!r} is not ES384 (-35)",
        )
    try:
        leaf = certs.load(document.certificate)
    except CertificateError as exc:
        result.fail("certificate", exc.code, f"document certificate: {exc.detail}")
        return _bind(result, options.expected_report_data)
    result.leaf = leaf
    key = leaf.p384_key
    if key is None:
        result.fail(
            "certificate",
            "nitro.signing_key_invalid",
            f"{leaf.name} does not certify an ECDSA P-384 key",
        )
    elif algorithm_ok:
        _signature(result, signed, leaf, key)
    _chain(result, leaf, signed.document.cabundle, options, now)
    _leaf_window(result, leaf, document)
    return _bind(result, options.expected_report_data)


def _signature(
    result: NitroVerification,
    signed: SignedDocument,
    leaf: CertFacts,
    key: ec.EllipticCurvePublicKey,
) -> None:
    if cose.verify_sign1(signed.cose, key):
        result.passed("signature", f"ES384 signature by {leaf.name} holds")
    else:
        result.fail(
            "signature",
            "nitro.signature_invalid",
            f"COSE_Sign1 signature does not verify with {leaf.name}",
        )


def _chain(
    result: NitroVerification,
    leaf: CertFacts,
    cabundle: tuple[bytes, ...],
    options: VerifyOptions,
    now: datetime,
) -> None:
    chain = certs.check_chain(leaf, cabundle, options.trust.anchors(AWS_VENDOR))
    for code, detail in chain.problems:
        result.fail("chain", code, detail)
    if chain.anchor is None:
        return
    result.trust_anchor = chain.anchor.label
    if not chain.problems:
        names = " <- ".join(f.name for f in reversed(chain.path))
        result.passed("chain", f"{names} ({chain.anchor.label})")
    problems = certs.validity_problems(chain.path, now)
    for code, detail in problems:
        result.fail("validity", code, detail)
    if not problems:
        result.passed("validity", f"all {len(chain.path)} certificates valid at {now:{TS}}")


def _leaf_window(result: NitroVerification, leaf: CertFacts, document: NitroDocument) -> None:
    stamp = document.timestamp
    window = f"[{leaf.not_before:{TS}}, {leaf.not_after:{TS}}]"
    if leaf.not_before <= stamp <= leaf.not_after:
        result.passed("timestamp", f"document timestamp {stamp:{TS}} inside {window}")
    else:
        result.fail(
            "timestamp",
            "nitro.timestamp_outside_leaf_validity",
            f"document timestamp {stamp:{TS}} is outside its certificate's {window}",
        )


def _bind(result: NitroVerification, expected: bytes | None) -> NitroVerification:
    if expected is None:
        return result
    actual = result.document.user_data
    if (
        actual is not None
        and len(actual) == len(expected)
        and hmac.compare_digest(actual, expected)
    ):
        result.passed("report_data", "user_data equals the expected binding")
        return result
    if actual is None:
        detail = "the document carries no user_data to bind"
    else:
        detail = "user_data does not equal the expected binding value"
        if len(actual) != len(expected):
            detail += f" ({len(actual)} bytes, expected {len(expected)})"
    result.checks.append(Check("report_data", False, detail))
    result.binding_failures.append(Reason("nitro.report_data_mismatch", detail))
    return result
