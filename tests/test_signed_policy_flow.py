"""Attacks on the policy's inputs, on a real nats-server: whoever can write the ``policies``
or ``refvalues`` bucket still cannot loosen what the mesh releases secrets for."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import msgspec

from services.collector.service import CollectorNode, RoundResult
from services.collector.simulator.node import SimulatedSnp
from services.mesh import events, subjects
from services.mesh.bus import Bus
from services.mesh.keys import SigningKey
from services.mesh.natskv import NatsKeyValue
from services.mesh.server import NatsServer
from services.policy import documents, refvalues, release_policy
from services.policy.engine import default_policy
from services.policy.ledger import Ledger
from services.policy.release_policy import POLICY_KEY
from services.testing.mesh import TestMesh

ALLOW_ALL = (
    'package attestmesh.release\nimport rego.v1\ndecision := {"allow": true, "reasons": []}\n'
)
MAINTENANCE = (
    "package attestmesh.release\nimport rego.v1\n"
    'decision := {"allow": false, "reasons": ["closed for maintenance"]}\n'
)
NOT_A_REFERENCE_VALUE = "claim measurement is not among the reference values"


async def _kv(bus: Bus, bucket: str) -> NatsKeyValue:
    return NatsKeyValue(await bus.key_value(bucket))


async def _overwrite(kv: NatsKeyValue, key: str, raw: bytes) -> None:
    """What a client with write access to the bucket can do: put any bytes there."""
    current = await kv.get(key)
    if current is None:
        await kv.create(key, raw)
    else:
        await kv.update(key, raw, current[1])


async def _until(condition: Any, what: str, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _refused(ledger: Ledger, key: str, reason: str) -> None:
    await _until(lambda: ledger.refusals.get(key) == reason, f"{key} refused with {reason}")


async def _claims(bus: Bus, mesh: TestMesh, node: CollectorNode) -> dict[str, Any]:
    """The signed claims of the node's last decision, as the policy published them."""
    sub = await bus.js.subscribe(subjects.decision(node.node), ordered_consumer=True)
    try:
        while True:
            msg = await sub.next_msg(timeout=5.0)
            decision = events.decode(msg.data, events.Decision)
            if decision.id == node.last_decision_id:
                return mesh.trusted.verify(
                    decision.token, accept=lambda n: n == "policy", now=events.utcnow()
                )
    finally:
        await sub.unsubscribe()


async def _denied(bus: Bus, mesh: TestMesh, node: CollectorNode) -> dict[str, Any]:
    result = await node.attest_once()
    assert result.status == "affirming" and not result.allowed and not result.released, result
    return await _claims(bus, mesh, node)


async def _attest_until(node: CollectorNode, done: Any) -> RoundResult:
    for _ in range(60):  # the policy recompiles when its watcher sees the change
        result = await node.attest_once()
        if done(result):
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"never reached the expected outcome: {result}")


async def _policy_id(mesh: TestMesh, policies: NatsKeyValue) -> str:
    """The id decisions carry while the stored policy is the one in force."""
    stored = await policies.get(POLICY_KEY)
    assert stored is not None
    document = documents.open_signed(
        stored[0], mesh.trusted, bucket=subjects.BUCKET_POLICIES, key=POLICY_KEY, kind="policy"
    )
    return f"{POLICY_KEY}@v{document.version}"


def _measurement(node: CollectorNode) -> str:
    assert isinstance(node.source, SimulatedSnp)
    return node.source.measurement.hex()


