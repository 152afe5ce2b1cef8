"""``attestmesh up``: the whole mesh on one machine, for trying it out and for demos.

It starts the real ``nats-server`` (unless ``--nats`` names one), runs the verifier, policy
and broker each as its own OS process, and drives N simulated TEE nodes in this process.
The simulated nodes sign with the project's test PKI, which only this deployment trusts (via
``test_roots_dir``), and the release policy accepts them only because ``allow_simulated`` is
set here. The service processes are supervised (:mod:`services.supervisor`): one that dies is
restarted, never a reason for ``up`` to exit; ``--replicas`` runs several of each. Ctrl-C (or
the end of ``--rounds``) stops everything and prints the summary (:mod:`services.roundwatch`);
every child, the nats-server(s) included, also gets SIGTERM from the kernel if this process
dies in any other way (:mod:`services.mesh.childproc`), so nothing is left behind.

The embedded server admits only the identities of :mod:`services.mesh.identities`: each
service process, each simulated node (its own connection, its own key) and the operator
(``admin``) sign in with an nkey seed from ``<data-dir>/identities/``; anonymous connections
are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import msgspec
import nats.errors
import nats.js.errors

from services.broker.sealing import KeyFileSource
from services.broker.store import SecretStore
from services.collector.service import DEFAULT_RESOURCE, CollectorNode, RoundResult
from services.collector.simulator.node import simulated_source, test_pki
from services.mesh import authconf, identities, metrics, subjects, telemetry
from services.mesh import config as config_mod
from services.mesh.bus import Bus
from services.mesh.cluster import LocalCluster, replicas_for
from services.mesh.config import Config
from services.mesh.errors import BusError, PolicyError
from services.mesh.keys import SigningKey, TrustedKeys
from services.mesh.natskv import NatsKeyValue
from services.mesh.ports import free_port, port_free
from services.mesh.server import NatsServer
from services.policy import documents, refvalues, release_policy
from services.policy.documents import OPERATOR
from services.policy.engine import KINDS, packaged
from services.roundwatch import StageWatch, Summary
from services.supervisor import ChildSpec, Failure, Supervisor

FAMILIES = ("snp", "nitro", "tpm")
_DECIDED_BY_UP = frozenset(
    {"ATTESTMESH_NATS_URL", "ATTESTMESH_DATA_DIR", "ATTESTMESH_NATS_NKEY_SEED_FILE"}
)
UP_ACK_WAIT_S = 10.0
"""How long a service may hold a message before JetStream hands it to another process: short
enough that work held by a killed process is redone well inside a node's 30 s decision
timeout, long enough for a simulated appraisal on a busy machine."""
STOP_GRACE_S = 5.0


def service_commands(
    replicas: int = 1, replicated: frozenset[str] | None = None
) -> dict[str, list[str]]:
    """Each service process to run (name -> ``attestmesh`` arguments); replica ``i > 1`` of
    a service is named ``<service>-<i>`` and shares the service's identity and consumers.
    ``replicated`` limits the replicas to those services (the bench scales one verifier)."""
    base = {f"verifier-{f}": ["verifier", "--family", f] for f in FAMILIES}
    base["policy"] = ["policy"]
    base["broker"] = ["broker"]
    commands: dict[str, list[str]] = {}
    for name, args in base.items():
        count = replicas if replicated is None or name in replicated else 1
        for i in range(1, count + 1):
            commands[name if i == 1 else f"{name}-{i}"] = args
    return commands


def identity_of(child: str) -> str:
    """The NATS identity (seed) of a service process: its replicas share it."""
    head, _, tail = child.rpartition("-")
    return head if head and tail.isdigit() else child


class Mesh:
    """The supervised child processes of one ``up``: each service ``replicas`` times."""

    def __init__(
        self,
        config: Config,
        config_path: Path,
        log_dir: Path,
        seeds: dict[str, Path] | None = None,
        *,
        replicas: int = 1,
        replicated: frozenset[str] | None = None,
        pids_file: Path | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.log_dir = log_dir
        self.seeds = seeds or {}
        self.replicas = replicas
        self.replicated = replicated
        self.pids_file = pids_file
        self.metrics_ports: dict[str, int] = {}
        self.supervisor: Supervisor | None = None
        self.servers: list[NatsServer] = []
        """The embedded nats-server(s) ``up`` runs, watched and restarted like the services."""
        self.server_restarts: Counter[str] = Counter()

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        specs = []
        for name, args in service_commands(self.replicas, self.replicated).items():
            # The environment outranks config.json: what `up` decided there (server, data
            # dir, identity) must not be overridden by the operator's shell.
            env = {k: v for k, v in os.environ.items() if k not in _DECIDED_BY_UP}
            seed = self.seeds.get(identity_of(name))
            if seed is not None:
                env["ATTESTMESH_NATS_NKEY_SEED_FILE"] = str(seed)
            if name not in self.metrics_ports:
                self.metrics_ports[name] = free_port(avoid=set(self.metrics_ports.values()))
            env["ATTESTMESH_METRICS_PORT"] = str(self.metrics_ports[name])
            argv = [sys.executable, "-m", "services.cli", *args, "--config", str(self.config_path)]
            specs.append(ChildSpec(name, argv, env, self.log_dir / f"{name}.log"))
        self.supervisor = Supervisor(
            specs, pids_file=self.pids_file, on_failure=_report, prepare=self._fresh_port
        )
        self.supervisor.start()

    def _fresh_port(self, spec: ChildSpec) -> ChildSpec:
        """Keep a child's metrics port unless someone else bound it meanwhile; then give it
        a new one and rewrite ``metrics.json``, rather than restart it into the same error."""
        port = int(spec.env["ATTESTMESH_METRICS_PORT"])
        if port_free(port):
            return spec
        port = self.metrics_ports[spec.name] = free_port(avoid=set(self.metrics_ports.values()))
        write_metrics_map(Path(self.config.data_dir), self.metrics_ports)
        return dataclasses.replace(spec, env={**spec.env, "ATTESTMESH_METRICS_PORT": str(port)})

    async def supervise(self, stop: asyncio.Event) -> None:
        watching = [self._watch_servers(stop)]
        if self.supervisor is not None:
            watching.append(self.supervisor.run(stop))
        await asyncio.gather(*watching)

    async def _watch_servers(self, stop: asyncio.Event) -> None:
        """Restart an embedded nats-server that died: on its old ports and store, so clients
        reconnect and a cluster member rejoins its peers and catches up."""
        delays: dict[str, float] = {}
        while not stop.is_set():
            for server in self.servers:
                if server.running or stop.is_set():
                    continue
                name = server_name(server)
                delay = delays.get(name, 0.0)
                if delay:  # failed to start last time: back off, as for the services
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    if stop.is_set():
                        return
                print(f"attestmesh up: {name} exited; restarting", file=sys.stderr, flush=True)
                metrics.service_restarts.add(1, {"service": name, "reason": "exit"})
                try:
                    await asyncio.to_thread(server.start)
                except BusError as exc:
                    print(f"attestmesh up: {name} did not restart ({exc.reason})", file=sys.stderr)
                    delays[name] = min(max(delay * 2, 0.5), 30.0)
                    continue
                delays.pop(name, None)
                self.server_restarts[name] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    def stop(self, timeout: float = 10.0) -> None:
        if self.supervisor is not None:
            self.supervisor.stop(timeout)


def _report(failure: Failure) -> None:
    """A dead service is news, not an error: say so, count it, and let the supervisor restart it."""
    metrics.service_restarts.add(1, {"service": failure.name, "reason": failure.reason})
    print(
        f"attestmesh up: {failure.name} exited ({failure.reason}); "
        f"restarting in {failure.restart_in:.1f} s",
        file=sys.stderr,
        flush=True,
    )


def write_metrics_map(data_dir: Path, ports: dict[str, int]) -> Path:
    """``<data-dir>/metrics.json``: each process's Prometheus scrape URL, for a scrape config."""
    path = data_dir / "metrics.json"
    urls = {name: f"http://127.0.0.1:{port}/metrics" for name, port in sorted(ports.items())}
    path.write_text(json.dumps(urls, indent=2) + "\n")
    return path


