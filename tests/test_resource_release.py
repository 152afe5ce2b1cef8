"""The resource policy end to end on a real nats-server: a secret kept for one measurement,
nodes reaching for each other's resources, decision summaries altered in storage, and
resource policies that are unsigned, tampered or broken when the broker starts."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from services.collector.simulator.node import SimulatedSnp
from services.mesh import events, subjects
from services.mesh.bus import Bus
from services.mesh.errors import PolicyError, ReleaseError
from services.mesh.keys import SigningKey, TrustedKeys
from services.mesh.natskv import NatsKeyValue
from services.mesh.server import NatsServer
from services.policy import documents, release_policy
from services.policy.engine import RESOURCE, default_resource_policy
from services.policy.release_policy import RESOURCE_KEY
from services.testing.mesh import TestMesh

UNAVAILABLE = "broker.resource_policy_unavailable"
FORBIDDEN = "broker.resource_forbidden"
PROD = "prod/key/db"

KEPT_FOR_ONE_MEASUREMENT = """package attestmesh.resource

import rego.v1

default allow := false

allow if input.resource.repository in {"default", input.node}

allow if {
	input.resource.repository == "prod"
	input.appraisal.status == "affirming"
	input.appraisal.claims.measurement == "%s"
}

decision := {"allow": allow, "reasons": []}
"""


async def _until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _policies(bus: Bus) -> NatsKeyValue:
    return NatsKeyValue(await bus.key_value(subjects.BUCKET_POLICIES))


async def _store(mesh: TestMesh, bus: Bus, source: str) -> str:
    """Sign and store ``source`` as the resource policy; the id it will be in force as."""
    version = await release_policy.store(
        await _policies(bus), source, operator=mesh.operator_key, kind=RESOURCE
    )
    return f"{RESOURCE_KEY}@v{version}"


def _in_force(mesh: TestMesh) -> str:
    assert mesh.broker is not None
    engine = mesh.broker.resources.engine
    return engine.policy_id if engine is not None else ""


def _source(node: object, image: bytes | None) -> SimulatedSnp:
    source = node.source  # type: ignore[attr-defined]
    assert isinstance(source, SimulatedSnp)
    if image is not None:
        source.measurement = hashlib.sha384(image).digest()
    return source


async def test_a_secret_kept_for_one_measurement_reaches_only_that_guest(
    mesh: TestMesh, bus: Bus
) -> None:
    assert mesh.broker is not None and mesh.broker.store is not None
    received: dict[str, bytes] = {}
    good = mesh.node(bus, "node-good", received=received, resource=PROD)
    other = mesh.node(bus, "node-other", received=received, resource=PROD)
    wanted = _source(good, None).measurement.hex()
    _source(other, b"another guest image")  # affirming too, but another measurement
    secret = b"database password 0123456789"
    await mesh.broker.store.put(PROD, secret)

    # Under the packaged default, prod/* belongs to nobody.
    refused = await good.attest_once()
    assert not refused.released and refused.reason == FORBIDDEN, refused

    policy_id = await _store(mesh, bus, KEPT_FOR_ONE_MEASUREMENT % wanted)
    await _until(lambda: _in_force(mesh) == policy_id, "the broker to load the new policy")
    assert mesh.broker.resources.claims == frozenset({"measurement"})
    released = await good.attest_once()
    assert released.released, released
    assert received == {"node-good": secret}
    denied = await other.attest_once()  # an allow decision, then no release under it
    assert not denied.released and denied.reason == FORBIDDEN, denied
    assert "node-other" not in received

    # The node's own and the shared repository still work as before.
    mine = mesh.node(bus, "node-good", received=received)
    assert (await mine.attest_once()).released and received["node-good"] == mesh.secret


async def test_a_node_asking_for_another_nodes_resource_is_refused(
    mesh: TestMesh, bus: Bus
) -> None:
    assert mesh.broker is not None and mesh.broker.store is not None
    await mesh.broker.store.put("node-b/key/tls", b"node-b's own key material")
    intruder = mesh.node(bus, "node-a", resource="node-b/key/tls")
    result = await intruder.attest_once()
    assert not result.released and result.reason == FORBIDDEN, result

    # Under its genuine decision, through its own subject, naming itself: still refused.
    def request(node: str, resource: str) -> events.SecretRequest:
        return events.SecretRequest(
            node=node,
            resource=resource,
            public_key=intruder.last_public_key,
            decision_id=intruder.last_decision_id,
            evidence_id=intruder.last_evidence_id,
        )

    for resource in ("node-b/key/tls", "node-b/tls", "node-a-not/key/tls"):
        answer = await bus.request(
            subjects.secret("node-a"), request("node-a", resource), events.SecretResponse
        )
        assert not answer.ok and answer.reason == FORBIDDEN, (resource, answer)
    # Naming node-b on its own subject is a routing mismatch; on node-b's, not node-b's decision.
    answer = await bus.request(
        subjects.secret("node-a"), request("node-b", "node-b/key/tls"), events.SecretResponse
    )
    assert not answer.ok and answer.reason == "broker.routing_mismatch"
    answer = await bus.request(
        subjects.secret("node-b"), request("node-b", "node-b/key/tls"), events.SecretResponse
    )
    assert not answer.ok and answer.reason == "broker.no_decision"

    owner: dict[str, bytes] = {}
    assert (
        await mesh.node(bus, "node-b", received=owner, resource="node-b/key/tls").attest_once()
    ).released
    assert owner == {"node-b": b"node-b's own key material"}


def _altered(token: str, change: Callable[[dict[str, object]], None]) -> str:
    """The token with its payload changed and its signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    change(claims)
    encoded = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{encoded}.{signature}"


