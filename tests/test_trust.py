"""Trust store: pinned vendor roots fail closed; test anchors only by explicit request."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from services.collector.simulator.snp import SnpSimulator
from services.mesh.errors import TrustError
from services.testing.amd_pki import AmdTestPki, CertOverride
from services.testing.vectors import roots_dir
from services.verifier.families.base import Status, VerifyOptions
from services.verifier.families.snp import SnpPolicy, SnpVerifier
from services.verifier.trust import PINNED_ROOTS, TrustStore, default_roots_dir, fingerprint

NOW = datetime(2025, 3, 1, tzinfo=UTC)
ROOTS = roots_dir()
needs_vectors = pytest.mark.skipif(
    ROOTS is None,
    reason="shared vectors not found: set ATTESTMESH_VECTORS or provide ../shared/vectors",
)


@pytest.fixture(scope="module")
def pki() -> AmdTestPki:
    return AmdTestPki("milan", now=NOW)


@pytest.fixture(scope="module")
def test_dir(pki: AmdTestPki, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pki.write_trust_dir(tmp_path_factory.mktemp("test-anchors"))


@needs_vectors
def test_vector_roots_match_their_pins() -> None:
    assert ROOTS is not None
    store = TrustStore.load(ROOTS)
    assert {a.product for a in store.amd()} == {"milan", "genoa", "turin"}
    for anchors in store.amd():
        assert anchors.origin == "vendor"
        assert anchors.label == f"amd:{anchors.product}"
        assert anchors.ask is not None and anchors.asvk is not None
    singles = (*store.anchors("intel"), *store.anchors("aws"), *store.anchors("tpm"))
    names = {a.name for a in singles}
    assert names == {n for n in PINNED_ROOTS if not n.startswith("amd:")}
    assert PINNED_ROOTS["aws:nitro_root_g1"].startswith("641a0321")


def test_missing_directories_and_files_give_no_anchors(tmp_path: Path) -> None:
    assert not TrustStore.load(None)
    assert not TrustStore.load(tmp_path / "nowhere")
    (tmp_path / "amd").mkdir()
    store = TrustStore.load(tmp_path)
    assert not store and store.amd() == ()


def test_unpinned_vendor_root_fails_closed(pki: AmdTestPki, tmp_path: Path) -> None:
    pki.write_trust_dir(tmp_path)
    with pytest.raises(TrustError) as info:
        TrustStore.load(tmp_path)
    assert info.value.reason == "trust.pin_mismatch"


@needs_vectors
def test_pin_mismatch_for_a_root_in_the_wrong_file(tmp_path: Path) -> None:
    assert ROOTS is not None
    (tmp_path / "amd").mkdir()
    shutil.copy(ROOTS / "amd" / "genoa.pem", tmp_path / "amd" / "milan.pem")
    with pytest.raises(TrustError) as info:
        TrustStore.load(tmp_path)
    assert info.value.reason == "trust.pin_mismatch"


@needs_vectors
def test_unpinned_tpm_root_fails_closed(pki: AmdTestPki, tmp_path: Path) -> None:
    (tmp_path / "tpm").mkdir()
    (tmp_path / "tpm" / "extra.pem").write_bytes(pki.chain_pem())
    with pytest.raises(TrustError) as info:
        TrustStore.load(tmp_path)
    assert info.value.reason == "trust.pin_mismatch"


@needs_vectors
def test_ask_not_issued_by_ark_is_rejected_at_load(tmp_path: Path) -> None:
    assert ROOTS is not None
    milan = x509.load_pem_x509_certificates((ROOTS / "amd" / "milan.pem").read_bytes())
    genoa = x509.load_pem_x509_certificates((ROOTS / "amd" / "genoa.pem").read_bytes())
    (tmp_path / "amd").mkdir()
    mixed = b"".join(c.public_bytes(Encoding.PEM) for c in (milan[0], genoa[1], milan[2]))
    (tmp_path / "amd" / "milan.pem").write_bytes(mixed)
    with pytest.raises(TrustError) as info:
        TrustStore.load(tmp_path)
    assert info.value.reason == "trust.chain_invalid"


@pytest.mark.parametrize(
    "overrides",
    [
        {"ark": CertOverride(wrong_key=True)},
        {"ark": CertOverride(wrong_issuer=True)},
        {"ask": CertOverride(wrong_issuer=True)},
        {"asvk": CertOverride(wrong_issuer=True)},
    ],
    ids=["ark-wrong-key", "ark-wrong-issuer", "ask-wrong-issuer", "asvk-wrong-issuer"],
)
def test_broken_test_chain_is_rejected_at_load(
    overrides: dict[str, CertOverride], tmp_path: Path
) -> None:
    pki = AmdTestPki("milan", now=NOW, **overrides)
    pki.write_trust_dir(tmp_path)
    with pytest.raises(TrustError) as info:
        TrustStore.load(None, test_dir=tmp_path)
    assert info.value.reason == "trust.chain_invalid"


def test_malformed_anchor_file(tmp_path: Path) -> None:
    (tmp_path / "amd").mkdir()
    (tmp_path / "amd" / "milan.pem").write_text("not a certificate")
    with pytest.raises(TrustError) as info:
        TrustStore.load(None, test_dir=tmp_path)
    assert info.value.reason == "trust.malformed"


def test_test_anchors_are_not_trusted_unless_loaded(pki: AmdTestPki, test_dir: Path) -> None:
    sim = SnpSimulator(pki)
    refused = SnpVerifier().appraise(sim.evidence(b"\x11" * 64), VerifyOptions(NOW, TrustStore()))
    assert refused.status is Status.CONTRAINDICATED and not refused.verified
    assert [r.code for r in refused.reasons] == ["snp.no_trust_anchor"]

    explicit = (TrustStore.load(None, test_dir=test_dir), TrustStore().with_test_anchors(test_dir))
    for store in explicit:
        accepted = SnpVerifier().appraise(sim.evidence(b"\x11" * 64), VerifyOptions(NOW, store))
        assert accepted.status is Status.AFFIRMING and accepted.verified
        assert accepted.claims["trust_anchor"] == "test:amd:milan"
        assert store.amd()[0].origin == "test"


@needs_vectors
def test_vendor_store_does_not_accept_test_chain(pki: AmdTestPki, test_dir: Path) -> None:
    assert ROOTS is not None
    sim = SnpSimulator(pki)
    vendor = TrustStore.load(ROOTS)
    evidence = sim.evidence(b"\x22" * 64)
    refused = SnpVerifier().appraise(evidence, VerifyOptions(NOW, vendor))
    assert refused.status is Status.CONTRAINDICATED
    assert "snp.vcek_chain_invalid" in [r.code for r in refused.reasons]

    both = TrustStore.load(ROOTS, test_dir=test_dir)
    assert both.amd("milan")[0].origin == "vendor"
    accepted = SnpVerifier().appraise(evidence, VerifyOptions(NOW, both))
    assert accepted.status is Status.AFFIRMING
    assert accepted.claims["trust_anchor"] == "test:amd:milan"


def test_policy_can_refuse_test_anchors(pki: AmdTestPki, test_dir: Path) -> None:
    store = TrustStore.load(None, test_dir=test_dir)
    appraisal = SnpVerifier(SnpPolicy(allow_test_anchor=False)).appraise(
        SnpSimulator(pki).evidence(b"\x33" * 64), VerifyOptions(NOW, store)
    )
    assert appraisal.verified
    assert appraisal.status is Status.CONTRAINDICATED
    assert [r.code for r in appraisal.reasons] == ["snp.test_anchor_not_allowed"]


def test_anchor_fingerprint_and_repr(pki: AmdTestPki, test_dir: Path) -> None:
    store = TrustStore.load(None, test_dir=test_dir)
    anchors = store.amd("milan")[0]
    assert anchors.ark.fingerprint == fingerprint(pki.ark)
    assert "test:amd:milan" in repr(store)


def test_default_roots_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ATTESTMESH_ROOTS", str(tmp_path / "explicit"))
    assert default_roots_dir() == tmp_path / "explicit"
    monkeypatch.delenv("ATTESTMESH_ROOTS")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_roots_dir() == tmp_path / "xdg" / "attestmesh" / "roots"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_roots_dir() == tmp_path / "home" / ".local" / "share" / "attestmesh" / "roots"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_roots_dir() == tmp_path / "home" / ".local" / "share" / "attestmesh" / "roots"