def server_name(server: NatsServer) -> str:
    return f"nats-{server.cluster.server_name}" if server.cluster else "nats-server"


def prepare(data_dir: Path, nats_url: str, *, jetstream_replicas: int = 1) -> tuple[Config, Path]:
    """Keys, test PKI and the shared config file for a simulated deployment.

    The operator key is made here too: on one machine ``up`` is the operator, and it signs
    the default policy with it (:func:`seed_policy`). The policy service only ever gets the
    public half in ``trusted/``; it never signs what it enforces.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    keys_dir = data_dir / "keys"
    for name in [*(f"verifier-{f}" for f in FAMILIES), "policy", "broker", OPERATOR]:
        SigningKey.load_or_create(name, keys_dir).publish_to(keys_dir / "trusted")
    pki = test_pki(data_dir / "test-pki")
    config = config_mod.load(
        None,
        nats_url=nats_url,
        data_dir=str(data_dir),
        keys_dir=str(keys_dir),
        test_roots_dir=str(pki.roots_dir),
        allow_simulated=True,
        offline=True,
        nonce_ttl_s=120.0,
        decision_ttl_s=300.0,
        ack_wait_s=UP_ACK_WAIT_S,
        jetstream_replicas=jetstream_replicas,
    )
    path = data_dir / "config.json"
    config_mod.save(config, path)
    return config, path


def node_names(nodes: int) -> list[tuple[str, str]]:
    """(node name, family) of each simulated node; the families alternate."""
    return [
        (f"{FAMILIES[i % len(FAMILIES)]}-{i + 1}", FAMILIES[i % len(FAMILIES)])
        for i in range(nodes)
    ]


def provision_identities(data_dir: Path, nodes: int) -> dict[str, Path]:
    """Seeds for every service, the operator and each simulated node (identity -> file),
    and the server configuration admitting exactly those identities."""
    directory = authconf.identities_dir(data_dir)
    names = [
        *identities.service_identities(FAMILIES),
        identities.ADMIN,
        *(identities.node_identity(n) for n, _ in node_names(nodes)),
    ]
    seeds = {name: authconf.ensure(directory, name) for name in names}
    authconf.write_server_config(authconf.server_config_path(data_dir), directory)
    return seeds


def as_identity(config: Config, seed: Path | None) -> Config:
    return msgspec.structs.replace(config, nats_nkey_seed_file=str(seed) if seed else None)


async def seed_secret(config: Config, resource: str) -> None:
    """Create the demo secret (random, sealed) unless it already exists: as the broker,
    before any broker runs (the operator may change secrets only through a broker)."""
    async with Bus.session(config, identities.BROKER) as bus:
        kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
        sealing = KeyFileSource.in_data_dir(Path(config.data_dir), create=True)
        store = await SecretStore.open(kv, sealing)
        if resource not in await store.list():
            await store.put(resource, os.urandom(32))


async def seed_policy(config: Config) -> None:
    """Store the packaged release policy and resource policy signed by the operator key,
    each unless a document that key (or a rotated one) signed is already there. An entry
    that verifies under no operator key, e.g. an unsigned policy left by an older version,
    is replaced."""
    operator = SigningKey.load(OPERATOR, config.keys_path / f"{OPERATOR}.key")
    trusted = TrustedKeys.load(config.trusted_keys_path)
    async with Bus.session(config, identities.ADMIN) as bus:
        kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_POLICIES))
        for kind in KINDS:
            current = await kv.get(kind.key)
            if current is not None:
                try:
                    documents.open_signed(
                        current[0],
                        trusted,
                        bucket=subjects.BUCKET_POLICIES,
                        key=kind.key,
                        kind=kind.reason,
                    )
                    continue
                except PolicyError:
                    pass
            await release_policy.store(kv, packaged(kind), operator=operator, kind=kind)


async def seed_refvalues(config: Config) -> None:
    """Each simulated family's reference values, operator-signed, unless some are stored.

    The demo releases on status alone, which the packaged policy allows only where the
    operator says so for the family: an explicitly signed empty document (a family with no
    document at all is denied, so a purged one never reads as "anything goes")."""
    operator = SigningKey.load(OPERATOR, config.keys_path / f"{OPERATOR}.key")
    async with Bus.session(config, identities.ADMIN) as bus:
        kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_REFVALUES))
        for family in FAMILIES:
            if await kv.get(family) is None:
                await refvalues.store(kv, family, {}, operator=operator)


def _line(result: RoundResult) -> str:
    outcome = "secret released" if result.released else f"denied {result.reason}".strip()
    return f"{result.node:<10} {result.status:<16} {outcome:<28} {result.latency_ms:8.1f} ms"


async def wait_until_ready(bus: Bus, mesh: Mesh, timeout: float = 60.0) -> None:
    """Wait for every service's durable consumer, so the first round measures the mesh and
    not the services' start-up (nothing would be lost without this: streams keep the work).
    A service that dies meanwhile is restarted by the supervisor; only the deadline ends it."""
    durables = [(subjects.STREAM_EVIDENCE, f"verifier-{f}") for f in FAMILIES]
    durables += [(subjects.STREAM_VERDICTS, "policy"), (subjects.STREAM_DECISIONS, "broker")]
    deadline = asyncio.get_running_loop().time() + timeout
    for stream, durable in durables:
        while True:
            try:
                await bus.js.consumer_info(stream, durable)
                break
            except (nats.js.errors.NotFoundError, nats.errors.TimeoutError):
                if asyncio.get_running_loop().time() > deadline:
                    exits = mesh.supervisor.failures if mesh.supervisor else {}
                    raise RuntimeError(
                        f"{durable} did not start in {timeout:.0f} s "
                        f"(service exits so far: {dict(exits) or 'none'}; see {mesh.log_dir})"
                    ) from None
                await asyncio.sleep(0.1)


async def connect_nodes(
    stack: contextlib.AsyncExitStack[bool | None],
    config: Config,
    seeds: dict[str, Path],
    nodes: list[tuple[str, str]],
) -> list[CollectorNode]:
    """Simulated nodes ((name, family) each), each on its own connection as its own
    identity, with a reply inbox only it may read; closed with ``stack``."""
    pki = test_pki(Path(config.data_dir) / "test-pki")
    trusted = config.policy_trust()
    collectors = []
    for i, (name, family) in enumerate(nodes):
        identity = identities.node_identity(name)
        node_bus = await stack.enter_async_context(
            Bus.session(
                as_identity(config, seeds.get(identity)),
                identity,
                declare=False,
                inbox_prefix=subjects.node_inbox(name),
            )
        )
        source = simulated_source(family, pki, seed=i)
        collectors.append(CollectorNode(node_bus, name, source, trusted))
    return collectors


async def drive(
    config: Config,
    *,
    nodes: int,
    rounds: int | None,
    interval: float,
    quiet: bool,
    stop: asyncio.Event,
    mesh: Mesh,
    seeds: dict[str, Path] | None = None,
) -> Summary:
    """Run the simulated nodes, each on its own connection as its own identity, while the
    supervisor keeps the services running; a failed round is reported, never raised."""
    seeds = seeds or {}
    summary = Summary(nodes=nodes)
    results: asyncio.Queue[RoundResult] = asyncio.Queue()
    watch = StageWatch(trusted=config.policy_trust())
    supervising = asyncio.Event()
    supervisor = asyncio.create_task(mesh.supervise(supervising))
    tasks: list[asyncio.Task[None]] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            admin = as_identity(config, seeds.get(identities.ADMIN))
            bus = await stack.enter_async_context(
                Bus.session(admin, identities.ADMIN, declare=False)
            )
            await wait_until_ready(bus, mesh)
            await watch.start(bus)
            collectors = await connect_nodes(stack, config, seeds, node_names(nodes))
            tasks = [
                asyncio.create_task(c.run(stop, interval=interval, rounds=rounds, results=results))
                for c in collectors
            ]
            expected = None if rounds is None else rounds * nodes
            while expected is None or len(summary.results) < expected:
                try:
                    result = await asyncio.wait_for(results.get(), 1.0)
                except TimeoutError:
                    if stop.is_set():
                        break
                    continue
                result = watch.attribute(result)
                summary.results.append(result)
                if not quiet:
                    print(_line(result), flush=True)
            stop.set()
            await _finish(tasks)
            if watch.unanswered(summary.results):
                await asyncio.sleep(STOP_GRACE_S / 2)  # a late decision may still be on its way
            summary.lost = len(watch.unanswered(summary.results))
            summary.duplicated = watch.duplicated(summary.results)
            summary.revoked = watch.revoked(summary.results)
            summary.late_decisions = watch.late(summary.results)
    finally:
        await _finish(tasks)
        supervising.set()
        await supervisor
        if mesh.supervisor is not None:
            summary.restarts = dict(mesh.supervisor.restarts)
            summary.service_exits = dict(mesh.supervisor.failures)
        summary.restarts.update(mesh.server_restarts)
    return summary


async def _finish(tasks: list[asyncio.Task[None]]) -> None:
    """Let rounds in flight end for a moment, then cancel them (Ctrl-C must not wait for a
    30 s decision timeout); a cancelled round is not counted."""
    pending = [t for t in tasks if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=STOP_GRACE_S)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def up(
    *,
    nodes: int,
    rounds: int | None,
    as_json: bool,
    data_dir: Path,
    nats_url: str | None,
    interval: float = 5.0,
    replicas: int = 1,
    cluster: int = 1,
) -> int:
    """Run the mesh until Ctrl-C (or ``rounds`` per node); the last line printed is the
    summary, one JSON object. Exit code 1 only if the mesh never came up or ``rounds`` were
    not all completed; a service dying on the way is restarted, not fatal."""
    seeds: dict[str, Path] = {}
    servers: list[NatsServer] = []
    if not nats_url:
        seeds = provision_identities(data_dir, nodes)
        auth = authconf.server_config_path(data_dir)
        if cluster > 1:
            local = LocalCluster(data_dir / "nats-cluster", size=cluster, config_file=auth)
            local.start()
            servers, nats_url = local.servers, local.url
        else:
            single = NatsServer(authconf.server_store_dir(data_dir), config_file=auth)
            single.start()
            servers, nats_url = [single], single.url
    try:
        config, config_path = prepare(data_dir, nats_url, jetstream_replicas=replicas_for(cluster))
        up_port = telemetry.configure(
            "up",
            level="warning",
            otlp_endpoint=config.otlp_endpoint,
            stream=open(os.devnull, "w"),  # noqa: SIM115
            metrics_port=0,
        )
    except BaseException:  # the servers must not outlive a failed start
        for server in servers:
            server.stop()
        raise
    mesh = Mesh(
        config,
        config_path,
        data_dir / "logs",
        seeds,
        replicas=replicas,
        pids_file=data_dir / "pids.json",
    )
    mesh.servers = servers
    if up_port is not None:
        mesh.metrics_ports["up-nodes"] = up_port
    quiet = as_json
    summary = Summary(nodes=nodes)
    code = 0
    try:
        admin = as_identity(config, seeds.get(identities.ADMIN))
        broker = as_identity(config, seeds.get(identities.BROKER))
        asyncio.run(seed_secret(broker, DEFAULT_RESOURCE))
        asyncio.run(seed_policy(admin))
        asyncio.run(seed_refvalues(admin))
        mesh.start()
        write_metrics_map(data_dir, mesh.metrics_ports)
        if not quiet:
            print(
                f"attestmesh up: NATS at {nats_url} (JetStream R{config.jetstream_replicas}), "
                f"{nodes} simulated node(s), "
                f"{replicas} process(es) per service, logs in {mesh.log_dir}; Ctrl-C stops",
                flush=True,
            )

        async def main() -> Summary:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            return await drive(
                config,
                nodes=nodes,
                rounds=rounds,
                interval=interval,
                quiet=quiet,
                stop=stop,
                mesh=mesh,
                seeds=seeds,
            )

        summary = asyncio.run(main())
    except RuntimeError as exc:
        print(f"attestmesh up: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:  # Ctrl-C before the nodes' loop took over the signal
        code = 130
    finally:
        telemetry.shutdown()
        mesh.stop()
        for server in servers:
            server.stop()
    if rounds is not None and len(summary.results) < rounds * nodes:
        code = 1
    print(json.dumps(summary.to_json()), flush=True)
    return code
