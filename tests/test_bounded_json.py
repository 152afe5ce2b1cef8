"""Hostile JSON nesting: refused with a family reason, never a RecursionError.

Attacks: 5,000-deep objects and arrays as evidence of every JSON family, through the CLI
and through the bus; the same inside Azure runtime data, a CCA CPAK, Intel collateral, a
wire message and a config file; and a scanner input built to make regular expressions
backtrack.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import structlog.testing

from services.cli import main
from services.mesh import config, events, subjects
from services.mesh.boundedjson import MAX_DEPTH, check_depth, depth
from services.mesh.bus import Bus
from services.mesh.errors import ConfigError, ParseError
from services.mesh.keys import SigningKey, TrustedKeys
from services.verifier import ear, registry
from services.verifier.families.azure.evidence import parse_evidence as parse_azure
from services.verifier.families.azure.runtime import parse_runtime_data
from services.verifier.families.base import (
    Appraisal,
    Status,
    VerifyOptions,
    appraise_untrusted,
)
from services.verifier.families.cca.keys import parse_cpak
from services.verifier.families.dcap.pcs import decode_tcb_info, parse_tcb_info_body
from services.verifier.families.tpm.evidence import parse_evidence as parse_tpm
from services.verifier.trust import TrustStore
from services.verifier.worker import VerifierWorker

JSON_FAMILIES = ("tpm", "az-snp-vtpm", "az-tdx-vtpm")
DEEP = 5_000


def deep_objects(n: int = DEEP) -> bytes:
    return b'{"a":' * n + b"1" + b"}" * n


def deep_arrays(n: int = DEEP) -> bytes:
    # Inside an object field, so a typed decoder has to skip it rather than reject the type.
    return b'{"version": 1, "x": ' + b"[" * n + b"]" * n + b"}"


SHAPES = {"objects": deep_objects, "arrays": deep_arrays}


def _nested(rng: random.Random, level: int) -> tuple[Any, int]:
    """A random JSON value and its bracket depth; strings are full of brackets and escapes."""
    kind = rng.randrange(4) if level < 12 else 0
    if kind == 0:
        return rng.choice(['[{"\\', "]]}}", '\\"[', "plain", 7, None, True]), 0
    items = [_nested(rng, level + 1) for _ in range(rng.randrange(4))]
    inner = max((d for _, d in items), default=0)
    if kind == 1:
        return [v for v, _ in items], inner + 1
    return {f"k{i}[": v for i, (v, _) in enumerate(items)}, inner + 1


def test_depth_agrees_with_the_structure_of_real_json() -> None:
    rng = random.Random(7)
    for _ in range(300):
        value, expected = _nested(rng, 0)
        assert depth(json.dumps(value).encode()) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"1", 0),
        (b'"[[[["', 0),
        (b'["\\"[[", "\\\\", []]', 2),
        (b'{"a": "}}}}", "b": [{}]}', 3),
        (b'["unterminated [[[[[[', 1),
        (b"]]]][[", 0),  # a parser stops at the first stray closer, before anything nests
    ],
)
def test_depth_of_tricky_inputs(data: bytes, expected: int) -> None:
    assert depth(data) == expected


def test_the_scan_stays_linear_on_inputs_built_to_backtrack() -> None:
    hostile = [
        b'"' + b'\\"' * 400_000,  # one string that never ends, full of escaped quotes
        b'"\\' * 400_000,
        b'""' * 400_000,
        b"[]," * 300_000,
    ]
    for data in hostile:
        started = time.perf_counter()
        depth(data)
        assert time.perf_counter() - started < 2.0


def test_the_bound_is_inclusive() -> None:
    check_depth(deep_objects(MAX_DEPTH), "x.evidence_malformed")
    with pytest.raises(ParseError) as caught:
        check_depth(deep_objects(MAX_DEPTH + 1), "x.evidence_malformed")
    assert caught.value.reason == "x.evidence_malformed"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", JSON_FAMILIES)
def test_cli_verify_prints_a_contraindicated_verdict(
    family: str, shape: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evidence = tmp_path / "evidence.json"
    evidence.write_bytes(SHAPES[shape]())
    (tmp_path / "roots").mkdir()  # no vendor roots: parsing fails before any are needed
    argv = ["verify", str(evidence), "--family", family, "--roots", str(tmp_path / "roots")]
    assert main([*argv, "--offline", "--json"]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["status"] == "contraindicated"
    assert [r["code"] for r in verdict["reasons"]] == [f"{family}.evidence_malformed"]
    assert "nested deeper than" in verdict["reasons"][0]["message"]  # the bound, not a crash


@pytest.mark.parametrize("shape", SHAPES)
def test_nested_json_elsewhere_is_refused_with_the_parsers_own_reason(shape: str) -> None:
    data = SHAPES[shape]()
    parsers: list[tuple[Callable[[bytes], object], str]] = [
        (parse_tpm, "tpm.evidence_malformed"),
        (functools.partial(parse_azure, tdx=False), "az-snp-vtpm.evidence_malformed"),
        (functools.partial(parse_azure, tdx=True), "az-tdx-vtpm.evidence_malformed"),
        (parse_runtime_data, "az.runtime_data_invalid"),
        (parse_cpak, "cca.cpak_invalid"),
        (decode_tcb_info, "dcap.tcb_info_malformed"),
        (parse_tcb_info_body, "dcap.tcb_info_malformed"),
        (lambda raw: events.decode(raw, events.EvidenceEvent), "wire.malformed"),
    ]
    for parse, reason in parsers:
        with pytest.raises(ParseError) as caught:
            parse(data[: 8 * 1024] if parse is parse_cpak else data)
        assert caught.value.reason == reason


def test_a_deeply_nested_config_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(deep_objects())
    with pytest.raises(ConfigError):
        config.load(path)


class _Crashing:
    """A family whose parser lets a hostile input through to a RecursionError."""

    family: ClassVar[str] = "tpm"

    def appraise(self, evidence: bytes, options: VerifyOptions) -> Appraisal:
        return self.appraise(evidence, options)


def test_an_exception_escaping_a_family_becomes_a_contraindicated_appraisal(
    tmp_path: Path,
) -> None:
    options = VerifyOptions(now=events.utcnow(), trust=TrustStore.load(tmp_path / "none"))
    with structlog.testing.capture_logs() as logged:
        appraisal = appraise_untrusted(_Crashing(), b'{"secret": "s3cr3t"}', options)
    assert appraisal.status == Status.CONTRAINDICATED
    assert [r.code for r in appraisal.reasons] == ["tpm.evidence_malformed"]
    assert "RecursionError" in appraisal.reasons[0].message
    (entry,) = [e for e in logged if e["event"] == "appraise.crashed"]
    assert entry["error"] == "RecursionError" and "s3cr3t" not in repr(logged)


def _evidence(family: str, document: bytes) -> events.Evidence:
    if family == "tpm":
        return events.TpmEvidence(document=document)
    if family == "az-snp-vtpm":
        return events.AzSnpVtpmEvidence(document=document)
    return events.AzTdxVtpmEvidence(document=document)


@pytest.mark.parametrize("family", JSON_FAMILIES)
async def test_on_the_bus_a_contraindicated_verdict_at_once_and_one_delivery(
    family: str, bus: Bus, tmp_path: Path
) -> None:
    key = SigningKey.generate(f"verifier-{family}")
    key.publish_to(tmp_path / "trusted")
    worker = VerifierWorker(
        bus, family, registry.get(family), key, TrustStore.load(tmp_path / "none")
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop, max_deliver=5, ack_wait=30.0))
    verdicts = await bus.js.subscribe(subjects.verdict(family, "node-x"), ordered_consumer=True)
    try:
        event = events.EvidenceEvent(
            node="node-x",
            nonce=b"n" * 32,
            public_key=b"k" * 32,
            evidence=_evidence(family, deep_objects()),
        )
        started = time.monotonic()
        await bus.publish(subjects.evidence(family, "node-x"), event)
        msg = await verdicts.next_msg(timeout=10.0)
        elapsed = time.monotonic() - started
        verdict = events.decode(msg.data, events.Verdict)
        result = ear.read(verdict.ear, TrustedKeys.load(tmp_path / "trusted"), now=events.utcnow())
        assert verdict.status == "contraindicated"
        assert [r["code"] for r in result.reasons] == [f"{family}.evidence_malformed"]
        assert elapsed < 5.0

        for _ in range(50):
            info = await bus.js.consumer_info(subjects.STREAM_EVIDENCE, f"verifier-{family}")
            if info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.1)
        assert info.delivered.consumer_seq == 1  # delivered once ...
        assert info.num_redelivered == 0 and info.num_ack_pending == 0  # ... and acked
        dlq = await bus.js.stream_info(subjects.STREAM_DLQ)
        assert dlq.state.messages == 0
    finally:
        await verdicts.unsubscribe()
        stop.set()
        await asyncio.wait_for(running, 10)
