"""The Nitro evidence sources: the simulated enclave and ``/dev/nsm`` against a fake kernel."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest

from services.collector.simulator.nitro import SimulatedNitro
from services.collector.sources import nsm
from services.collector.sources.base import EvidenceSource
from services.mesh import events
from services.testing.nitro_pki import NitroTestPki
from services.verifier.families.base import Status, VerifyOptions
from services.verifier.families.nitro import NitroVerifier
from services.verifier.trust import TrustStore

NOW = datetime(2025, 6, 1, 8, tzinfo=UTC)
REPORT_DATA = bytes(range(64))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> TrustStore:
    roots = NitroTestPki(now=NOW).write_trust_dir(tmp_path_factory.mktemp("nitro-roots"))
    return TrustStore.load(None, test_dir=roots)


def _appraise(evidence: events.Evidence, store: TrustStore, now: datetime = NOW) -> Any:
    options = VerifyOptions(now=now, trust=store, expected_report_data=REPORT_DATA)
    return NitroVerifier().appraise(events.evidence_bytes(evidence), options)


class FakeKernel:
    """Plays the ``nsm`` driver: reads the request through the struct's pointers, answers."""

    def __init__(self, answer: Callable[[dict[str, Any]], object]) -> None:
        self.answer = answer
        self.requests: list[dict[str, Any]] = []
        self.open_fds: set[int] = set()
        self.fail_open: OSError | None = None
        self.fail_ioctl: OSError | None = None
        self.length_override: int | None = None

    def opener(self, path: str, flags: int) -> int:
        if self.fail_open is not None:
            raise self.fail_open
        assert path == "/dev/nsm"
        self.open_fds.add(7)
        return 7

    def closer(self, fd: int) -> None:
        self.open_fds.discard(fd)

    def ioctl(self, fd: int, request: int, arg: Any, mutate: bool) -> int:
        assert fd in self.open_fds and mutate and request == 0xC020_0A00
        if self.fail_ioctl is not None:
            raise self.fail_ioctl
        message = nsm.NsmMessage.from_buffer(arg)
        raw = ctypes.string_at(message.request.iov_base, message.request.iov_len)
        decoded = cbor2.loads(raw)
        self.requests.append(decoded)
        reply = cbor2.dumps(self.answer(decoded))
        assert len(reply) <= message.response.iov_len == nsm.NSM_RESPONSE_MAX_SIZE
        ctypes.memmove(message.response.iov_base, reply, len(reply))
        message.response.iov_len = self.length_override or len(reply)
        return 0

    def device(self) -> nsm.IoctlNsmDevice:
        return nsm.IoctlNsmDevice(opener=self.opener, ioctl=self.ioctl, closer=self.closer)


def _nsm_answer(request: dict[str, Any]) -> object:
    fields = request["Attestation"]
    simulator = SimulatedNitro(clock=lambda: NOW)
    document = simulator.document(
        fields["user_data"], nonce=fields["nonce"], public_key=fields["public_key"]
    )
    return {"Attestation": {"document": document}}


def test_ioctl_number_and_struct_layout() -> None:
    assert ctypes.sizeof(nsm.NsmMessage) == 32
    assert nsm.NSM_IOCTL_REQUEST == 0xC0200A00
    assert nsm.iowr(0x0A, 0, 32) == (3 << 30) | (32 << 16) | (0x0A << 8)


def test_nsm_source_collects_a_verifiable_document(store: TrustStore) -> None:
    kernel = FakeKernel(_nsm_answer)
    source: EvidenceSource = nsm.NsmSource(kernel.device())
    assert (source.family, source.simulated) == ("nitro", False)
    evidence = source.collect(REPORT_DATA)
    assert isinstance(evidence, events.NitroEvidence)
    assert kernel.requests == [
        {"Attestation": {"user_data": REPORT_DATA, "nonce": None, "public_key": None}}
    ]
    assert not kernel.open_fds
    appraisal = _appraise(evidence, store)
    assert appraisal.status is Status.AFFIRMING, appraisal.reasons
    assert appraisal.claims["user_data"] == REPORT_DATA.hex()