async def test_unsigned_foreign_and_non_operator_policies_are_refused(
    mesh: TestMesh, bus: Bus
) -> None:
    assert mesh.policy is not None
    ledger = mesh.policy.loader.policy_ledger if mesh.policy.loader else None
    assert ledger is not None
    refs = await _kv(bus, subjects.BUCKET_REFVALUES)
    policies = await _kv(bus, subjects.BUCKET_POLICIES)
    node = mesh.node(bus, "node-o")
    seeded = await _policy_id(mesh, policies)
    await refvalues.store(refs, "snp", {"measurement": ["00" * 48]}, operator=mesh.operator_key)
    await _attest_until(node, lambda r: not r.allowed)

    forgeries = {
        "policy.unsigned": ALLOW_ALL.encode(),
        "policy.unknown_signer": documents.seal(
            SigningKey.generate("operator"),
            bucket=subjects.BUCKET_POLICIES,
            key=POLICY_KEY,
            payload=ALLOW_ALL.encode(),
            version=1000,
            issued_at=events.utcnow(),
        ),
        # The policy service's own key is trusted, but not to write policies.
        "policy.wrong_signer": documents.seal(
            mesh.policy_key,
            bucket=subjects.BUCKET_POLICIES,
            key=POLICY_KEY,
            payload=ALLOW_ALL.encode(),
            version=1001,
            issued_at=events.utcnow(),
        ),
    }
    for reason, raw in forgeries.items():
        await _overwrite(policies, POLICY_KEY, raw)
        await _refused(ledger, POLICY_KEY, reason)
        claims = await _denied(bus, mesh, node)  # allow-all would have released
        assert NOT_A_REFERENCE_VALUE in claims["reasons"], claims
        assert claims["policy_id"] == seeded

    # The operator's own signed change takes effect.
    await refvalues.store(
        refs, "snp", {"measurement": [_measurement(node)]}, operator=mesh.operator_key
    )
    await _attest_until(node, lambda r: r.released)


async def test_a_rolled_back_policy_is_refused(mesh: TestMesh, bus: Bus) -> None:
    assert mesh.policy is not None and mesh.policy.loader is not None
    policies = await _kv(bus, subjects.BUCKET_POLICIES)
    node = mesh.node(bus, "node-b")
    assert (await node.attest_once()).released
    first = await policies.get(POLICY_KEY)  # the default policy, operator-signed
    assert first is not None
    await release_policy.store(policies, MAINTENANCE, operator=mesh.operator_key)
    maintenance = await _policy_id(mesh, policies)
    await _attest_until(node, lambda r: not r.allowed)

    await _overwrite(policies, POLICY_KEY, first[0])  # a genuine, older signed policy
    await _refused(mesh.policy.loader.policy_ledger, POLICY_KEY, "policy.rollback")
    claims = await _denied(bus, mesh, node)  # the older policy would have released
    assert claims["reasons"][:1] == ["closed for maintenance"]
    assert claims["policy_id"] == maintenance

    # The operator re-signs the default policy: a newer version, accepted.
    await release_policy.store(policies, default_policy(), operator=mesh.operator_key)
    await _attest_until(node, lambda r: r.released)
    assert (await _claims(bus, mesh, node))["policy_id"] == await _policy_id(mesh, policies)


async def test_tampered_moved_or_deleted_reference_values_are_refused(
    mesh: TestMesh, bus: Bus
) -> None:
    assert mesh.policy is not None and mesh.policy.loader is not None
    ledger = mesh.policy.loader.ref_ledger
    refs = await _kv(bus, subjects.BUCKET_REFVALUES)
    node = mesh.node(bus, "node-t")
    await refvalues.store(refs, "snp", {"measurement": ["00" * 48]}, operator=mesh.operator_key)
    await _attest_until(node, lambda r: not r.allowed)
    stored = await refs.get("snp")
    assert stored is not None

    # Tampered: the node's measurement spliced into the signed body.
    envelope = msgspec.json.decode(stored[0])
    body = base64.b64decode(envelope["body"])
    payload = msgspec.json.encode({"measurement": [_measurement(node)]})
    decoded = msgspec.json.decode(body)
    decoded["payload"] = base64.b64encode(payload).decode()
    envelope["body"] = base64.b64encode(msgspec.json.encode(decoded)).decode()
    await _overwrite(refs, "snp", msgspec.json.encode(envelope))
    await _refused(ledger, "snp", "refvalues.bad_signature")
    assert NOT_A_REFERENCE_VALUE in (await _denied(bus, mesh, node))["reasons"]

    # Moved: genuine operator-signed values for another family, put under snp.
    other = documents.seal(
        mesh.operator_key,
        bucket=subjects.BUCKET_REFVALUES,
        key="tdx",
        payload=payload,
        version=50,
        issued_at=events.utcnow(),
    )
    await _overwrite(refs, "snp", other)
    await _refused(ledger, "snp", "refvalues.wrong_key")
    assert NOT_A_REFERENCE_VALUE in (await _denied(bus, mesh, node))["reasons"]

    # Deleted: no reference values would mean no constraint at all.
    await refs.delete("snp")
    await _refused(ledger, "snp", "refvalues.deleted")
    assert NOT_A_REFERENCE_VALUE in (await _denied(bus, mesh, node))["reasons"]


