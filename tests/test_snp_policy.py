"""SNP appraisal policy: every knob, every violation reported, config validation."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.collector.simulator.snp import SnpSimulator
from services.mesh.errors import PolicyError
from services.testing.amd_pki import AmdTestPki
from services.verifier.families.base import TV_CONTRAINDICATED, Appraisal, Status, VerifyOptions
from services.verifier.families.snp import Product, SnpPolicy, SnpVerifier
from services.verifier.trust import TrustStore

NOW = datetime(2025, 3, 1, tzinfo=UTC)
NONCE = bytes(range(64))


@pytest.fixture(scope="module")
def milan(tmp_path_factory: pytest.TempPathFactory) -> tuple[AmdTestPki, TrustStore]:
    pki = AmdTestPki(Product.MILAN, now=NOW)
    root: Path = pki.write_trust_dir(tmp_path_factory.mktemp("milan"))
    return pki, TrustStore.load(None, test_dir=root)


def _appraise(
    sim: SnpSimulator, store: TrustStore, *, snp_policy: SnpPolicy | None = None, **fields: Any
) -> Appraisal:
    options = VerifyOptions(now=NOW, trust=store, expected_report_data=NONCE)
    return SnpVerifier(snp_policy).appraise(sim.evidence(NONCE, **fields), options)


def _codes(appraisal: Appraisal) -> list[str]:
    return [r.code for r in appraisal.reasons]


def test_policy_reports_every_violation(milan: tuple[AmdTestPki, TrustStore]) -> None:
    pki, store = milan
    sim = SnpSimulator(pki)
    policy = SnpPolicy(
        require_no_migration_agent=True,
        require_single_socket=True,
        require_no_smt=True,
        permit_provisional_firmware=False,
        max_vmpl=0,
        min_guest_svn=5,
        min_firmware=(1, 56),
        min_reported_tcb={"snp": 30},
        min_launch_tcb={"microcode": 250},
        allowed_measurements=frozenset({b"\x01" * 48}),
        allowed_host_data=frozenset({b"\x02" * 32}),
        allowed_id_key_digests=frozenset({b"\x03" * 48}),
        allowed_author_key_digests=frozenset({b"\x04" * 48}),
        allowed_family_ids=frozenset({b"\x05" * 16}),
        allowed_image_ids=frozenset({b"\x06" * 16}),
        allowed_chip_ids=frozenset({b"\x07" * 64}),
        allowed_signing_keys=frozenset({"vlek"}),
        allowed_products=frozenset({"genoa"}),
    )
    guest_policy = 0x3_0000 | 1 << 18 | 1 << 19 | 1 << 40
    appraisal = _appraise(
        sim, store, snp_policy=policy, vmpl=2, current_minor=54, policy=guest_policy
    )
    assert appraisal.verified
    expected = {
        "snp.debug_enabled",
        "snp.migration_agent_allowed",
        "snp.single_socket_not_required",
        "snp.smt_enabled",
        "snp.provisional_firmware",
        "snp.vmpl_too_high",
        "snp.guest_svn_below_minimum",
        "snp.firmware_below_minimum",
        "snp.tcb_below_minimum",
        "snp.launch_tcb_below_minimum",
        "snp.measurement_not_allowed",
        "snp.host_data_not_allowed",
        "snp.id_key_not_allowed",
        "snp.author_key_not_allowed",
        "snp.family_id_not_allowed",
        "snp.image_id_not_allowed",
        "snp.chip_id_not_allowed",
        "snp.signing_key_not_allowed",
        "snp.product_not_allowed",
        "snp.policy_reserved_bits",
    }
    assert set(_codes(appraisal)) == expected
    assert appraisal.status is Status.CONTRAINDICATED
    assert appraisal.trust_vector["executables"] == TV_CONTRAINDICATED
    assert appraisal.trust_vector["configuration"] == TV_CONTRAINDICATED
    warning = next(r for r in appraisal.reasons if r.code == "snp.policy_reserved_bits")
    assert warning.status is Status.WARNING


def test_default_policy_refuses_debug_only(milan: tuple[AmdTestPki, TrustStore]) -> None:
    pki, store = milan
    sim = SnpSimulator(pki)
    debug = _appraise(sim, store, policy=0x3_0000 | 1 << 19)
    assert _codes(debug) == ["snp.debug_enabled"] and debug.verified
    assert debug.claims["debug"] is True and debug.claims["policy_flags"]["debug"] is True
    allowed = _appraise(
        sim, store, snp_policy=SnpPolicy(allow_debug=True), policy=0x3_0000 | 1 << 19
    )
    assert allowed.status is Status.AFFIRMING
    reserved = _appraise(sim, store, policy=0x3_0000 | 1 << 40)
    assert reserved.status is Status.WARNING
    assert _codes(reserved) == ["snp.policy_reserved_bits"]


def test_policy_from_mapping() -> None:
    policy = SnpPolicy.from_mapping(
        {
            "allowed_measurements": ["00" * 48],
            "allowed_products": ["Milan"],
            "min_reported_tcb": {"snp": 8},
            "min_firmware": [1, 55],
            "max_vmpl": 0,
            "allow_debug": False,
        }
    )
    assert policy.allowed_measurements == frozenset({bytes(48)})
    assert policy.allowed_products == frozenset({"milan"})
    assert policy.min_firmware == (1, 55) and policy.max_vmpl == 0
    for bad in (
        {"nope": 1},
        {"allowed_measurements": ["zz"]},
        {"allow_debug": "yes"},
        {"min_reported_tcb": {"bogus": 1}},
        {"allowed_measurements": ["00" * 47]},
        {"allowed_products": ["naples"]},
        {"allowed_signing_keys": ["ark"]},
    ):
        with pytest.raises(PolicyError):
            SnpPolicy.from_mapping(bad)
