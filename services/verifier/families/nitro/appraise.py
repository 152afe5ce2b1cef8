"""Nitro appraisal: claims, an EAR trust vector and a status, never an exception.

:class:`NitroVerifier` runs parse -> verify -> policy on a raw attestation document. Malformed or
untrusted evidence becomes a contraindicated :class:`Appraisal` carrying every reason found;
``verified`` is true only when the signature, chain and certificate times hold.

Claims (byte strings as lowercase hex, ``None`` when the document omits the field)::

    module_id digest timestamp_ms timestamp (RFC 3339, UTC)
    pcr0 pcr1 pcr2 pcr3 pcr4 pcr5 pcr6 pcr7 pcr8     image, kernel, application, IAM role,
                                                      instance, -, -, -, signing certificate
    pcrs ({"index": hex} for every PCR present)
    user_data nonce public_key debug
    certificate {subject, not_before, not_after} trust_anchor

Trust vector (AR4SI): ``instance-identity`` follows the chain and the ``user_data`` binding;
``hardware`` the chain to AWS's root (and the test-anchor knob); ``configuration`` and
``runtime-opaque`` the debug mode; ``executables`` the PCR allow-list (no claim when none is
configured). The rest make no claim.
"""

from __future__ import annotations

from datetime import UTC
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
from services.verifier.families.nitro import policy as nitro_policy
from services.verifier.families.nitro.certs import TS
from services.verifier.families.nitro.parse import NitroDocument, parse_document
from services.verifier.families.nitro.policy import NitroPolicy, is_debug
from services.verifier.families.nitro.verify import NitroVerification, verify

FAMILY = "nitro"
NAMED_PCRS = range(9)

_RUNTIME_CODES = frozenset({"nitro.debug_enabled"})
_CONFIG_CODES = frozenset(
    {"nitro.debug_enabled", "nitro.document_too_old", "nitro.timestamp_in_future"}
)
_HARDWARE_CODES = frozenset({"nitro.test_anchor_not_allowed"})
_IDENTITY_CODES = frozenset({"nitro.nonce_missing", "nitro.public_key_missing"})


class NitroVerifier:
    """The AWS Nitro Enclaves family verifier (see the module docstring for claims)."""

    family: ClassVar[str] = FAMILY

    def __init__(self, policy: NitroPolicy | None = None) -> None:
        self.policy = policy if policy is not None else NitroPolicy()

    def appraise(self, evidence: bytes, options: VerifyOptions) -> Appraisal:
        """Parse, verify and appraise ``evidence``; never raises for bad input."""
        try:
            signed = parse_document(evidence)
        except ParseError as exc:
            return unparsable(FAMILY, exc)
        document = signed.document
        result = verify(signed, options)
        now = options.now if options.now.tzinfo else options.now.replace(tzinfo=UTC)
        policy_reasons, policy_checks = nitro_policy.evaluate(
            self.policy, document, now=now, trust_anchor=result.trust_anchor
        )
        parse_check = Check(
            "parse",
            True,
            f"attestation document of {document.module_id}, {len(document.pcrs)} PCRs",
        )
        reasons = [*result.reasons, *policy_reasons]
        return Appraisal(
            family=FAMILY,
            status=worst([r.status for r in reasons]),
            claims=claims(document, result),
            trust_vector=_trust_vector(result, policy_reasons, self.policy),
            reasons=reasons,
            checks=[parse_check, *result.checks, *policy_checks],
            verified=result.verified,
            bound=options.expected_report_data is not None and not result.binding_failures,
            hwid=(hwid.nitro(document.module_id) or "") if result.verified else "",
        )


def _hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def claims(document: NitroDocument, result: NitroVerification | None = None) -> dict[str, Any]:
    """The document's claims (see the module docstring), plus what verification established."""
    out: dict[str, Any] = {
        "module_id": document.module_id,
        "digest": document.digest,
        "timestamp_ms": document.timestamp_ms,
        "timestamp": document.timestamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    for index in NAMED_PCRS:
        out[f"pcr{index}"] = _hex(document.pcr(index))
    out["pcrs"] = {str(index): value.hex() for index, value in document.pcrs.items()}
    out["user_data"] = _hex(document.user_data)
    out["nonce"] = _hex(document.nonce)
    out["public_key"] = _hex(document.public_key)
    out["debug"] = is_debug(document)
    leaf = result.leaf if result is not None else None
    out["certificate"] = (
        None
        if leaf is None
        else {
            "subject": leaf.name,
            "not_before": f"{leaf.not_before:{TS}}",
            "not_after": f"{leaf.not_after:{TS}}",
        }
    )
    out["trust_anchor"] = result.trust_anchor if result is not None else None
    return out


def _trust_vector(
    result: NitroVerification, policy_reasons: list[Reason], policy: NitroPolicy
) -> dict[str, int]:
    bad = TV_CONTRAINDICATED
    if not result.verified:
        return trust_vector(instance=bad, hardware=bad, configuration=bad, runtime=bad)
    codes = {r.code for r in policy_reasons}

    def tier(relevant: frozenset[str]) -> int:
        return bad if codes & relevant else TV_AFFIRMING

    executables = TV_NO_CLAIM
    if policy.allowed_pcrs is not None:
        executables = bad if "nitro.pcr_not_allowed" in codes else TV_AFFIRMING
    identity = bad if result.binding_failures or codes & _IDENTITY_CODES else TV_AFFIRMING
    return trust_vector(
        instance=identity,
        hardware=tier(_HARDWARE_CODES),
        configuration=tier(_CONFIG_CODES),
        runtime=tier(_RUNTIME_CODES),
        executables=executables,
    )
