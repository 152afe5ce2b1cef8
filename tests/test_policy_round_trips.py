"""What one verdict costs the policy in KV operations, and the order its steps keep.

The policy service runs on a real nats-server with its real decision publishing; its nonce,
pin and standing stores are counting in-memory buckets, so each test can see every read and
write a verdict makes and when it makes it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from nats.aio.msg import Msg

from services.mesh import events, subjects
from services.mesh.bus import Bus, StreamAck
from services.mesh.errors import BusError, Rejected
from services.mesh.keys import SigningKey, TrustedKeys
from services.mesh.natskv import NatsKeyValue
from services.policy import pins, refvalues, release_policy
from services.policy.engine import default_policy
from services.policy.nonces import MAC_PURPOSE, RANDOM_BYTES, NonceStore
from services.policy.pins import PinStore
from services.policy.reevaluation import Standing
from services.policy.service import PolicyService
from services.testing import verdicts
from services.testing.memkv import CountingKeyValue

MEASUREMENT = "ab" * 48
CLAIMS: dict[str, Any] = {"measurement": MEASUREMENT, "debug": False}


@dataclass
class _Policy:
    service: PolicyService
    verifier: SigningKey
    nonces: CountingKeyValue
    pins: CountingKeyValue
    standing: CountingKeyValue
    nonce: bytes = field(default=b"")
    """The nonce of the latest verdict made."""

    def used_by(self) -> str | None:
        """The verdict that spent the latest nonce, if any did."""
        found = self.nonces.snapshot().get(self.nonce[:RANDOM_BYTES].hex())
        return None if found is None else str(json.loads(found)["used_by"])

    async def verdict(self, node: str, hwid: str = "snp.chip_id:aa") -> events.Verdict:
        assert self.service.nonces is not None
        challenge = await self.service.nonces.issue(node)
        self.nonce = challenge.nonce
        return verdicts.signed(self.verifier, node, challenge.nonce, claims=CLAIMS, hwid=hwid)

    async def handle(self, verdict: events.Verdict) -> None:
        await self.service.handle_verdict(verdicts.delivered(self.service.bus.nc, verdict))

    def counts(self) -> dict[str, tuple[int, int]]:
        kinds = {"nonces": self.nonces, "pins": self.pins, "standing": self.standing}
        return {name: (kv.reads, kv.writes) for name, kv in kinds.items()}


@pytest.fixture
async def policy(bus: Bus) -> AsyncIterator[_Policy]:
    operator, signer = SigningKey.generate("operator"), SigningKey.generate("policy")
    verifier = SigningKey.generate("verifier-snp")
    trusted = TrustedKeys({k.name: k.public_key() for k in (operator, signer, verifier)})
    policies = NatsKeyValue(await bus.key_value(subjects.BUCKET_POLICIES))
    await release_policy.store(policies, default_policy(), operator=operator)
    refs = NatsKeyValue(await bus.key_value(subjects.BUCKET_REFVALUES))
    await refvalues.store(refs, "snp", {"measurement": [MEASUREMENT]}, operator=operator)
    service = PolicyService(bus, signer, trusted, settings={"allow_simulated": True})
    await service.start()
    running = _Policy(service, verifier, CountingKeyValue(), CountingKeyValue(), CountingKeyValue())
    service.nonces = NonceStore(running.nonces, signer.derive(MAC_PURPOSE), ttl=60.0)
    service.pins = PinStore(running.pins)
    service.standing = Standing(running.standing, trusted, events.utcnow)
    yield running


async def _decisions(bus: Bus, node: str) -> asyncio.Queue[events.Decision]:
    found: asyncio.Queue[events.Decision] = asyncio.Queue()

    async def keep(msg: Msg) -> None:
        found.put_nowait(events.decode(msg.data, events.Decision))

    await bus.nc.subscribe(subjects.decision(node), cb=keep)
    return found


async def test_an_allow_reads_the_pin_and_writes_nonce_and_standing_once(
    policy: _Policy, bus: Bus
) -> None:
    decided = await _decisions(bus, "n1")
    await policy.handle(await policy.verdict("n1"))  # pins the node
    assert (await asyncio.wait_for(decided.get(), 5)).allow
    verdict = await policy.verdict("n1")
    before = policy.counts()
    await policy.handle(verdict)
    after = policy.counts()
    spent = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}
    assert spent == {"nonces": (0, 1), "pins": (1, 0), "standing": (0, 1)}
    assert (await asyncio.wait_for(decided.get(), 5)).allow


async def test_the_standing_is_written_while_the_decision_is_in_flight(policy: _Policy) -> None:
    """The allow's decision and the node's standing go out together (one round trip), and
    by then the pin has been read and the nonce spent."""
    await policy.handle(await policy.verdict("n1"))
    verdict = await policy.verdict("n1")
    writing = asyncio.Event()
    standing_update = policy.standing.update

    async def update(key: str, value: bytes, last_revision: int) -> int:
        writing.set()
        return await standing_update(key, value, last_revision)

    policy.standing.update = update  # type: ignore[method-assign]
    publish = policy.service.bus.publish
    seen: list[bool] = []

    async def gated(subject: str, message: events.Message, **options: Any) -> StreamAck:
        if isinstance(message, events.Decision):
            assert policy.used_by() == verdict.id
            await asyncio.wait_for(writing.wait(), 2.0)  # sequential writes never get here
            seen.append(message.allow)
        return await publish(subject, message, **options)

    policy.service.bus.publish = gated  # type: ignore[method-assign]
    reads = policy.pins.reads
    await policy.handle(verdict)
    assert seen == [True] and policy.pins.reads == reads + 1


async def test_a_failed_standing_write_is_retried_whole(policy: _Policy, bus: Bus) -> None:
    """A failure of either write surfaces as itself (the consumer retries a BusError), and
    the redelivered verdict is accepted again and writes both."""
    decided = await _decisions(bus, "n1")
    verdict = await policy.verdict("n1")
    create = policy.standing.create

    async def unavailable(key: str, value: bytes) -> int:
        raise BusError("kv.unavailable", "the bucket is failing over")

    policy.standing.create = unavailable  # type: ignore[method-assign]
    with pytest.raises(BusError, match="kv.unavailable"):
        await policy.handle(verdict)
    policy.standing.create = create  # type: ignore[method-assign]
    await policy.handle(verdict)
    assert "n1" in policy.standing.snapshot()
    first = await asyncio.wait_for(decided.get(), 5)
    assert first.allow and first.evidence_id == verdict.evidence_id


async def test_a_node_pinned_to_this_hardware_reads_its_pin_while_spending_the_nonce(
    policy: _Policy,
) -> None:
    """Once this replica has seen the node's pin name the evidence's hardware, the pin read
    (which still decides) and the write that spends the nonce go out together."""
    await policy.handle(await policy.verdict("n1"))
    verdict = await policy.verdict("n1")
    spending = asyncio.Event()
    nonce_create, pin_get = policy.nonces.create, policy.pins.get

    async def create(key: str, value: bytes) -> int:
        spending.set()
        return await nonce_create(key, value)

    async def get(key: str) -> tuple[bytes, int] | None:
        await asyncio.wait_for(spending.wait(), 2.0)  # one after the other never gets here
        return await pin_get(key)

    policy.nonces.create = create  # type: ignore[method-assign]
    policy.pins.get = get  # type: ignore[method-assign]
    await policy.handle(verdict)
    assert policy.used_by() == verdict.id


async def test_evidence_from_other_hardware_leaves_the_nonce_unspent(policy: _Policy) -> None:
    await policy.handle(await policy.verdict("n1", hwid="snp.chip_id:aa"))
    for hwid in ("snp.chip_id:bb", ""):
        verdict = await policy.verdict("n1", hwid=hwid)
        with pytest.raises(Rejected, match="node.identity_mismatch"):
            await policy.handle(verdict)
        assert policy.used_by() is None


async def test_a_pin_reset_and_taken_meanwhile_is_still_enforced(policy: _Policy, bus: Bus) -> None:
    """What the replica remembers only schedules the read: the node re-pinned to other
    hardware by then refuses the old hardware's evidence, and nothing is allowed on it."""
    decided = await _decisions(bus, "n1")
    await policy.handle(await policy.verdict("n1", hwid="snp.chip_id:aa"))
    assert (await asyncio.wait_for(decided.get(), 5)).allow
    operator = PinStore(policy.pins)  # as `attestmesh node reset` and the new hardware would
    await operator.reset("n1")
    await operator.pin("n1", "snp.chip_id:bb")
    with pytest.raises(Rejected, match="node.identity_mismatch"):
        await policy.handle(await policy.verdict("n1", hwid="snp.chip_id:aa"))
    refusal = await asyncio.wait_for(decided.get(), 5)
    assert refusal.refused and not refusal.allow
    assert decided.empty()


async def test_what_a_pin_store_remembers_follows_its_reads_and_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kv = CountingKeyValue()
    mine, operator = PinStore(kv), PinStore(kv)
    assert not mine.expects("n1", "a")
    await mine.pin("n1", "a")
    assert mine.expects("n1", "a") and not mine.expects("n1", "b") and not mine.expects("n1", "")
    await operator.reset("n1")
    await operator.pin("n1", "b")
    assert mine.expects("n1", "a")  # only a hint until the next read
    with pytest.raises(Rejected, match="node.identity_mismatch"):
        await mine.check("n1", "a")
    assert mine.expects("n1", "b")
    await mine.reset("n1")
    assert not mine.expects("n1", "b")
    monkeypatch.setattr(pins, "MAX_REMEMBERED", 2)
    for node in ("n2", "n3", "n4"):
        await mine.pin(node, "a")
    assert list(mine._seen) == ["n3", "n4"]