def test_nsm_source_passes_nonce_and_public_key(store: TrustStore) -> None:
    kernel = FakeKernel(_nsm_answer)
    source = nsm.NsmSource(kernel.device())
    evidence = source.collect(REPORT_DATA, nonce=b"\x01" * 32, public_key=b"\x02" * 65)
    claims = _appraise(evidence, store).claims
    assert claims["nonce"] == "01" * 32 and claims["public_key"] == "02" * 65


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ({"Error": "InvalidArgument"}, "nsm.error_response"),
        ({"Attestation": {}}, "nsm.response_malformed"),
        ({"Attestation": {"document": b""}}, "nsm.response_malformed"),
        ({"DescribeNSM": {"document": b"x"}}, "nsm.response_malformed"),
        ([1, 2], "nsm.response_malformed"),
    ],
)
def test_nsm_error_and_malformed_responses(answer: object, reason: str) -> None:
    kernel = FakeKernel(lambda _request: answer)
    with pytest.raises(nsm.NsmError) as info:
        nsm.NsmSource(kernel.device()).collect(REPORT_DATA)
    assert info.value.reason == reason
    assert not kernel.open_fds


def test_device_failures_are_typed_and_close_the_device() -> None:
    kernel = FakeKernel(_nsm_answer)
    kernel.fail_open = FileNotFoundError(errno.ENOENT, "No such file or directory")
    with pytest.raises(nsm.NsmError, match="nsm.unavailable"):
        nsm.NsmSource(kernel.device()).collect(REPORT_DATA)
    kernel.fail_open = None
    kernel.fail_ioctl = OSError(errno.EINVAL, "Invalid argument")
    with pytest.raises(nsm.NsmError, match="nsm.request_failed"):
        nsm.NsmSource(kernel.device()).collect(REPORT_DATA)
    assert not kernel.open_fds
    kernel.fail_ioctl = None
    kernel.length_override = nsm.NSM_RESPONSE_MAX_SIZE + 1
    with pytest.raises(nsm.NsmError, match="nsm.response_malformed"):
        nsm.NsmSource(kernel.device()).collect(REPORT_DATA)
    with pytest.raises(nsm.NsmError, match="longer than 1024"):
        nsm.NsmSource(kernel.device()).collect(REPORT_DATA, nonce=bytes(1025))


@pytest.mark.skipif(Path("/dev/nsm").exists(), reason="running inside a Nitro enclave")
def test_the_real_device_is_absent_here() -> None:
    with pytest.raises(nsm.NsmError, match="nsm.unavailable"):
        nsm.NsmSource().collect(REPORT_DATA)


def test_simulated_enclave_is_an_evidence_source(store: TrustStore) -> None:
    source: EvidenceSource = SimulatedNitro(clock=lambda: NOW)
    assert (source.family, source.simulated) == ("nitro", True)
    evidence = source.collect(REPORT_DATA)
    appraisal = _appraise(evidence, store)
    assert appraisal.status is Status.AFFIRMING, appraisal.reasons
    assert appraisal.claims["trust_anchor"] == "test:aws:nitro_root_g1"
    other = SimulatedNitro(seed=1, clock=lambda: NOW)
    assert other.collect(REPORT_DATA) != evidence
    assert (
        _appraise(other.collect(REPORT_DATA), store).claims["module_id"]
        != (appraisal.claims["module_id"])
    )


def test_simulated_enclave_renews_its_three_hour_certificate(store: TrustStore) -> None:
    clock = [NOW]
    simulator = SimulatedNitro(clock=lambda: clock[0])
    leaves = set()
    for hour in range(0, 12, 1):
        clock[0] = NOW + timedelta(hours=hour, minutes=7)
        evidence = simulator.collect(REPORT_DATA)
        appraisal = _appraise(evidence, store, now=clock[0])
        assert appraisal.status is Status.AFFIRMING, (hour, appraisal.reasons)
        leaves.add(appraisal.claims["certificate"]["not_before"])
    assert len(leaves) >= 4
