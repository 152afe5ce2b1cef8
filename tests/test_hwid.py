"""Authentication and hardware identity per family: real signatures from the test PKIs.

Evidence is *authenticated* only when it verified and binds the expected value; its hardware
identity is set only from verified data, is the same for every report of one machine and
differs between machines. Also: the EAR carries both, and reads them back fail-closed; pins
are compare-and-set on a real nats-server.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from services.collector.simulator.nitro import SimulatedNitro
from services.collector.simulator.node import SimulatedSnp, TestPki, test_pki
from services.collector.simulator.snp import SnpSimulator
from services.collector.simulator.tpm import SimulatedAzSnpVtpm, SimulatedTpm
from services.collector.sources.base import EvidenceSource
from services.mesh import events, subjects
from services.mesh.bus import Bus
from services.mesh.errors import Rejected, VerificationError
from services.mesh.keys import SigningKey, TrustedKeys
from services.mesh.natskv import NatsKeyValue
from services.policy.pins import PinStore
from services.testing.intel_pki import IntelTestPki, TdFields, tcb_level, td_quote
from services.verifier import ear, registry
from services.verifier.families import hwid
from services.verifier.families.base import Appraisal, Status, VerifyOptions
from services.verifier.families.snp.parse import SigningKey as VekKind
from services.verifier.families.tdx import TdxVerifier
from services.verifier.trust import TrustStore

Factory = Callable[[TestPki, int], EvidenceSource]
SOURCES: dict[str, tuple[Factory, str]] = {
    "snp": (lambda pki, seed: SimulatedSnp(pki, seed=seed), "snp.chip_id:"),
    "nitro": (lambda pki, seed: SimulatedNitro(seed=seed), "nitro.instance:"),
    "tpm": (lambda pki, seed: SimulatedTpm(pki.tpm, seed=seed), "tpm.ak:"),
    "az-snp-vtpm": (lambda pki, seed: SimulatedAzSnpVtpm(pki.amd, seed=seed), "az.ak:"),
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return test_pki(tmp_path_factory.mktemp("pki"))


def _appraise(pki: TestPki, family: str, evidence: bytes, expected: bytes | None) -> Appraisal:
    trust = TrustStore.load(pki.directory / "no-vendor-roots", test_dir=pki.roots_dir)
    options = VerifyOptions(now=events.utcnow(), trust=trust, expected_report_data=expected)
    return registry.get(family).appraise(evidence, options)


@pytest.mark.parametrize("family", sorted(SOURCES))
def test_each_family_names_a_stable_per_machine_identity(pki: TestPki, family: str) -> None:
    make, prefix = SOURCES[family]
    machine, other = make(pki, 1), make(pki, 2)
    seen = []
    for source in (machine, machine, other):
        expected = os.urandom(64)
        appraisal = _appraise(
            pki, family, events.evidence_bytes(source.collect(expected)), expected
        )
        assert appraisal.authenticated, [r.code for r in appraisal.reasons]
        assert appraisal.hwid.startswith(prefix), appraisal.hwid
        seen.append(appraisal.hwid)
    assert seen[0] == seen[1] != seen[2]


@pytest.mark.parametrize("family", sorted(SOURCES))
def test_evidence_bound_to_another_challenge_is_not_authenticated(
    pki: TestPki, family: str
) -> None:
    make, _prefix = SOURCES[family]
    evidence = events.evidence_bytes(make(pki, 1).collect(os.urandom(64)))
    replayed = _appraise(pki, family, evidence, os.urandom(64))
    assert not replayed.authenticated and replayed.verified  # authentic, but not an answer
    unchallenged = _appraise(pki, family, evidence, None)
    assert not unchallenged.authenticated


@pytest.mark.parametrize("family", sorted(SOURCES))
def test_evidence_that_does_not_verify_proves_no_hardware(pki: TestPki, family: str) -> None:
    make, _prefix = SOURCES[family]
    expected = os.urandom(64)
    evidence = bytearray(events.evidence_bytes(make(pki, 1).collect(expected)))
    broken = _appraise(pki, family, b"\x00" * len(evidence), expected)
    assert not broken.authenticated and broken.hwid == ""
    evidence[len(evidence) // 2] ^= 0x01
    flipped = _appraise(pki, family, bytes(evidence), expected)
    assert not flipped.authenticated and flipped.hwid == ""


def test_a_masked_chip_id_falls_back_to_the_vlek(pki: TestPki) -> None:
    sim = SnpSimulator(pki.amd, signing_key=VekKind.VLEK)
    expected = os.urandom(64)
    appraisal = _appraise(pki, "snp", sim.evidence(expected), expected)
    assert appraisal.authenticated, [r.code for r in appraisal.reasons]
    assert appraisal.hwid.startswith("snp.vek:")


def test_tdx_identity_is_the_pck_platform() -> None:
    intel = IntelTestPki()
    platform = intel.platform()
    collateral = intel.collateral(
        [tcb_level(platform.components, 11, "UpToDate", tdx=(0, 0, 2) + (0,) * 13)]
    )
    options = VerifyOptions(
        now=intel.now + timedelta(hours=1),
        trust=intel.trust_store(),
        collateral=collateral,
        expected_report_data=TdFields().report_data,
    )
    appraisal = TdxVerifier().appraise(td_quote(platform), options)
    assert appraisal.authenticated, [r.code for r in appraisal.reasons]
    assert appraisal.hwid == "dcap.ppid:" + bytes(range(16)).hex()  # the test PCK's PPID


def test_identity_rules() -> None:
    ppid, instance = b"\x01" * 16, b"\x02" * 16
    assert hwid.dcap(instance, ppid) == "dcap.platform_instance:" + instance.hex()
    assert hwid.dcap(bytes(16), ppid) == hwid.dcap(None, ppid) == "dcap.ppid:" + ppid.hex()
    assert hwid.nitro("i-0123456789abcdef0-enc0123456789abcdef") == (
        "nitro.instance:" + b"i-0123456789abcdef0".hex()
    )
    assert hwid.nitro("some-module") is None
    assert hwid.azure("zz") is None and hwid.azure("ab") is None
    assert hwid.cca(bytes(33)) is None
    chip = b"\x07" * 64
    assert hwid.snp(chip, b"vek") == "snp.chip_id:" + hashlib.sha256(chip).hexdigest()


def test_the_ear_carries_authentication_and_reads_it_fail_closed(tmp_path: Path) -> None:
    key = SigningKey.generate("verifier-snp")
    key.publish_to(tmp_path)
    trusted = TrustedKeys.load(tmp_path)
    subject = ear.Subject(node="n", evidence_id="e", nonce=b"n" * 32, public_key=b"k" * 32)
    now = events.utcnow()
    good = Appraisal(family="snp", status=Status.AFFIRMING, verified=True, bound=True)
    good.hwid = "snp.chip_id:ab"
    read = ear.read(ear.issue(key, good, subject, now=now, ttl=60), trusted, now=now)
    assert read.authenticated and read.hwid == "snp.chip_id:ab"
    unbound = Appraisal(family="snp", status=Status.AFFIRMING, verified=True, hwid="x:1")
    read = ear.read(ear.issue(key, unbound, subject, now=now, ttl=60), trusted, now=now)
    assert not read.authenticated and read.hwid == ""  # no identity without authentication
    claims = {
        "eat_profile": ear.PROFILE,
        "iat": int(now.timestamp()),
        "exp": int(now.timestamp()) + 60,
        "eat_nonce": ear.b64url(b"n" * 32),
        "submods": {
            "snp": {
                "ear.status": "affirming",
                "ear.trustworthiness-vector": {},
                "attestmesh.verified": True,
                "attestmesh.claims": {},
                "attestmesh.reasons": [],
            }
        },
        "attestmesh.node": "n",
        "attestmesh.evidence_id": "e",
        "attestmesh.public_key": ear.b64url(b"k" * 32),
        "attestmesh.simulated": False,
    }
    older = ear.read(key.sign(claims), trusted, now=now)  # a token from before the claim
    assert not older.authenticated
    claims["submods"]["snp"]["attestmesh.hwid"] = "x" * 1000  # type: ignore[index]
    with pytest.raises(VerificationError) as info:
        ear.read(key.sign(claims), trusted, now=now)
    assert info.value.reason == "ear.malformed"


async def test_racing_pins_agree_and_a_reset_frees_the_name(bus: Bus) -> None:
    first = PinStore(NatsKeyValue(await bus.key_value(subjects.BUCKET_PINS)))
    second = PinStore(NatsKeyValue(await bus.key_value(subjects.BUCKET_PINS)))
    outcomes = await asyncio.gather(
        first.pin("node-p", "snp.chip_id:aa"),
        second.pin("node-p", "snp.chip_id:bb"),
        return_exceptions=True,
    )
    refused = [o for o in outcomes if isinstance(o, Rejected)]
    assert len(refused) == 1 and refused[0].reason == "node.identity_mismatch"
    found = await first.get("node-p")
    assert found is not None
    winner = found[0].hwid
    assert await second.check("node-p", winner) is True
    with pytest.raises(Rejected) as info:
        await second.check("node-p", "")  # evidence naming no hardware never matches a pin
    assert info.value.reason == "node.identity_mismatch"
    with pytest.raises(Rejected) as info:
        await second.pin("node-q", "")  # nor can it pin a name: pinning fails closed
    assert info.value.reason == "node.hwid_missing"
    reset = await first.reset("node-p")
    assert reset is not None and reset.hwid == winner
    assert await first.reset("node-p") is None and await first.check("node-p", "x") is False
    loser = "snp.chip_id:bb" if winner.endswith("aa") else "snp.chip_id:aa"
    await second.pin("node-p", loser)
    assert await first.check("node-p", loser) is True


def test_a_tpm_ak_nobody_vouches_for_names_no_machine(pki: TestPki) -> None:
    """Anyone with a software TPM can make an AK: without a certificate chain (or a pin) it
    must not pin a node name, nor stand in for one in re-appraisal memory."""
    machine = SimulatedTpm(pki.tpm, seed=7)
    expected = os.urandom(64)
    document = machine.tpm.evidence(expected, ak_cert=None, event_log=machine.event_log)
    appraisal = _appraise(
        pki, "tpm", events.evidence_bytes(events.TpmEvidence(document=document)), expected
    )
    assert appraisal.verified and appraisal.claims["ak_trust"] == "self-asserted"
    assert appraisal.hwid == ""
    certified = machine.collect(expected)
    assert _appraise(pki, "tpm", events.evidence_bytes(certified), expected).hwid.startswith(
        "tpm.ak:"
    )
