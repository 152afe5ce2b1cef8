"""Checks on what a TEE device returned, before the evidence leaves the node.

No signatures are checked here (that is the verifier's job); these catch a wrong, stale or
malformed report at the node, so the operator sees the device's fault rather than a
contraindicated verdict far away. Shared by the configfs-tsm and the ioctl sources.
"""

from __future__ import annotations

from services.mesh import events
from services.mesh.errors import ConfigError, ParseError, VerificationError
from services.verifier.families.dcap.quote import parse_quote
from services.verifier.families.snp.certtable import parse_cert_table
from services.verifier.families.snp.parse import parse_report

REPORT_DATA_SIZE = 64


def require_report_data(report_data: bytes) -> bytes:
    """REPORT_DATA must be exactly 64 bytes: never padded or truncated behind the caller's back."""
    if not isinstance(report_data, bytes | bytearray) or len(report_data) != REPORT_DATA_SIZE:
        size = len(report_data) if isinstance(report_data, bytes | bytearray) else "non-bytes"
        raise ConfigError(
            "collector.report_data_size",
            f"REPORT_DATA must be {REPORT_DATA_SIZE} bytes, got {size}",
        )
    return bytes(report_data)


def snp_evidence(
    report: bytes, certificates: bytes | None, report_data: bytes, *, vmpl: int | None = None
) -> events.SnpEvidence:
    """Sanity-check what a device returned before it leaves the node; no signature checks here.

    The report must parse exactly and echo ``report_data`` (and ``vmpl`` when one was asked
    for); a non-empty certificate table must parse. Catching a wrong or stale report here gives
    the operator the device's fault, not a contraindicated verdict far away.
    """
    try:
        parsed = parse_report(report)
    except ParseError as exc:
        raise ParseError("collector.bad_report", f"SEV-SNP report from the device: {exc}") from exc
    if parsed.report_data != report_data:
        raise VerificationError(
            "collector.report_data_mismatch", "the SEV-SNP report binds other REPORT_DATA"
        )
    if vmpl is not None and parsed.vmpl != vmpl:
        raise VerificationError(
            "collector.vmpl_mismatch", f"asked for VMPL {vmpl}, the report says {parsed.vmpl}"
        )
    if certificates:
        try:
            parse_cert_table(certificates)
        except ParseError as exc:
            raise ParseError("collector.bad_cert_table", str(exc)) from exc
    return events.SnpEvidence(
        report=bytes(report), certificates=bytes(certificates) if certificates else None
    )


def check_dcap_quote(quote: bytes, report_data: bytes, *, tdx: bool) -> bytes:
    """The quote must parse exactly, be of the expected TEE and echo ``report_data``."""
    kind = "TDX" if tdx else "SGX"
    try:
        parsed = parse_quote(quote)
    except ParseError as exc:
        raise ParseError("collector.bad_report", f"{kind} quote from the device: {exc}") from exc
    if parsed.is_tdx != tdx:
        raise ParseError("collector.bad_report", f"expected a {kind} quote, got another TEE's")
    if parsed.body.report_data != report_data:
        raise VerificationError(
            "collector.report_data_mismatch", f"the {kind} quote binds other REPORT_DATA"
        )
    return bytes(quote)
