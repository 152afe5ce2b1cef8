"""What one verdict costs the policy service (``python -m bench.policyverdicts``).

The mesh's rate is bounded by the CPU every process spends per attestation, and the policy
service is one of the larger shares. This runs the real policy service (its own connection,
its pull consumer, logging at info as a deployment has it) against a real nats-server in
this process, and measures only the policy's side: ``nodes`` nodes attest once each first
(their pins are made), then ``verdicts`` more verdicts are published to the stream while the
service is stopped; their nonces are issued by the service (timed on their own), and the
service is started and timed until it has decided every one. The verdicts carry a real
SEV-SNP appraisal's claims, and ``refvalues`` reference values of the measurement are in
force, all matching, so every decision is an allow (the whole path: pin check, nonce,
Rego, signed decision, standing).

Figures are CPU milliseconds of this process per verdict (``time.process_time``, so other
processes on a shared machine do not count), plus what the service sent and received per
verdict, from its connection's counters and by subject, which do not depend on the load.
``--in-flight 1`` hands the service one verdict at a time, so the wall-clock time per
verdict is its latency: its CPU plus its round trips one after another.
Medians over ``repeats`` runs; the loaded 2-core machine this project runs on moves single
runs by ±20 %, so compare trees by alternating whole runs of each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from bench.resources import snp_claims
from services.mesh import subjects, telemetry
from services.mesh.bus import Bus
from services.mesh.keys import SigningKey, TrustedKeys
from services.mesh.natskv import NatsKeyValue
from services.mesh.server import NatsServer
from services.policy import refvalues, release_policy
from services.policy.engine import default_policy
from services.policy.service import PolicyService
from services.testing.verdicts import signed

_SUBJECT_KINDS = (
    ("$JS.API.STREAM.MSG.GET.", "kv_read"),
    ("$KV.", "kv_write"),
    ("$JS.ACK.", "ack"),
    ("$JS.API.CONSUMER.MSG.NEXT.", "pull"),
    ("attest.decision.", "decision"),
)


def _kind(subject: str) -> str:
    for prefix, kind in _SUBJECT_KINDS:
        if subject.startswith(prefix):
            return kind
    return "other"


class _Sent:
    """Counts what the service's connection publishes, by kind of subject."""

    def __init__(self, bus: Bus) -> None:
        self.counts: Counter[str] = Counter()
        publish = bus.nc.publish

        async def counted(subject: str, *args: Any, **kwargs: Any) -> None:
            self.counts[_kind(subject)] += 1
            await publish(subject, *args, **kwargs)

        bus.nc.publish = counted  # type: ignore[method-assign]


