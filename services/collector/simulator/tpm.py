"""Simulated TPM nodes: a TPM 2.0 machine and an Azure SEV-SNP CVM with a vTPM.

:class:`SimulatedTpm` quotes with an RSA AK certified by the deployment's test TPM CA
(:class:`~services.testing.tpm_pki.TpmTestPki`), binds ``report_data`` in extraData, and sends
a measured-boot event log whose replay gives the quoted PCRs, so the verifier exercises every
step it runs on real evidence. :class:`SimulatedAzSnpVtpm` is an Azure CVM on the test AMD PKI.
Both sign only under test roots, which a verifier trusts only when told to load them.
"""

from __future__ import annotations

from pathlib import Path

from services.mesh import events
from services.testing.amd_pki import AmdTestPki
from services.testing.azure_hcl import AzureSnpCvm
from services.testing.tpm_pki import EventLogBuilder, TestTpm, TpmTestPki

BOOT = (
    (0, 0x8, b"attestmesh simulated CRTM 1.0"),
    (0, 0x80000008, b"simulated firmware volume"),
    (7, 0x80000001, b"SecureBoot=1"),
    (4, 0x80000003, b"simulated shim"),
    (4, 0x80000003, b"simulated kernel"),
    (8, 0xD, b"console=ttyS0 root=/dev/vda1"),
    *((pcr, 0x4, bytes(4)) for pcr in range(8)),
)
"""A short boot: CRTM and firmware into PCR0, Secure Boot state into 7, loaders into 4..."""


def boot_log() -> EventLogBuilder:
    """The simulated machine's event log (H-CRTM at locality 3, as cloud firmware reports)."""
    log = EventLogBuilder(locality=3)
    for pcr, kind, data in BOOT:
        log.measure(pcr, kind, data)
    return log


def write_trust_dir(pki: TpmTestPki, roots: Path) -> Path:
    """Put the test TPM CA under ``roots/tpm`` for the trust store's test-anchor loader."""
    return pki.write_trust_dir(roots)


class SimulatedTpm:
    """One simulated TPM machine; each seed is another machine with its own AK."""

    family = "tpm"
    simulated = True

    def __init__(self, pki: TpmTestPki | None = None, *, seed: int = 0) -> None:
        self.pki = pki or TpmTestPki()
        log = boot_log()
        self.tpm = TestTpm(label=f"simulated-{seed}", pcrs=log.pcrs())
        self.event_log = log.encode()
        self.ak_cert = self.pki.issue_ak_cert(self.tpm.ak.public_key())

    def collect(self, report_data: bytes) -> events.Evidence:
        """Evidence whose quote's extraData is ``report_data``."""
        document = self.tpm.evidence(report_data, ak_cert=self.ak_cert, event_log=self.event_log)
        return events.TpmEvidence(document=document)


class SimulatedAzSnpVtpm:
    """One simulated Azure SEV-SNP CVM; the nonce binding goes into its vTPM quote."""

    family = "az-snp-vtpm"
    simulated = True

    def __init__(self, amd: AmdTestPki | None = None, *, seed: int = 0) -> None:
        self.cvm = AzureSnpCvm(amd, label=f"simulated-{seed}")

    def collect(self, report_data: bytes) -> events.Evidence:
        return events.AzSnpVtpmEvidence(document=self.cvm.evidence(report_data, version=2))
