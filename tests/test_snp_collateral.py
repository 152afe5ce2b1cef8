"""SNP collateral from outside the evidence: AMD's KDS (fetched once, shared through KV, never
in offline mode) and `attestmesh roots fetch` (pin-checked before anything is installed)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.collector.simulator.node import SimulatedSnp, test_pki
from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.errors import TrustError
from services.mesh.natskv import NatsKeyValue
from services.testing.httpfake import FakeHttp
from services.testing.vectors import roots_dir
from services.verifier.collateral import CollateralCache
from services.verifier.families.base import Status, VerifyOptions
from services.verifier.families.snp import SnpVerifier
from services.verifier.families.snp.kds import cert_chain_url, requests_for, vcek_url
from services.verifier.families.snp.parse import Product, SigningKey
from services.verifier.fetch import http_get
from services.verifier.roots import fetch_amd_roots
from services.verifier.trust import TrustStore, fingerprint

VECTOR_ROOTS = roots_dir()
needs_vectors = pytest.mark.skipif(
    VECTOR_ROOTS is None,
    reason="shared vectors not found: set ATTESTMESH_VECTORS or provide ../shared/vectors",
)


def test_vcek_urls_follow_amds_scheme() -> None:
    tcb = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    chip = bytes(range(64))
    assert vcek_url("https://kds.example/", Product.MILAN, chip, tcb) == (
        f"https://kds.example/vcek/v1/Milan/{chip.hex()}?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115"
    )
    turin = vcek_url("https://kds.example", Product.TURIN, chip, {**tcb, "fmc": 1})
    assert turin == (
        f"https://kds.example/vcek/v1/Turin/{chip[:8].hex()}"
        "?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115&fmcSPL=1"
    )
    assert cert_chain_url("https://k", Product.GENOA, SigningKey.VLEK) == (
        "https://k/vlek/v1/Genoa/cert_chain"
    )


async def test_a_missing_vcek_is_fetched_once_for_all_replicas(bus: Bus, tmp_path: Path) -> None:
    pki = test_pki(tmp_path / "pki")
    node = SimulatedSnp(pki, seed=7)
    report = node.simulator.report(b"\x01" * 64)  # bare report: no certificate table
    vcek_request, crl_request = requests_for(report, {}, base="http://placeholder")
    assert (vcek_request.name, crl_request.name) == ("vcek.der", "crl.der")
    path = vcek_request.url.removeprefix("http://placeholder")
    crl_path = crl_request.url.removeprefix("http://placeholder")
    trust = TrustStore.load(None, test_dir=pki.roots_dir)
    options = VerifyOptions(now=datetime.now(UTC), trust=trust)
    assert "snp.vcek_missing" in {r.code for r in SnpVerifier().appraise(report, options).reasons}

    kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_COLLATERAL))
    crl = pki.amd.crl()
    with FakeHttp({path: node.simulator.vek_der(), crl_path: crl}) as kds:
        replicas = [CollateralCache(kv, offline=False) for _ in range(3)]
        found = [await r.resolve(requests_for(report, {}, base=kds.url)) for r in replicas]
        assert kds.hits[path] == 1 and kds.hits[crl_path] == 1
        assert sum(r.fetches for r in replicas) == 2
    assert (
        found[0] == found[1] == found[2] == {"vcek.der": node.simulator.vek_der(), "crl.der": crl}
    )
    with_vcek = VerifyOptions(now=options.now, trust=trust, collateral=found[0])
    assert SnpVerifier().appraise(report, with_vcek).status is Status.AFFIRMING
    revoked = {**found[0], "crl.der": pki.amd.crl(revoke=("ask",))}
    verdict = SnpVerifier().appraise(
        report, VerifyOptions(now=options.now, trust=trust, collateral=revoked)
    )
    assert "snp.cert_revoked" in {r.code for r in verdict.reasons}


async def test_offline_mode_never_touches_the_network(bus: Bus, tmp_path: Path) -> None:
    pki = test_pki(tmp_path / "pki")
    report = SimulatedSnp(pki, seed=8).simulator.report(b"\x02" * 64)
    kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_COLLATERAL))
    with FakeHttp() as kds:
        cache = CollateralCache(kv, offline=True)
        assert await cache.resolve(requests_for(report, {}, base=kds.url)) == {}
        assert cache.fetches == 0 and sum(kds.hits.values()) == 0


def test_only_the_crl_is_fetched_when_the_evidence_carries_its_vcek(tmp_path: Path) -> None:
    node = SimulatedSnp(test_pki(tmp_path / "pki"))
    evidence = node.simulator.evidence(b"\x03" * 64, attach_certs=True)
    assert [r.name for r in requests_for(evidence, {}, base="http://x")] == ["crl.der"]
    assert requests_for(evidence, {"crl.der": b"given"}, base="http://x") == []
    assert requests_for(evidence[:100], {}, base="http://x") == []


def test_fetch_is_bounded_and_fails_typed() -> None:
    from services.mesh.errors import CollateralError

    with FakeHttp({"/big": b"x" * 100}) as server:
        with pytest.raises(CollateralError, match="fetch.too_large"):
            http_get(server.url + "/big", max_bytes=10)
        with pytest.raises(CollateralError, match="fetch.http_status"):
            http_get(server.url + "/missing", max_bytes=10)
    with pytest.raises(CollateralError, match="fetch.bad_url"):
        http_get("file:///etc/passwd", max_bytes=10)


def _kds_routes(source_roots: Path, products: tuple[Product, ...]) -> dict[str, bytes]:
    routes = {}
    for product in products:
        ark, ask, asvk = x509.load_pem_x509_certificates(
            (source_roots / "amd" / f"{product.value}.pem").read_bytes()
        )
        pem = {c: c.public_bytes(serialization.Encoding.PEM) for c in (ark, ask, asvk)}
        routes[cert_chain_url("", product, SigningKey.VCEK)] = pem[ask] + pem[ark]
        routes[cert_chain_url("", product, SigningKey.VLEK)] = pem[asvk] + pem[ark]
    return routes


@needs_vectors
def test_roots_fetch_installs_pinned_chains(tmp_path: Path) -> None:
    assert VECTOR_ROOTS is not None
    products = tuple(Product)
    with FakeHttp(_kds_routes(VECTOR_ROOTS, products)) as kds:
        written = fetch_amd_roots(tmp_path / "roots", kds=kds.url)
    assert sorted(p.name for p in written) == ["genoa.pem", "milan.pem", "turin.pem"]
    store = TrustStore.load(tmp_path / "roots")
    assert [a.label for a in store.amd()] == ["amd:milan", "amd:genoa", "amd:turin"]
    for anchors in store.amd():
        assert anchors.ask is not None and anchors.asvk is not None


@needs_vectors
def test_roots_fetch_refuses_an_unpinned_ark_and_keeps_the_old_files(tmp_path: Path) -> None:
    assert VECTOR_ROOTS is not None
    fake_roots = test_pki(tmp_path / "pki").roots_dir
    installed = tmp_path / "roots" / "amd" / "milan.pem"
    installed.parent.mkdir(parents=True)
    installed.write_bytes((VECTOR_ROOTS / "amd" / "milan.pem").read_bytes())
    before = installed.read_bytes()
    with (
        FakeHttp(_kds_routes(fake_roots, (Product.MILAN,))) as kds,
        pytest.raises(TrustError) as err,
    ):
        fetch_amd_roots(tmp_path / "roots", kds=kds.url, products=(Product.MILAN,))
    assert err.value.reason == "trust.pin_mismatch"
    assert installed.read_bytes() == before
    ark = x509.load_pem_x509_certificates(before)[0]
    assert fingerprint(ark) == TrustStore.load(tmp_path / "roots").amd()[0].ark.fingerprint