async def test_without_a_good_policy_the_service_runs_and_denies_until_one_arrives(
    nats_server: NatsServer, tmp_path: Path, bus: Bus
) -> None:
    running = TestMesh(nats_server, tmp_path)
    policies = await _kv(bus, subjects.BUCKET_POLICIES)
    await policies.create(POLICY_KEY, ALLOW_ALL.encode())  # unsigned, before the service starts
    await running.start_verifier()
    await running.start_policy(seed=False)
    await running.start_broker()
    try:
        assert running.policy is not None and running.policy.loader is not None
        assert running.policy.loader.policy_ledger.refusals[POLICY_KEY] == "policy.unsigned"
        node = running.node(bus, "node-u")
        claims = await _denied(bus, running, node)
        assert claims["reasons"][:1] == ["policy.unavailable"]

        # Signed but broken Rego: still running, still denying, no crash loop.
        await release_policy.store(
            policies, "package broken\nallow if {", operator=running.operator_key
        )
        await _refused(running.policy.loader.policy_ledger, POLICY_KEY, "policy.compile_failed")
        assert (await _denied(bus, running, node))["reasons"][:1] == ["policy.unavailable"]
        assert not running.running["policy"].task.done()

        refs = await _kv(bus, subjects.BUCKET_REFVALUES)  # snp released on status alone
        await refvalues.store(refs, "snp", {}, operator=running.operator_key)
        await release_policy.store(policies, default_policy(), operator=running.operator_key)
        good = await _policy_id(running, policies)
        await _attest_until(node, lambda r: r.released)

        # A broken version after a good one leaves the good one in force.
        await release_policy.store(
            policies, "package broken\nallow if {", operator=running.operator_key
        )
        await _refused(running.policy.loader.policy_ledger, POLICY_KEY, "policy.compile_failed")
        assert (await node.attest_once()).released
        assert (await _claims(bus, running, node))["policy_id"] == good
    finally:
        await running.stop()


async def test_a_failed_refvalues_read_blocks_decisions(mesh: TestMesh, bus: Bus) -> None:
    assert mesh.policy is not None and mesh.policy.loader is not None
    node = mesh.node(bus, "node-r")
    assert (await node.attest_once()).released
    await bus.js.delete_stream("KV_" + subjects.BUCKET_REFVALUES)
    policies = await _kv(bus, subjects.BUCKET_POLICIES)
    await release_policy.store(policies, default_policy(), operator=mesh.operator_key)
    loader = mesh.policy.loader
    await _until(lambda: loader.blocked == "policy.refvalues_unavailable", "blocked decisions")
    claims = await _denied(bus, mesh, node)
    assert claims["reasons"][:1] == ["policy.refvalues_unavailable"]

    await bus.setup(nonce_ttl=60.0)  # the bucket is back (empty): decisions resume
    await _until(lambda: loader.blocked is None, "unblocked decisions")
    await _attest_until(node, lambda r: r.released)


async def test_a_brief_read_failure_defers_a_verdict_instead_of_denying_it(
    mesh: TestMesh, bus: Bus
) -> None:
    """A server failing over must not deny (and so revoke) an honest node: while the buckets
    cannot be read, a fresh verdict goes back for redelivery, and is decided once they can."""
    assert mesh.policy is not None and mesh.policy.loader is not None
    node = mesh.node(bus, "node-f")
    assert (await node.attest_once()).released
    await bus.js.delete_stream("KV_" + subjects.BUCKET_REFVALUES)
    policies = await _kv(bus, subjects.BUCKET_POLICIES)
    await release_policy.store(policies, default_policy(), operator=mesh.operator_key)
    loader = mesh.policy.loader
    await _until(lambda: loader.read_failed, "a failed read")
    round_ = asyncio.create_task(node.attest_once())
    await asyncio.sleep(0.5)
    assert not round_.done()  # neither allowed nor denied while nothing can be read
    await bus.setup(nonce_ttl=60.0)
    result = await round_
    assert result.released, result