async def _run(
    workdir: Path, *, nodes: int, verdicts: int, refs: int, in_flight: int
) -> dict[str, Any]:
    claims, hwid = snp_claims(workdir)
    verifier, signer = SigningKey.generate("verifier-snp"), SigningKey.generate("policy")
    operator = SigningKey.generate("operator")
    trusted = TrustedKeys({k.name: k.public_key() for k in (verifier, signer, operator)})
    server = NatsServer(workdir / "nats")
    server.start()
    driver = service_bus = None
    try:
        driver = await Bus.connect(server.url, "driver")
        await driver.setup()
        measurements = [claims["measurement"]] + [os.urandom(48).hex() for _ in range(refs - 1)]
        await release_policy.store(
            NatsKeyValue(await driver.key_value(subjects.BUCKET_POLICIES)),
            default_policy(),
            operator=operator,
        )
        await refvalues.store(
            NatsKeyValue(await driver.key_value(subjects.BUCKET_REFVALUES)),
            "snp",
            {"measurement": list(measurements)},
            operator=operator,
        )
        service_bus = await Bus.connect(server.url, "policy")
        service = PolicyService(
            service_bus, signer, trusted, settings={"allow_simulated": True}, nonce_ttl=600.0
        )
        await service.start()
        assert service.nonces is not None
        sent = _Sent(service_bus)

        async def issue_and_publish(count: int, offset: int) -> float:
            """Issue ``count`` nonces (returns their CPU) and publish a verdict on each."""
            cpu = 0.0
            for i in range(count):
                node = f"node-{(offset + i) % nodes}"
                started = time.process_time()
                assert service.nonces is not None
                challenge = await service.nonces.issue(node)
                cpu += time.process_time() - started
                verdict = signed(
                    verifier, node, challenge.nonce, claims=claims, hwid=f"{hwid}-{node}"
                )
                await driver.publish(subjects.verdict("snp", node), verdict)
            return cpu

        async def decide(count: int) -> tuple[float, float]:
            """Run the service's consumer until it has decided ``count`` verdicts."""
            done = [0]
            finished = asyncio.Event()

            async def handler(msg: Msg) -> None:
                await service.handle_verdict(msg)
                done[0] += 1
                if done[0] >= count:
                    finished.set()

            stop = asyncio.Event()
            started, wall = time.process_time(), time.perf_counter()
            consumer = asyncio.create_task(
                service_bus.consume(
                    stream=subjects.STREAM_VERDICTS,
                    durable="policy",
                    subject=subjects.VERDICT_ALL,
                    handler=handler,
                    stop=stop,
                    batch=in_flight,
                )
            )
            await asyncio.wait_for(finished.wait(), 300)
            cpu, elapsed = time.process_time() - started, time.perf_counter() - wall
            stop.set()
            await consumer
            return cpu, elapsed

        await issue_and_publish(nodes, 0)  # first rounds: every node gets pinned
        await decide(nodes)
        issue_cpu = await issue_and_publish(verdicts, 0)
        before_stats, before_sent = dict(service_bus.nc.stats), Counter(sent.counts)
        cpu, elapsed = await decide(verdicts)
        stats = {k: (service_bus.nc.stats[k] - before_stats[k]) / verdicts for k in before_stats}
        by_kind = {k: round(v / verdicts, 2) for k, v in (sent.counts - before_sent).items()}
        return {
            "verdict_cpu_ms": cpu / verdicts * 1e3,
            "nonce_issue_cpu_ms": issue_cpu / verdicts * 1e3,
            "verdicts_per_s": verdicts / elapsed,
            "wall_ms_per_verdict": elapsed / verdicts * 1e3,
            "sent_per_verdict": by_kind,
            "connection_per_verdict": {k: round(v, 2) for k, v in stats.items()},
        }
    finally:
        for bus in (service_bus, driver):
            if bus is not None:
                with contextlib.suppress(Exception):
                    await bus.close()
        server.stop()


def measure(
    *, nodes: int, verdicts: int, refs: int, repeats: int, in_flight: int = 16
) -> dict[str, Any]:
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            found = _run(Path(tmp), nodes=nodes, verdicts=verdicts, refs=refs, in_flight=in_flight)
            runs.append(asyncio.run(found))
    median = {
        key: round(statistics.median(run[key] for run in runs), 3)
        for key in ("verdict_cpu_ms", "nonce_issue_cpu_ms", "verdicts_per_s", "wall_ms_per_verdict")
    }
    return {
        **median,
        "runs_verdict_cpu_ms": [round(run["verdict_cpu_ms"], 3) for run in runs],
        "sent_per_verdict": runs[-1]["sent_per_verdict"],
        "connection_per_verdict": runs[-1]["connection_per_verdict"],
        "setup": {"nodes": nodes, "verdicts": verdicts, "refvalues": refs, "in_flight": in_flight},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.policyverdicts")
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--verdicts", type=int, default=500)
    parser.add_argument("--refvalues", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--in-flight", type=int, default=16, help="verdicts handled at once (1: one by one)"
    )
    args = parser.parse_args(argv)
    with open(os.devnull, "w") as sink:
        telemetry.configure("policy", level="info", stream=sink)
        found = measure(
            nodes=args.nodes,
            verdicts=args.verdicts,
            refs=args.refvalues,
            repeats=args.repeats,
            in_flight=args.in_flight,
        )
    json.dump(found, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
