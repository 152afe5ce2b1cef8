"""Simulated TEE nodes for ``attestmesh up``, the tests and the benchmark.

Each test PKI (AMD's, AWS Nitro's, the TPM AK CA) keeps its private keys under a directory of the
deployment (mode 0600) so that every process of one simulated deployment (``up``, a
``collector --simulate``) signs under the same test roots that the verifier was told to trust.
These keys certify nothing real: a verifier accepts them only when its configuration names the
test roots directory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from services.collector.simulator.nitro import SimulatedNitro
from services.collector.simulator.snp import SnpSimulator
from services.collector.simulator.tpm import SimulatedAzSnpVtpm, SimulatedTpm
from services.collector.sources.base import EvidenceSource
from services.mesh import events
from services.mesh.errors import ConfigError
from services.testing import amd_pki, nitro_pki
from services.testing.tpm_pki import TpmTestPki
from services.verifier.families.snp.parse import SigningKey


@dataclass(frozen=True)
class TestPki:
    """The project's test PKI for one simulated deployment."""

    __test__ = False

    directory: Path
    amd: amd_pki.AmdTestPki
    tpm: TpmTestPki

    @property
    def roots_dir(self) -> Path:
        """The trust directory of test anchors (same layout as the vendor one)."""
        return self.directory / "roots"


def test_pki(directory: Path) -> TestPki:
    """Load the deployment's test PKI from ``directory``, creating it on first use."""
    keys = directory / "keys"
    amd_pki.load_keys(keys)
    pki = amd_pki.AmdTestPki("milan")
    pki.write_trust_dir(directory / "roots")
    nitro_pki.NitroTestPki().write_trust_dir(directory / "roots")
    tpm = TpmTestPki()
    tpm.write_trust_dir(directory / "roots")
    amd_pki.save_keys(keys)
    return TestPki(directory, pki, tpm)


test_pki.__test__ = False  # type: ignore[attr-defined]


class SimulatedSnp:
    """One simulated SEV-SNP chip; each seed is another chip with its own VCEK."""

    family = "snp"
    simulated = True

    def __init__(self, pki: TestPki, *, seed: int = 0) -> None:
        chip_id = hashlib.sha512(f"attestmesh-simulated-chip-{seed}".encode()).digest()
        self.simulator = SnpSimulator(pki.amd, signing_key=SigningKey.VCEK, chip_id=chip_id)
        self.measurement = hashlib.sha384(b"attestmesh simulated guest image").digest()

    def collect(self, report_data: bytes) -> events.Evidence:
        report = self.simulator.report(report_data, measurement=self.measurement)
        return events.SnpEvidence(report=report, certificates=self.simulator.cert_table())


def simulated_source(family: str, pki: TestPki, *, seed: int = 0) -> EvidenceSource:
    """A simulated evidence source of ``family`` signed by ``pki``."""
    if family == "snp":
        return SimulatedSnp(pki, seed=seed)
    if family == "nitro":
        return SimulatedNitro(seed=seed)
    if family == "tpm":
        return SimulatedTpm(pki.tpm, seed=seed)
    if family == "az-snp-vtpm":
        return SimulatedAzSnpVtpm(pki.amd, seed=seed)
    raise ConfigError("collector.no_simulator", f"no simulator for family {family!r} yet")