async def test_reference_values_overwritten_before_a_start_deny_their_family(
    nats_server: NatsServer, tmp_path: Path, bus: Bus
) -> None:
    """A replica starting after ``refvalues/snp`` was replaced has no good version to keep;
    going without the family's reference values would let every measurement through."""
    running = TestMesh(nats_server, tmp_path)
    refs = await _kv(bus, subjects.BUCKET_REFVALUES)
    await refs.create("snp", b'{"measurement": []}')  # unsigned: "anything goes"
    await running.start()
    try:
        node = running.node(bus, "node-w")
        claims = await _denied(bus, running, node)
        assert claims["reasons"][:2] == ["policy.refvalues_unavailable", "refvalues.unsigned"]
        values: refvalues.RefValues = {"measurement": [_measurement(node)]}
        await refvalues.store(refs, "snp", values, operator=running.operator_key)
        await _attest_until(node, lambda r: r.released)
    finally:
        await running.stop()


async def test_a_restarted_policy_service_still_refuses_a_rollback_and_a_deletion(
    mesh: TestMesh, bus: Bus
) -> None:
    """The writer puts back the older signed policy and deletes the reference values while
    no replica is running; the one that starts next learns the newer ones from history."""
    policies = await _kv(bus, subjects.BUCKET_POLICIES)
    refs = await _kv(bus, subjects.BUCKET_REFVALUES)
    node = mesh.node(bus, "node-h")
    first = await policies.get(POLICY_KEY)
    assert first is not None
    await refvalues.store(refs, "snp", {"measurement": ["00" * 48]}, operator=mesh.operator_key)
    await release_policy.store(policies, MAINTENANCE, operator=mesh.operator_key)
    maintenance = await _policy_id(mesh, policies)
    await _attest_until(node, lambda r: not r.allowed)

    await mesh.halt("policy")
    await _overwrite(policies, POLICY_KEY, first[0])
    await refs.delete("snp")
    await mesh.start_policy(seed=False)  # the operator has not signed anything new
    assert mesh.policy is not None and mesh.policy.loader is not None
    assert mesh.policy.loader.policy_ledger.refusals[POLICY_KEY] == "policy.rollback"
    assert mesh.policy.loader.ref_ledger.refusals["snp"] == "refvalues.deleted"
    claims = await _denied(bus, mesh, node)
    assert claims["reasons"][:1] == ["closed for maintenance"]
    assert claims["policy_id"] == maintenance

    # Back to the default policy (signed anew): the reference values still hold.
    await release_policy.store(policies, default_policy(), operator=mesh.operator_key)
    current = await _policy_id(mesh, policies)
    for _ in range(60):
        claims = await _denied(bus, mesh, node)
        if claims["policy_id"] == current:
            break
        await asyncio.sleep(0.1)
    assert claims["policy_id"] == current
    assert NOT_A_REFERENCE_VALUE in claims["reasons"], claims


async def test_purged_reference_values_deny_on_a_restarted_replica(
    mesh: TestMesh, bus: Bus
) -> None:
    """A purge is a rollup: it leaves no history to learn the family from. The replica that
    starts next must deny the family, not evaluate it with no reference values at all."""
    refs = await _kv(bus, subjects.BUCKET_REFVALUES)
    node = mesh.node(bus, "node-p")
    await refvalues.store(refs, "snp", {"measurement": ["00" * 48]}, operator=mesh.operator_key)
    await _attest_until(node, lambda r: not r.allowed)

    await mesh.halt("policy")
    kv = await bus.key_value(subjects.BUCKET_REFVALUES)
    await kv.purge("snp")
    await mesh.start_policy(seed=False)
    claims = await _denied(bus, mesh, node)
    assert "no reference values are provisioned for this family" in claims["reasons"], claims
