"""Service entry points: build one service from a :class:`Config` and run it until stopped.

Each function is what ``attestmesh <service>`` runs in its own process (and what Kubernetes
runs per pod); they hold no logic of their own beyond wiring.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from services.broker import keysources
from services.broker.service import BrokerService
from services.mesh import memtrace, metrics, subjects, telemetry
from services.mesh.bus import Bus
from services.mesh.config import Config
from services.mesh.health import Heartbeat
from services.mesh.keys import SigningKey, TrustedKeys
from services.mesh.natskv import NatsKeyValue
from services.policy.service import PolicyService
from services.verifier import registry
from services.verifier.collateral import CollateralCache
from services.verifier.trust import TrustStore, default_roots_dir
from services.verifier.worker import VerifierWorker

log = telemetry.logger("app")


def load_collateral(directory: str | None) -> dict[str, bytes]:
    """Collateral files given to every verification (``vcek.der``, ``tcb_info.json``...)."""
    if not directory:
        return {}
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


def trust_store(config: Config) -> TrustStore:
    roots = Path(config.roots_dir) if config.roots_dir else default_roots_dir()
    test = Path(config.test_roots_dir) if config.test_roots_dir else None
    return TrustStore.load(roots, test_dir=test)


async def alongside(
    config: Config,
    bus: Bus,
    stop: asyncio.Event,
    work: Coroutine[Any, Any, None],
    consumers: list[tuple[str, str]] | None = None,
) -> None:
    """Run ``work`` with the service's heartbeat (when a health file is set) and, when metrics
    are exported, a poller of its durable ``consumers``' lag beside it."""
    tasks: list[Coroutine[Any, Any, None]] = [work]
    if config.health_file is not None:
        tasks.append(Heartbeat(Path(config.health_file), bus).run(stop))
    if consumers and telemetry.metrics_enabled():
        tasks.append(metrics.ConsumerLag(consumers).run(bus.js, stop))
    await asyncio.gather(*tasks)


async def verifier(config: Config, family: str, stop: asyncio.Event) -> None:
    family_verifier = registry.get(family, config.appraisal.get(family))
    async with Bus.session(config, f"verifier-{family}") as bus:
        worker = VerifierWorker(
            bus,
            family,
            family_verifier,
            SigningKey.load_or_create(f"verifier-{family}", config.keys_path),
            trust_store(config),
            collateral=load_collateral(config.collateral_dir),
            verdict_ttl=config.verdict_ttl_s,
            offline=config.offline,
            planner=registry.planner(family, config.vendor_urls),
            fetched=CollateralCache(
                NatsKeyValue(await bus.key_value(subjects.BUCKET_COLLATERAL)),
                offline=config.offline,
            ),
            reappraise=True,
        )
        log.info("verifier.started", family=family)
        run = worker.run(stop, max_deliver=config.max_deliver, ack_wait=config.ack_wait_s)
        lag = [(subjects.STREAM_EVIDENCE, f"verifier-{family}")]
        await alongside(config, bus, stop, run, lag)


async def policy(config: Config, stop: asyncio.Event) -> None:
    async with Bus.session(config, "policy") as bus:
        service = PolicyService(
            bus,
            SigningKey.load_or_create("policy", config.keys_path),
            TrustedKeys.load(config.trusted_keys_path),
            settings={
                "allow_warning": config.allow_warning,
                "allow_simulated": config.allow_simulated,
            },
            nonce_ttl=config.nonce_ttl_s,
            decision_ttl=config.decision_ttl_s,
            pinning=config.pinning,
            max_backlog=config.max_backlog,
        )
        await service.start()
        log.info("policy.started", trusted=service.trusted.names())
        run = service.run(stop, max_deliver=config.max_deliver, ack_wait=config.ack_wait_s)
        await alongside(config, bus, stop, run, [(subjects.STREAM_VERDICTS, "policy")])


def broker_signer(config: Config) -> SigningKey | None:
    """The broker's checkpoint key, if provisioned (``keys_dir/broker.key``).

    It is not created here: its public half must reach whoever runs ``attestmesh audit
    verify``, so provisioning it is a deployment step (``attestmesh up`` does it). Without
    it the audit log is kept whole, never pruned.
    """
    if not (config.keys_path / "broker.key").exists():
        log.warning("audit.no_checkpoint_key", detail="audit log will not be pruned")
        return None
    return SigningKey.load_or_create("broker", config.keys_path)


async def broker(
    config: Config, stop: asyncio.Event, environ: Mapping[str, str] | None = None
) -> None:
    """The broker, its sealing key from ``config.sealing_source`` (``environ``: where the
    ``env`` source looks, this process's environment unless given)."""
    sealing = keysources.from_config(config, os.environ if environ is None else environ)
    async with Bus.session(config, "broker") as bus:
        service = BrokerService(
            bus,
            TrustedKeys.load(config.trusted_keys_path),
            sealing,
            signer=broker_signer(config),
            max_records=config.audit_max_records,
            checkpoint_every=config.audit_checkpoint_every,
            maintenance_interval=config.audit_maintenance_interval_s,
        )
        await service.start()
        log.info("broker.started")
        run = service.run(stop, max_deliver=config.max_deliver, ack_wait=config.ack_wait_s)
        await alongside(config, bus, stop, run, [(subjects.STREAM_DECISIONS, "broker")])


def run(
    service: str, config: Config, main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]
) -> int:
    """Run ``main`` until SIGINT/SIGTERM, then shut down cleanly; return an exit code."""
    memtrace.install_from_env(service)
    telemetry.configure(
        service,
        level=config.log_level,
        otlp_endpoint=config.otlp_endpoint,
        metrics_port=config.metrics_port,
        metrics_host=config.metrics_host,
    )

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(main(stop))
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            stopper.cancel()
            task.result()
            return
        try:
            await asyncio.wait_for(task, 10.0)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    try:
        asyncio.run(runner())
    finally:
        telemetry.shutdown()
    return 0
