"""An in-process mesh for integration tests: the real services on a real nats-server.

Each service gets its own NATS connection and runs as an asyncio task, so a test can stop and
restart one of them (or the server) mid-flow and watch what survives.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from services.broker.audit import AuditLog
from services.broker.sealing import KeyFileSource
from services.broker.service import BrokerService
from services.broker.store import SecretStore, load_keyring
from services.collector.service import DEFAULT_RESOURCE, CollectorNode
from services.collector.simulator.node import TestPki, simulated_source, test_pki
from services.mesh import events, subjects
from services.mesh.bus import Bus
from services.mesh.identities import ADMIN
from services.mesh.keys import SigningKey, TrustedKeys
from services.mesh.natskv import NatsKeyValue
from services.mesh.server import NatsServer
from services.policy import refvalues, release_policy
from services.policy.documents import OPERATOR
from services.policy.engine import RESOURCE, default_policy, default_resource_policy
from services.policy.release_policy import POLICY_KEY, RESOURCE_KEY
from services.policy.service import PolicyService
from services.verifier import registry
from services.verifier.collateral import CollateralCache
from services.verifier.trust import TrustStore
from services.verifier.worker import VerifierWorker


class _Running:
    def __init__(self, bus: Bus, stop: asyncio.Event, task: asyncio.Task[None]) -> None:
        self.bus, self.stop, self.task = bus, stop, task

    async def halt(self) -> None:
        self.stop.set()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self.task, 10)
        await self.bus.close()


class TestMesh:
    """Verifier (snp), policy and broker as tasks; ``node()`` builds simulated collectors."""

    __test__ = False

    def __init__(
        self,
        server: NatsServer,
        workdir: Path,
        *,
        settings: dict[str, bool] | None = None,
        decision_ttl: float = 300.0,
        verdict_ttl: float = 300.0,
        pinning: bool = True,
        seeds: dict[str, str] | None = None,
    ) -> None:
        self.server = server
        self.verdict_ttl = verdict_ttl
        self.pinning = pinning
        self.seeds = seeds or {}
        """identity -> nkey seed file, for a server that requires authentication."""
        self.workdir = workdir
        self.keys_dir = workdir / "keys"
        self.pki: TestPki = test_pki(workdir / "test-pki")
        self.settings = settings if settings is not None else {"allow_simulated": True}
        self.decision_ttl = decision_ttl
        self.verifier_key = SigningKey.load_or_create("verifier-snp", self.keys_dir)
        self.verifier_key.publish_to(self.keys_dir / "trusted")
        self.policy_key = SigningKey.load_or_create("policy", self.keys_dir)
        self.policy_key.publish_to(self.keys_dir / "trusted")
        self.broker_key = SigningKey.load_or_create("broker", self.keys_dir)
        self.broker_key.publish_to(self.keys_dir / "trusted")
        self.broker_options: dict[str, Any] = {}
        self.operator_key = SigningKey.load_or_create(OPERATOR, self.keys_dir)
        self.operator_key.publish_to(self.keys_dir / "trusted")
        self.running: dict[str, _Running] = {}
        self.broker: BrokerService | None = None
        self.policy: PolicyService | None = None
        """The running policy service (tests read what it refused and why)."""
        self.secret = os.urandom(32)

    @property
    def trusted(self) -> TrustedKeys:
        return TrustedKeys.load(self.keys_dir / "trusted")

    async def _launch(
        self,
        name: str,
        build: Callable[[Bus], Awaitable[Callable[[asyncio.Event], Coroutine[Any, Any, None]]]],
    ) -> None:
        bus = await Bus.connect(self.server.url, name, nkey_seed_file=self.seeds.get(name))
        await bus.setup(nonce_ttl=60.0)
        run = await build(bus)
        stop = asyncio.Event()
        self.running[name] = _Running(bus, stop, asyncio.create_task(run(stop)))

    async def start_verifier(self) -> None:
        async def build(bus: Bus) -> Callable[[asyncio.Event], Coroutine[Any, Any, None]]:
            trust = TrustStore.load(self.workdir / "no-vendor-roots", test_dir=self.pki.roots_dir)
            worker = VerifierWorker(
                bus,
                "snp",
                registry.get("snp"),
                self.verifier_key,
                trust,
                planner=registry.planner("snp", {}),
                fetched=CollateralCache(
                    NatsKeyValue(await bus.key_value(subjects.BUCKET_COLLATERAL)), offline=True
                ),
                reappraise=True,
                verdict_ttl=self.verdict_ttl,
            )
            return lambda stop: worker.run(stop, max_deliver=3, ack_wait=5.0)

        await self._launch("verifier-snp", build)

    @contextlib.asynccontextmanager
    async def _operator(self, bus: Bus) -> AsyncIterator[Bus]:
        """``bus``, or on a server that requires identities the admin's own connection, as
        an operator would write."""
        if ADMIN not in self.seeds:
            yield bus
            return
        admin = await Bus.connect(self.server.url, ADMIN, nkey_seed_file=self.seeds[ADMIN])
        try:
            yield admin
        finally:
            await admin.close()

    async def seed_policy(self, bus: Bus) -> None:
        """The packaged policy and snp's explicit (empty) reference values, operator-signed,
        unless already stored (the operator's step before a policy service can decide
        anything; the policy denies a family with no reference values)."""
        async with self._operator(bus) as writer:
            kv = NatsKeyValue(await writer.key_value(subjects.BUCKET_POLICIES))
            if await kv.get(POLICY_KEY) is None:
                await release_policy.store(kv, default_policy(), operator=self.operator_key)
            refs = NatsKeyValue(await writer.key_value(subjects.BUCKET_REFVALUES))
            if await refs.get("snp") is None:  # release on status alone, explicitly
                await refvalues.store(refs, "snp", {}, operator=self.operator_key)

    async def seed_resource_policy(self, bus: Bus) -> None:
        """The packaged resource policy, operator-signed, unless one is stored (without it
        the broker releases nothing)."""
        async with self._operator(bus) as writer:
            kv = NatsKeyValue(await writer.key_value(subjects.BUCKET_POLICIES))
            if await kv.get(RESOURCE_KEY) is None:
                await release_policy.store(
                    kv, default_resource_policy(), operator=self.operator_key, kind=RESOURCE
                )

    async def start_policy(self, *, seed: bool = True) -> None:
        async def build(bus: Bus) -> Callable[[asyncio.Event], Coroutine[Any, Any, None]]:
            if seed:
                await self.seed_policy(bus)
            service = PolicyService(
                bus,
                self.policy_key,
                self.trusted,
                settings=self.settings,
                decision_ttl=self.decision_ttl,
                pinning=self.pinning,
            )
            self.policy = service
            await service.start()
            return lambda stop: service.run(stop, max_deliver=3, ack_wait=5.0)

        await self._launch("policy", build)

    async def start_broker(self, *, seed: bool = True) -> None:
        async def build(bus: Bus) -> Callable[[asyncio.Event], Coroutine[Any, Any, None]]:
            if seed:
                await self.seed_resource_policy(bus)
            service = BrokerService(
                bus,
                self.trusted,
                KeyFileSource.in_data_dir(self.workdir),
                signer=self.broker_key,
                **self.broker_options,
            )
            await service.start(seed={DEFAULT_RESOURCE: self.secret})
            self.broker = service
            return lambda stop: service.run(stop, max_deliver=3, ack_wait=5.0)

        await self._launch("broker", build)

    async def start(self) -> None:
        await self.start_verifier()
        await self.start_policy()
        await self.start_broker()

    async def halt(self, name: str) -> None:
        await self.running.pop(name).halt()

    async def stop(self) -> None:
        """Halt every service at once: each finishes its in-flight work and its last pull
        (up to a second), so halting them one after another only added those up."""
        await asyncio.gather(*(self.halt(name) for name in list(self.running)))

    async def audit_log(self, bus: Bus) -> AuditLog:
        """A reader of the broker's audit log (its own connection's view of the bucket)."""
        kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
        data_key = await load_keyring(kv, KeyFileSource.in_data_dir(self.workdir))
        return AuditLog(kv, data_key, trusted=self.trusted)

    async def stored_secret(self, bus: Bus, resource: str = DEFAULT_RESOURCE) -> bytes:
        kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
        store = await SecretStore.open(kv, KeyFileSource.in_data_dir(self.workdir))
        return await store.get(resource)

    def node(
        self,
        bus: Bus,
        name: str,
        *,
        tamper: Callable[[events.SnpEvidence], events.SnpEvidence] | None = None,
        received: dict[str, bytes] | None = None,
        decision_timeout: float = 20.0,
        resource: str = DEFAULT_RESOURCE,
    ) -> CollectorNode:
        source = simulated_source("snp", self.pki, seed=hash(name) & 0xFFFF)
        if tamper is not None:
            source = _Tampering(source, tamper)

        def keep(resource: str, secret: bytes) -> None:
            if received is not None:
                received[name] = secret

        def forget(reason: str) -> None:
            if received is not None:
                received.pop(name, None)

        return CollectorNode(
            bus,
            name,
            source,
            self.collector_trust(),
            decision_timeout=decision_timeout,
            on_secret=keep,
            on_revoked=forget,
            resource=resource,
        )

    def collector_trust(self) -> TrustedKeys:
        """What enrollment hands a node: the policy service's public key, nothing else."""
        return TrustedKeys.from_pem("policy", self.policy_key.public_pem())


class _Tampering:
    """Wraps a simulated source and alters its evidence after signing."""

    def __init__(
        self, inner: object, tamper: Callable[[events.SnpEvidence], events.SnpEvidence]
    ) -> None:
        self.inner = inner
        self.tamper = tamper
        self.family = "snp"
        self.simulated = True

    def collect(self, report_data: bytes) -> events.Evidence:
        evidence = self.inner.collect(report_data)  # type: ignore[attr-defined]
        assert isinstance(evidence, events.SnpEvidence)
        return self.tamper(evidence)


async def ask_again(bus: Bus, node: CollectorNode) -> events.SecretResponse:
    """Request the node's secret again under its last decision (as a replayer would)."""
    return await bus.request(
        subjects.secret(node.node),
        events.SecretRequest(
            node=node.node,
            resource=DEFAULT_RESOURCE,
            public_key=node.last_public_key,
            decision_id=node.last_decision_id,
            evidence_id=node.last_evidence_id,
        ),
        events.SecretResponse,
    )
