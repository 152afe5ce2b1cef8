"""Real AMD evidence through the mesh: the verifier worker on the bus reaches the same verdict
as `attestmesh verify`, except that it also checks the freshness binding, which a recorded
report (bound to someone else's nonce long ago) cannot satisfy."""

from __future__ import annotations

import asyncio
import json

import pytest

from services.cli import main
from services.mesh import events, subjects
from services.mesh.bus import Bus
from services.mesh.keys import SigningKey, TrustedKeys
from services.testing.vectors import load_vector, roots_dir, vectors_root
from services.verifier import ear, registry
from services.verifier.families.base import Status
from services.verifier.trust import TrustStore
from services.verifier.worker import VerifierWorker

ROOT = vectors_root()
pytestmark = pytest.mark.skipif(
    ROOT is None or roots_dir() is None,
    reason="shared vectors not found: set ATTESTMESH_VECTORS or provide ../shared/vectors",
)


@pytest.mark.parametrize("vector_id", ["snp-trustee-milan-vcek-v2", "snp-gosev-milan-v2"])
async def test_mesh_verdict_matches_the_cli(
    vector_id: str, bus: Bus, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ROOT is not None
    vector = load_vector(ROOT / "snp" / vector_id)
    key = SigningKey.generate("verifier-snp")
    worker = VerifierWorker(
        bus,
        "snp",
        registry.get("snp"),
        key,
        TrustStore.load(roots_dir()),
        collateral=vector.collateral,
        clock=lambda: vector.at,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        event = events.EvidenceEvent(
            node="real-milan",
            nonce=b"\x42" * 32,
            public_key=b"\x24" * 32,
            evidence=events.SnpEvidence(report=vector.evidence),
        )
        sub = await bus.nc.subscribe(subjects.verdict("snp", "real-milan"))
        await bus.publish(subjects.evidence("snp", "real-milan"), event)
        msg = await sub.next_msg(timeout=10)
    finally:
        stop.set()
        await running
    verdict = events.decode(msg.data, events.Verdict)
    result = ear.read(
        verdict.ear, TrustedKeys({key.name: key._private.public_key()}), now=vector.at
    )

    collateral_dir = vector.dir / "collateral"
    args = ["verify", str(vector.dir / "evidence.bin"), "--family", "snp", "--json", "--offline"]
    args += ["--collateral", str(collateral_dir), "--roots", str(roots_dir())]
    main([*args, "--at", vector.meta["at"]])
    cli = json.loads(capsys.readouterr().out)

    assert result.claims == cli["claims"]
    assert result.verified is cli["verified"] is True
    mesh_codes = [r["code"] for r in result.reasons]
    cli_codes = [r["code"] for r in cli["reasons"]]
    assert sorted(mesh_codes) == sorted([*cli_codes, "snp.report_data_mismatch"])
    assert cli["status"] == vector.expect["status"]
    assert result.status is Status.CONTRAINDICATED