async def test_a_decision_whose_summary_was_altered_releases_nothing(
    mesh: TestMesh, bus: Bus
) -> None:
    """A writer of ``broker-state`` rewrites the stored decision's summary to the measurement
    a resource is kept for: it no longer matches the digest the policy signed, and a token
    rewritten to the new digest no longer carries the policy's signature."""
    assert mesh.broker is not None and mesh.broker.store is not None
    await mesh.broker.store.put(PROD, b"kept for another image")
    node = mesh.node(bus, "node-m", resource=PROD)
    _source(node, b"an image nobody vouched for")
    wanted = hashlib.sha384(b"the vouched image").hexdigest()
    policy_id = await _store(mesh, bus, KEPT_FOR_ONE_MEASUREMENT % wanted)
    await _until(lambda: _in_force(mesh) == policy_id, "the broker to load the new policy")
    first = await node.attest_once()
    assert not first.released and first.reason == FORBIDDEN, first

    state = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
    stored = await state.get("decision.node-m")
    assert stored is not None
    token, separator, appraisal = stored[0].partition(b"\n")
    held = await mesh.broker.current_decision("node-m")
    assert held.appraisal.family == "snp" and held.appraisal.status == "affirming"
    measurement = held.appraisal.claims["measurement"]
    assert measurement != wanted and measurement.encode() in appraisal
    forged = appraisal.replace(measurement.encode(), wanted.encode())

    def signing_the_forgery(claims: dict[str, object]) -> None:
        claims["appraisal_sha256"] = hashlib.sha256(forged).hexdigest()

    request = events.SecretRequest(
        node="node-m",
        resource=PROD,
        public_key=node.last_public_key,
        decision_id=node.last_decision_id,
        evidence_id=node.last_evidence_id,
    )
    revision = stored[1]
    for record, why in (
        (token + separator + forged, "broker.appraisal_mismatch"),
        (
            _altered(token.decode(), signing_the_forgery).encode() + separator + forged,
            "token.invalid",
        ),
    ):
        revision = await state.update("decision.node-m", record, revision)
        with pytest.raises(ReleaseError) as err:
            await mesh.broker.current_decision("node-m")
        assert err.value.reason == "broker.decision_invalid" and err.value.detail == why
        answer = await bus.request(subjects.secret("node-m"), request, events.SecretResponse)
        assert not answer.ok and answer.reason == "broker.decision_invalid"


async def test_without_a_good_resource_policy_the_broker_runs_and_refuses(
    nats_server: NatsServer, tmp_path: Path, bus: Bus
) -> None:
    running = TestMesh(nats_server, tmp_path)
    policies = await _policies(bus)
    await policies.create(RESOURCE_KEY, b'package attestmesh.resource\ndecision := {"allow": true}')
    await running.start_verifier()
    await running.start_policy()
    await running.start_broker(seed=False)
    try:
        broker = running.broker
        assert broker is not None
        assert broker.resources.blocked == UNAVAILABLE
        assert broker.resources.refusal == "resource_policy.unsigned"
        node = running.node(bus, "node-u")
        result = await node.attest_once()
        assert not result.released and result.reason == UNAVAILABLE, result

        # Signed but not Rego, then signed but of the other kind: still refusing, still up.
        for broken in ("package attestmesh.resource\nallow if {", "package attestmesh.release\n"):
            await _store(running, bus, broken)
            await _until(
                lambda: broker.resources.refusal == "resource_policy.compile_failed",
                "the broken policy to be refused",
            )
            assert (await node.attest_once()).reason == UNAVAILABLE
            assert not running.running["broker"].task.done()
            broker.resources.ledger.refusals.clear()

        policy_id = await _store(running, bus, default_resource_policy())
        await _until(lambda: _in_force(running) == policy_id, "the default to be loaded")
        assert broker.resources.blocked is None and broker.resources.claims == frozenset()
        assert (await node.attest_once()).released
    finally:
        await running.stop()


