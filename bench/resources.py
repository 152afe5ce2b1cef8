"""What the resource policy costs the broker per secret request (``python -m bench.resources``).

Every secret request re-reads the node's stored decision (token verified, appraisal summary
checked against the digest it signs) and evaluates the resource policy; this measures both
on one core with a real SEV-SNP appraisal's claims (a simulated report verified against the
test PKI), for the packaged default (which cannot read the claims, so its input leaves them
out) and for a policy that reads one claim (which gets only that claim). Figures are CPU
microseconds of this process (so other processes on a shared machine do not count), medians
of 15 slices in which every operation runs in turn (so a machine getting busier moves all
alike), printed as JSON beside what the alternatives would cost: a decision token without
any summary (as before), one with the summary inside it, the claim-reading policy given
every claim, and that input fed as JSON text (the path regopy's ``Input`` replaces where it
is exact).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.broker.held import STORED_SEPARATOR, DecisionReader
from services.broker.resources import ResourcePolicy
from services.collector.simulator.node import simulated_source, test_pki
from services.mesh import events, subjects, telemetry
from services.mesh.keys import SigningKey, TrustedKeys
from services.policy import documents, summary
from services.policy.engine import RESOURCE, default_resource_policy
from services.policy.resource_policy import request_input
from services.verifier import registry
from services.verifier.families.base import VerifyOptions
from services.verifier.trust import TrustStore
from services.verifier.worker import evidence_collateral, expected_report_data

MEASURED = """package attestmesh.resource
import rego.v1
default allow := false
allow if input.resource.repository in {"default", input.node}
allow if {
\tinput.resource.repository == "prod"
\tinput.appraisal.claims.measurement == "%s"
}
decision := {"allow": allow, "reasons": []}
"""


def _medians_us(
    operations: dict[str, Callable[[], object]], count: int = 100, slices: int = 15
) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in operations}
    for _ in range(slices):
        for name, operation in operations.items():
            started = time.process_time()
            for _ in range(count):
                operation()
            samples[name].append((time.process_time() - started) / count * 1e6)
    return {name: round(statistics.median(found), 1) for name, found in samples.items()}


def snp_claims(workdir: Path) -> tuple[dict[str, Any], str]:
    """The claims and hardware id of one verified simulated SEV-SNP report."""
    pki = test_pki(workdir / "pki")
    trust = TrustStore.load(workdir / "no-vendor-roots", test_dir=pki.roots_dir)
    nonce, public = os.urandom(32), os.urandom(32)
    binding = expected_report_data(nonce, public)
    evidence = simulated_source("snp", pki, seed=1).collect(binding)
    options = VerifyOptions(
        now=events.utcnow(),
        trust=trust,
        collateral=evidence_collateral(evidence),
        expected_report_data=binding,
        offline=True,
    )
    appraisal = registry.get("snp").appraise(events.evidence_bytes(evidence), options)
    return appraisal.claims, appraisal.hwid


def _policy(source: str, operator: SigningKey, trusted: TrustedKeys) -> ResourcePolicy:
    raw = documents.seal(
        operator,
        bucket=subjects.BUCKET_POLICIES,
        key=RESOURCE.key,
        payload=source.encode(),
        version=1,
        issued_at=events.utcnow(),
    )
    policy = ResourcePolicy(trusted)
    policy.offer(raw)
    assert policy.engine is not None
    return policy


def measure() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        claims, hwid = snp_claims(Path(tmp))
    operator, signer = SigningKey.generate("operator"), SigningKey.generate("policy")
    trusted = TrustedKeys({"operator": operator.public_key(), "policy": signer.public_key()})
    now = int(time.time())
    base = {
        "iat": now,
        "exp": now + 300,
        "jti": "d" * 32,
        "node": "node-1",
        "family": "snp",
        "status": "affirming",
        "allow": True,
        "reasons": [],
        "public_key": "k" * 43,
        "verdict_id": "v" * 32,
        "evidence_id": "e" * 32,
        "policy_id": "release@v1",
        "reappraisal": False,
    }
    plain_token = signer.sign(base)
    detached = summary.encode(claims, hwid)
    token = signer.sign({**base, "appraisal_sha256": summary.digest(detached)})
    stored = token.encode() + STORED_SEPARATOR + detached
    inline = signer.sign({**base, **json.loads(detached)})
    decisions = DecisionReader(trusted, events.utcnow)
    appraisal = decisions.stored(stored, "node-1").appraisal
    assert appraisal.claims["measurement"] == claims["measurement"]

    default = _policy(default_resource_policy(), operator, trusted)
    measured = _policy(MEASURED % claims["measurement"], operator, trusted)
    assert default.claims == frozenset() and measured.claims == frozenset({"measurement"})
    assert default.check("node-1", "node-1/key/tls", appraisal) is None
    assert measured.check("node-2", "prod/key/db", appraisal) is None
    engine = measured.engine
    assert engine is not None
    document = request_input("node-2", "prod/key/db", appraisal)

    def as_json() -> object:
        engine._runner.set_input_term(json.dumps(document))
        return engine._runner.query_bundle_entrypoint(engine._bundle, RESOURCE.entrypoint)

    kept, omitted = summary.bound_claims(claims)
    return {
        "claims": {"in_report": len(claims), "in_summary": len(kept), "omitted": omitted},
        "bytes": {
            "token": len(token),
            "summary_beside_it": len(detached),
            "token_without_summary": len(plain_token),
            "token_with_summary_inside": len(inline),
        },
        "us_per_request": _medians_us(
            {
                "read_decision": lambda: decisions.stored(stored, "node-1"),
                "read_decision_without_summary": lambda: decisions.read(plain_token, b"", "node-1"),
                "read_decision_summary_inside": lambda: decisions.read(inline, b"", "node-1"),
                "default_policy": lambda: default.check("node-1", "node-1/key/tls", appraisal),
                "claim_policy": lambda: measured.check("node-2", "prod/key/db", appraisal),
                "claim_policy_given_every_claim": lambda: engine.evaluate(document),
                "claim_policy_given_every_claim_as_json": as_json,
            }
        ),
    }


if __name__ == "__main__":
    telemetry.configure("bench", level="warning", stream=sys.stderr)
    json.dump(measure(), sys.stdout, indent=1)
    sys.stdout.write("\n")
