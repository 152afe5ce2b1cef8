"""Intel collateral from outside the evidence: the PCS/PCCS (issuer chains in headers), the
shared KV cache with refresh, offline mode, and `attestmesh collateral import`."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import pytest

from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.natskv import NatsKeyValue
from services.testing.httpfake import FakeHttp
from services.testing.vectors import load_vector, roots_dir, vectors_root
from services.verifier.collateral import CollateralCache, store
from services.verifier.families.base import VerifyOptions
from services.verifier.families.dcap import COLLATERAL_FILES
from services.verifier.families.dcap.pcsfetch import import_plan, requests_for
from services.verifier.families.tdx import TdxVerifier
from services.verifier.trust import TrustStore

ROOT = vectors_root()
pytestmark = pytest.mark.skipif(
    ROOT is None or roots_dir() is None,
    reason="shared vectors not found: set ATTESTMESH_VECTORS or provide ../shared/vectors",
)
VECTOR = "tdx-dcapqvl-sample"


def _pcs_routes(
    collateral: dict[str, bytes], evidence: bytes, base: str
) -> dict[str, tuple[bytes, dict[str, str]]]:
    """Serve a vector's collateral the way Intel's PCS does, chains as encoded headers."""
    by_url: dict[str, tuple[bytes, dict[str, str]]] = {}
    for request in requests_for(evidence, {}, base=base, root_crl_url=base + "/root.der"):
        path = request.url.removeprefix(base)
        body, headers = by_url.get(path, (b"", {}))
        if request.header:
            headers[request.header] = urllib.parse.quote(collateral[request.name].decode())
        else:
            body = collateral[request.name]
        by_url[path] = (body, headers)
    return by_url


def test_the_plan_names_intels_v4_endpoints() -> None:
    assert ROOT is not None
    vector = load_vector(ROOT / "tdx" / VECTOR)
    plan = requests_for(vector.evidence, {}, base="https://pcs", root_crl_url="https://root/crl")
    assert sorted(r.name for r in plan) == sorted(COLLATERAL_FILES)
    urls = {r.name: (r.url, r.header) for r in plan}
    assert urls["tcb_info.json"][0].startswith("https://pcs/tdx/certification/v4/tcb?fmspc=")
    assert urls["tcb_info_issuer_chain.pem"][1] == "TCB-Info-Issuer-Chain"
    assert urls["qe_identity.json"][0] == "https://pcs/tdx/certification/v4/qe/identity"
    assert urls["pck_crl.der"][0].startswith("https://pcs/sgx/certification/v4/pckcrl?ca=")
    assert urls["root_ca_crl.der"][0] == "https://root/crl"
    assert requests_for(vector.evidence, vector.collateral) == []
    assert requests_for(b"not a quote", {}) == []


async def test_fetched_collateral_verifies_and_is_shared(bus: Bus) -> None:
    assert ROOT is not None
    vector = load_vector(ROOT / "tdx" / VECTOR)
    kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_COLLATERAL))
    clock = [1000.0]
    with FakeHttp() as pcs:
        pcs.routes.update(_pcs_routes(vector.collateral, vector.evidence, pcs.url))
        plan = requests_for(vector.evidence, {}, base=pcs.url, root_crl_url=pcs.url + "/root.der")
        first = CollateralCache(kv, offline=False, clock=lambda: clock[0])
        got = await first.resolve(plan)
        assert got == {name: vector.collateral[name] for name in COLLATERAL_FILES}
        assert first.fetches == 4  # one request per URL, chains come from its headers
        second = CollateralCache(kv, offline=False, clock=lambda: clock[0])
        assert await second.resolve(plan) == got and second.fetches == 0
        clock[0] += 13 * 3600  # past the refresh age: fetched again
        assert await second.resolve(plan) == got and second.fetches == 4
    trust = TrustStore.load(roots_dir())
    options = VerifyOptions(now=vector.at, trust=trust, collateral=got)
    assert TdxVerifier().appraise(vector.evidence, options).status.value == vector.expect["status"]


async def test_import_serves_offline_verifiers(bus: Bus) -> None:
    assert ROOT is not None
    vector = load_vector(ROOT / "tdx" / VECTOR)
    kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_COLLATERAL))
    for request, data in import_plan(vector.collateral):
        await store(kv, request, data, at=0.0)
    offline = CollateralCache(kv, offline=True)
    got = await offline.resolve(requests_for(vector.evidence, {}))
    assert got == {name: vector.collateral[name] for name in COLLATERAL_FILES}
    assert offline.fetches == 0


def test_import_refuses_an_incomplete_directory(tmp_path: Path) -> None:
    from services.mesh.errors import ParseError

    with pytest.raises(ParseError, match="dcap.collateral_missing"):
        import_plan({"tcb_info.json": b"{}"})
