"""What one attestation round costs the broker in KV round trips, counted on the wire.

Each KV read is a stream-message request and each write a publish to the bucket's subject,
so a subscriber on both sees every one the broker makes (nothing else in the mesh touches
``broker-state``). Before the broker remembered what it had stored (``recorded.py``) and kept
sealed secrets (``store.py``), a round cost nine on this path: the decision read, written
and read again by the consumer (with a conflicting write between the two), the index and
the record, the claim and the audit append. Now: one decision write or read, the index,
the claim and the append, and one more read when the consumer records the decision first.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from nats.aio.msg import Msg

from services.collector.service import DEFAULT_RESOURCE
from services.mesh import events, subjects
from services.mesh.bus import Bus
from services.mesh.keys import SigningKey
from services.testing.mesh import TestMesh

ROUNDS = 8


async def test_a_round_costs_the_broker_at_most_five_kv_round_trips(
    mesh: TestMesh, bus: Bus
) -> None:
    node = mesh.node(bus, "node-trips")
    assert (await node.attest_once()).released  # the first round also creates the records
    await asyncio.sleep(0.3)  # the consumer has recorded that first decision
    seen: Counter[str] = Counter()

    async def count(msg: Msg) -> None:
        parts = msg.subject.split(".")
        seen["get" if parts[0] == "$JS" else f"write:{parts[2]}"] += 1

    reads = await bus.nc.subscribe(f"$JS.API.STREAM.MSG.GET.KV_{subjects.BUCKET_BROKER}", cb=count)
    writes = await bus.nc.subscribe(f"$KV.{subjects.BUCKET_BROKER}.>", cb=count)
    await bus.nc.flush()
    try:
        for _ in range(ROUNDS):
            assert (await node.attest_once()).released
        await asyncio.sleep(0.3)  # and the last one
        await bus.nc.flush()
    finally:
        await reads.unsubscribe()
        await writes.unsubscribe()
    assert seen["write:answered"] == seen["write:audit"] == ROUNDS, seen
    assert ROUNDS <= seen["write:decision"] + seen["get"] - ROUNDS <= 2 * ROUNDS, seen
    assert sum(seen.values()) <= 5 * ROUNDS, seen


async def test_requests_naming_no_genuine_decision_never_read_a_secret(
    mesh: TestMesh, bus: Bus
) -> None:
    """A presented allow starts the secret read early (beside the decision's write); a
    forged or missing one must not, or a flood of them would cost a read each."""
    node = mesh.node(bus, "node-flood")
    assert (await node.attest_once()).released
    index_reads = 0

    async def count(msg: Msg) -> None:
        nonlocal index_reads
        index_reads += b".index" in msg.data

    reads = await bus.nc.subscribe(f"$JS.API.STREAM.MSG.GET.KV_{subjects.BUCKET_BROKER}", cb=count)
    await bus.nc.flush()
    forger = SigningKey.generate("policy")
    try:
        for token in ("", forger.sign({"node": "node-flood", "allow": True}), "x.y.z"):
            request = events.SecretRequest(
                node="node-flood",
                resource=DEFAULT_RESOURCE,
                public_key=node.last_public_key,
                decision_id="0" * 32,  # not the node's decision: a stranger's request
                evidence_id=node.last_evidence_id,
                decision_token=token,
            )
            answer = await bus.request(
                subjects.secret("node-flood"), request, events.SecretResponse
            )
            assert not answer.ok
        await bus.nc.flush()
    finally:
        await reads.unsubscribe()
    assert index_reads == 0
