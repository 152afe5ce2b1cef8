"""TPM evidence sources: the simulated node, the real source on a fake, and on swtpm."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.collector.simulator.tpm import SimulatedAzSnpVtpm, SimulatedTpm
from services.collector.sources.tpm import QualifyingDataTooLarge, Tpm2Backend, TpmSource
from services.mesh import events
from services.mesh.errors import ConfigError
from services.testing.amd_pki import AmdTestPki
from services.testing.tpm_pki import TestTpm, TpmTestPki
from services.verifier.families.azure import AzSnpVtpmVerifier
from services.verifier.families.base import Status, VerifyOptions
from services.verifier.families.tpm import TpmPolicy, TpmVerifier
from services.verifier.families.tpm.quote import PCR_COUNT
from services.verifier.trust import TrustStore

REPORT_DATA = bytes(range(64))


class FakeBackend:
    """A TPM backend over the test TPM; optionally a TPM that refuses 64-byte data."""

    def __init__(self, *, max_data: int = 66, drift: int = 0) -> None:
        self.tpm = TestTpm(label="source")
        self.max_data = max_data
        self.drift = drift
        self.quotes = 0

    def ak_public(self) -> bytes:
        return self.tpm.ak_public

    def read_pcrs(self, indices: tuple[int, ...]) -> list[bytes]:
        return [self.tpm.pcrs[i] for i in indices]

    def quote(self, qualifying_data: bytes, indices: tuple[int, ...]) -> tuple[bytes, bytes]:
        if len(qualifying_data) > self.max_data:
            raise QualifyingDataTooLarge("TPM_RC_SIZE")
        self.quotes += 1
        if self.quotes <= self.drift:  # a PCR is extended between read and quote
            self.tpm.pcrs[10] = bytes([self.quotes]) * 32
        return self.tpm.quote(qualifying_data)


def _verify(evidence: events.Evidence, trust: TrustStore, **policy: object) -> object:
    assert isinstance(evidence, events.TpmEvidence)
    options = VerifyOptions(now=datetime.now(UTC), trust=trust, expected_report_data=REPORT_DATA)
    return TpmVerifier(TpmPolicy(**policy)).appraise(evidence.document, options)  # type: ignore[arg-type]


def test_simulated_tpm_node_is_affirming_under_its_test_root(tmp_path: Path) -> None:
    pki = TpmTestPki()
    node = SimulatedTpm(pki, seed=1)
    assert node.family == "tpm" and node.simulated
    store = TrustStore.load(None, test_dir=pki.write_trust_dir(tmp_path))
    evidence = node.collect(REPORT_DATA)
    appraisal = _verify(evidence, store)
    assert appraisal.status is Status.AFFIRMING, appraisal.reasons  # type: ignore[attr-defined]
    claims = appraisal.claims  # type: ignore[attr-defined]
    assert claims["ak_trust"] == "certificate" and claims["event_log_pcrs"] == list(range(9))
    assert events.family_of(evidence) == "tpm"


def test_simulated_azure_node(tmp_path: Path) -> None:
    amd = AmdTestPki()
    node = SimulatedAzSnpVtpm(amd)
    store = TrustStore.load(None, test_dir=amd.write_trust_dir(tmp_path))
    evidence = node.collect(REPORT_DATA)
    assert isinstance(evidence, events.AzSnpVtpmEvidence)
    options = VerifyOptions(now=datetime.now(UTC), trust=store, expected_report_data=REPORT_DATA)
    appraisal = AzSnpVtpmVerifier().appraise(evidence.document, options)
    assert appraisal.status is Status.AFFIRMING, appraisal.reasons


def test_source_on_a_fake_tpm(tmp_path: Path) -> None:
    log = tmp_path / "binary_bios_measurements"
    log.write_bytes(b"not a log")
    source = TpmSource(FakeBackend(), event_log=log)
    assert source.family == "tpm" and not source.simulated
    appraisal = _verify(source.collect(REPORT_DATA), TrustStore())
    assert [r.code for r in appraisal.reasons] == [  # type: ignore[attr-defined]
        "tpm.ak_not_anchored", "tpm.eventlog_malformed"]  # fmt: skip
    quiet = TpmSource(FakeBackend(), event_log=tmp_path / "missing")
    assert [r.code for r in _verify(quiet.collect(REPORT_DATA), TrustStore()).reasons] == [  # type: ignore[attr-defined]
        "tpm.ak_not_anchored"]  # fmt: skip


def test_source_falls_back_to_the_compact_binding() -> None:
    source = TpmSource(FakeBackend(max_data=50), event_log=None)
    appraisal = _verify(source.collect(REPORT_DATA), TrustStore())
    assert any(c.name == "nonce" and "compact" in c.detail for c in appraisal.checks)  # type: ignore[attr-defined]


def test_source_retakes_a_quote_when_pcrs_move() -> None:
    backend = FakeBackend(drift=1)
    source = TpmSource(backend, event_log=None)
    appraisal = _verify(source.collect(REPORT_DATA), TrustStore())
    assert backend.quotes == 2 and appraisal.verified  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="kept changing"):
        TpmSource(FakeBackend(drift=5), event_log=None).collect(REPORT_DATA)


def test_unreachable_tpm_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        Tpm2Backend("swtpm:host=127.0.0.1,port=1")
    assert info.value.reason == "collector.tpm_unavailable"


SWTPM = shutil.which("swtpm")
HAVE_PYTSS = importlib.util.find_spec("tpm2_pytss") is not None


def _free_port_pair() -> int:
    """A loopback port whose successor is free too (the swtpm TCTI's control channel)."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no pair of free loopback ports")


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[str]:
    """A software TPM on loopback; yields its TCTI string."""
    assert SWTPM is not None
    port = _free_port_pair()
    ctrl = port + 1
    process = subprocess.Popen(
        [SWTPM, "socket", "--tpm2", "--tpmstate", f"dir={tmp_path}",
         "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
         "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
         "--flags", "not-need-init,startup-clear"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"swtpm did not start: {process.stderr}") from None
                time.sleep(0.05)
        yield f"swtpm:host=127.0.0.1,port={port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.skipif(
    SWTPM is None or not HAVE_PYTSS,
    reason="needs swtpm (Debian package swtpm) and tpm2-pytss (pip, with libtss2-dev)",
)
def test_source_on_swtpm(swtpm: str) -> None:
    backend = Tpm2Backend(swtpm)
    try:
        source = TpmSource(backend, event_log=None)
        evidence = source.collect(REPORT_DATA)
        appraisal = _verify(evidence, TrustStore())
        assert appraisal.status is Status.WARNING, appraisal.reasons  # type: ignore[attr-defined]
        assert appraisal.verified  # type: ignore[attr-defined]
        claims = appraisal.claims  # type: ignore[attr-defined]
        assert claims["nonce"] == REPORT_DATA.hex()
        assert claims["pcr_bank"] == "sha256" and claims["pcr0"] == "00" * 32
        assert len([k for k in claims if k.startswith("pcr") and k[3:].isdigit()]) == PCR_COUNT
        pin = bytes.fromhex(claims["ak_public_sha256"])
        pinned = _verify(evidence, TrustStore(), trusted_ak_sha256=frozenset({pin}))
        assert pinned.status is Status.AFFIRMING  # type: ignore[attr-defined]
        again = TpmSource(backend, event_log=None).collect(REPORT_DATA)
        assert isinstance(again, events.TpmEvidence) and isinstance(evidence, events.TpmEvidence)
        assert _verify(again, TrustStore(), trusted_ak_sha256=frozenset({pin})).status is (  # type: ignore[attr-defined]
            Status.AFFIRMING
        )
        other = _verify(evidence, TrustStore())
        assert other.claims["ak_public_sha256"] == claims["ak_public_sha256"]  # type: ignore[attr-defined]
    finally:
        backend.close()
