"""Fuzz targets for every parser that reads outside input: only ``ParseError`` may escape.

Run one with atheris (``python -m tests.fuzz.run snp -max_total_time=60``); the test suite
runs each for a bounded number of inputs as a smoke test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from services.mesh import events
from services.mesh.errors import ParseError
from services.verifier.families.azure.hcl import parse_hcl_report
from services.verifier.families.cca.parse import parse_token
from services.verifier.families.dcap import parse_quote
from services.verifier.families.dcap.coco import parse_tdx_document
from services.verifier.families.nitro.parse import parse_document
from services.verifier.families.snp import parse_cert_table, parse_evidence
from services.verifier.families.snp.coco import parse_coco_evidence
from services.verifier.families.tpm.eventlog import parse_event_log
from services.verifier.families.tpm.structures import parse_attest, parse_signature


def _parser(parse: Callable[[bytes], Any]) -> Callable[[bytes], None]:
    def target(data: bytes) -> None:
        with contextlib.suppress(ParseError):
            parse(data)

    return target


def _wire(data: bytes) -> None:
    for kind in (events.EvidenceEvent, events.Verdict, events.Decision, events.SecretRequest):
        with contextlib.suppress(ParseError):
            events.decode(data, kind)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "snp": _parser(parse_evidence),
    "snp-certtable": _parser(parse_cert_table),
    "snp-coco": _parser(parse_coco_evidence),
    "dcap": _parser(parse_quote),
    "tdx-coco": _parser(parse_tdx_document),
    "nitro": _parser(parse_document),
    "cca": _parser(parse_token),
    "tpm-attest": _parser(parse_attest),
    "tpm-signature": _parser(parse_signature),
    "tpm-eventlog": _parser(parse_event_log),
    "azure-hcl": _parser(parse_hcl_report),
    "wire": _wire,
}
