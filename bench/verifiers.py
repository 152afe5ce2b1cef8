"""Verification throughput per family on one core with chains and collateral cached.

Real vectors are used where ``../shared/vectors`` (or ``$ATTESTMESH_VECTORS``) has them;
otherwise the family's simulator provides evidence in the same binary format.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.ceiling import MEASURES, rate
from services.verifier import registry
from services.verifier.families.base import Status, VerifyOptions
from services.verifier.trust import TrustStore


@dataclass(frozen=True)
class Case:
    family: str
    source: str
    evidence: bytes
    options: VerifyOptions
    signatures: int
    ceiling: str


def _vector_case(family: str, vector_id: str, signatures: int, ceiling: str) -> Case | None:
    from services.testing.vectors import load_vector, roots_dir, vectors_root

    root, roots = vectors_root(), roots_dir()
    if root is None or roots is None or not (root / family / vector_id).is_dir():
        return None
    vector = load_vector(root / family / vector_id)
    options = VerifyOptions(
        now=vector.at, trust=TrustStore.load(roots), collateral=vector.collateral
    )
    return Case(family, f"vector {vector_id}", vector.evidence, options, signatures, ceiling)


def _simulated_snp(workdir: Path) -> Case:
    from services.collector.simulator.node import SimulatedSnp, test_pki
    from services.mesh.events import evidence_bytes

    pki = test_pki(workdir / "pki")
    evidence = evidence_bytes(SimulatedSnp(pki).collect(b"\x11" * 64))
    trust = TrustStore.load(workdir / "none", test_dir=pki.roots_dir)
    options = VerifyOptions(now=datetime.now(UTC), trust=trust)
    return Case("snp", "simulated (test PKI)", evidence, options, 1, "ecdsa_p384_verify")


# Signatures each evidence needs: SNP one P-384 (the report, by the VCEK); TDX/SGX two P-256
# (the quote by the attestation key, the QE report by the PCK). With chains and collateral
# cached, the QE report's check is shared by every quote of a platform, so each new quote costs
# one fresh signature verification; both ratios are reported.
CASES: list[Callable[[Path], Case | None]] = [
    lambda _: _vector_case("snp", "snp-trustee-milan-vcek-v2", 1, "ecdsa_p384_verify"),
    _simulated_snp,
    lambda _: _vector_case("tdx", "tdx-dcapqvl-sample", 2, "ecdsa_p256_verify"),
    lambda _: _vector_case("tdx", "tdx-dcaprs-00806f050000", 2, "ecdsa_p256_verify"),
    lambda _: _vector_case("sgx", "sgx-dcapqvl-sample", 2, "ecdsa_p256_verify"),
    # Nitro: the document's ES384 signature (the cabundle chain is cached per certificate set);
    # CCA: platform token by the CPAK and realm token by the RAK, both ES384 here;
    # TPM: the AK's RSASSA-PKCS1-v1_5 signature over TPMS_ATTEST (AK certificate chain cached).
    lambda _: _vector_case("nitro", "nitro-blocky-prod", 1, "ecdsa_p384_verify"),
    lambda _: _vector_case("cca", "cca-trustee-example-token", 2, "ecdsa_p384_verify"),
    lambda _: _vector_case("tpm", "tpm-gotpm-gce-cos85-nonce9009", 1, "rsa2048_pkcs1_verify"),
]


def _interleaved(
    operation: Callable[[], object], ceiling: Callable[[float], float], seconds: float
) -> tuple[float, float]:
    """Median rates of ``operation`` and of its ceiling, measured in alternation so that a
    machine getting busier or quieter moves both alike."""
    slices = 5
    ours, theirs = [], []
    for _ in range(slices):
        theirs.append(ceiling(seconds / slices))
        ours.append(rate(operation, seconds / slices))
    return statistics.median(ours), statistics.median(theirs)


def run(seconds: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="attestmesh-bench-") as tmp:
        for build in CASES:
            case = build(Path(tmp))
            if case is None:
                continue
            verifier = registry.get(case.family)
            result = verifier.appraise(case.evidence, case.options)
            if result.status is Status.CONTRAINDICATED and not result.verified:
                raise SystemExit(f"bench case {case.source} does not verify: {result.reasons}")
            per_s, ceiling = _interleaved(
                functools.partial(verifier.appraise, case.evidence, case.options),
                MEASURES[case.ceiling],
                seconds,
            )
            rows.append(
                {
                    "family": case.family,
                    "source": case.source,
                    "per_s": round(per_s, 1),
                    "signatures": case.signatures,
                    "ceiling": case.ceiling,
                    "ceiling_per_s": round(ceiling, 1),
                    "ratio_to_ceiling": round(per_s * case.signatures / ceiling, 3),
                    "ratio_to_one_signature": round(per_s / ceiling, 3),
                }
            )
    return rows