async def test_a_restarted_broker_keeps_the_last_good_resource_policy(
    mesh: TestMesh, bus: Bus
) -> None:
    assert mesh.broker is not None
    policies = await _policies(bus)
    node = mesh.node(bus, "node-r")
    assert (await node.attest_once()).released
    good = _in_force(mesh)
    stored = await policies.get(RESOURCE_KEY)
    assert stored is not None and good

    # Tampered: the operator's signature over a loosened body.
    envelope = json.loads(stored[0])
    body = json.loads(base64.b64decode(envelope["body"]))
    body["payload"] = base64.b64encode(
        b'package attestmesh.resource\ndecision := {"allow": true, "reasons": []}\n'
    ).decode()
    body["version"] += 1
    envelope["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    await policies.update(RESOURCE_KEY, json.dumps(envelope).encode(), stored[1])
    await _until(
        lambda: (
            mesh.broker is not None
            and mesh.broker.resources.refusal == "resource_policy.bad_signature"
        ),
        "the tampered policy to be refused",
    )
    assert _in_force(mesh) == good

    await mesh.halt("broker")
    await mesh.start_broker(seed=False)
    broker = mesh.broker
    assert broker is not None
    assert broker.resources.refusal == "resource_policy.bad_signature"
    assert _in_force(mesh) == good and broker.resources.blocked is None
    assert (await node.attest_once()).released
    stolen = mesh.node(bus, "node-r", resource="node-x/key/tls")
    assert (await stolen.attest_once()).reason == FORBIDDEN  # not loosened

    # A signed document that does not compile, at a restart: the last good one stays.
    await mesh.halt("broker")
    await _store(mesh, bus, "package attestmesh.resource\nallow if {")
    await mesh.start_broker(seed=False)
    broker = mesh.broker
    assert broker is not None
    assert broker.resources.refusal == "resource_policy.compile_failed"
    assert _in_force(mesh) == good
    assert (await node.attest_once()).released

    # Deleting the key is an unsigned change too.
    current = await policies.get(RESOURCE_KEY)
    assert current is not None
    await policies.delete(RESOURCE_KEY, current[1])
    await _until(
        lambda: broker.resources.refusal == "resource_policy.deleted", "the deletion refused"
    )
    assert (await node.attest_once()).released


def test_documents_name_their_kind() -> None:
    """A release policy signed for ``release`` cannot be replayed as the resource policy."""
    operator = SigningKey.generate("operator")
    trusted = TrustedKeys({"operator": operator.public_key()})
    raw = documents.seal(
        operator,
        bucket=subjects.BUCKET_POLICIES,
        key="release",
        payload=default_resource_policy().encode(),
        version=1,
        issued_at=events.utcnow(),
    )
    with pytest.raises(PolicyError) as err:
        documents.open_signed(
            raw, trusted, bucket=subjects.BUCKET_POLICIES, key=RESOURCE_KEY, kind=RESOURCE.reason
        )
    assert err.value.reason == "resource_policy.wrong_key"


async def _decision_of(bus: Bus, node: str, decision_id: str) -> events.Decision:
    sub = await bus.js.subscribe(subjects.decision(node), ordered_consumer=True)
    try:
        while True:
            decision = events.decode((await sub.next_msg(timeout=5.0)).data, events.Decision)
            if decision.id == decision_id:
                return decision
    finally:
        await sub.unsubscribe()


async def test_an_allow_carries_its_summary_and_a_swapped_one_is_dead_lettered(
    mesh: TestMesh, bus: Bus
) -> None:
    node = mesh.node(bus, "node-p")
    assert (await node.attest_once()).released
    genuine = await _decision_of(bus, "node-p", node.last_decision_id)
    claims = mesh.trusted.verify(genuine.token, accept=lambda n: n == "policy")
    assert claims["appraisal_sha256"] == hashlib.sha256(genuine.appraisal).hexdigest()
    carried = json.loads(genuine.appraisal)
    assert carried["claims"]["measurement"] == _source(node, None).measurement.hex()
    assert carried["hwid"] and carried["claims_omitted"] == ["tcb"]

    swapped = msgspec.structs.replace(
        genuine,
        id=events.new_id(),
        appraisal=genuine.appraisal.replace(b'"debug":false', b'"debug":true '),
    )
    assert swapped.appraisal != genuine.appraisal
    letters = await bus.js.subscribe(subjects.dlq(subjects.STREAM_DECISIONS), ordered_consumer=True)
    try:
        await bus.publish(subjects.decision("node-p"), swapped)
        letter = events.decode((await letters.next_msg(timeout=10.0)).data, events.DeadLetter)
    finally:
        await letters.unsubscribe()
    assert letter.reason == "broker.appraisal_mismatch"
    assert (await mesh.broker.current_decision("node-p")).decision_id == genuine.id  # type: ignore[union-attr]
