"""The ``attestmesh`` command (contract: README, DESIGN.md §6).

Exit codes: 0 success (for ``verify``: affirming or warning), 1 contraindicated or a failed
run, 2 usage, configuration or I/O error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from services import (
    __version__,
    admincli,
    policycli,
    recoverycli,
    refvaluescli,
    sealingopts,
    secretcli,
)
from services.mesh import config as config_mod
from services.mesh import identities, subjects
from services.mesh.boundedfile import read_bounded
from services.mesh.errors import AttestmeshError, CollateralError, ConfigError
from services.mesh.keys import TrustedKeys
from services.verifier import registry
from services.verifier.collateral import CollateralRequest
from services.verifier.families.base import Appraisal, Status, VerifyOptions, appraise_untrusted
from services.verifier.families.dcap.pcsfetch import DEFAULT_PCS
from services.verifier.families.snp.kds import DEFAULT_KDS

if TYPE_CHECKING:
    from services.verifier.trust import TrustStore

EXIT_OK = 0
EXIT_CONTRAINDICATED = 1
EXIT_USAGE = 2
MAX_EVIDENCE_BYTES = 1024 * 1024
MAX_COLLATERAL_FILES = 64


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attestmesh", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"attestmesh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole mesh locally with simulated TEE nodes")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--rounds", type=int, default=None)
    up.add_argument("--interval", type=float, default=5.0, help="seconds between re-attestations")
    up.add_argument("--json", action="store_true")
    up.add_argument("--data-dir", type=Path, default=Path(".attestmesh"))
    up.add_argument("--nats", default=None, help="use this NATS server instead of starting one")
    up.add_argument(
        "--replicas",
        type=_replicas,
        default=1,
        help="processes of each verifier, the policy service and the broker (default 1)",
    )
    up.add_argument(
        "--cluster",
        type=_cluster,
        default=1,
        help="nats-servers forming one JetStream cluster (3 or 5: streams at R3; default 1)",
    )

    verify = sub.add_parser("verify", help="verify one evidence file offline")
    verify.add_argument("evidence", type=Path)
    verify.add_argument("--family", required=True, choices=registry.families())
    verify.add_argument("--collateral", type=Path)
    verify.add_argument("--roots", type=Path)
    verify.add_argument("--test-roots", type=Path, help="also trust this test PKI (never default)")
    verify.add_argument("--at", help="verification time, RFC 3339 (default: now)")
    verify.add_argument("--nonce", help="hex; REPORT_DATA must equal it, zero-padded")
    verify.add_argument("--json", action="store_true")
    verify.add_argument("--offline", action="store_true", help="never fetch missing collateral")
    verify.add_argument("--kds", default=None, help="AMD KDS base URL (a mirror)")
    verify.add_argument("--pcs", default=None, help="Intel PCS or PCCS base URL")

    policycli.add_parser(sub)
    broker = sub.add_parser("broker", help="run the broker service")
    broker.add_argument("--config", type=Path)
    sealingopts.add_options(broker)
    verifier = sub.add_parser("verifier", help="run one family's verifier worker")
    verifier.add_argument("--family", required=True, choices=registry.families())
    verifier.add_argument("--config", type=Path)
    collector = sub.add_parser("collector", help="run a node's collector")
    collector.add_argument("--node", required=True)
    collector.add_argument("--family", default=None, choices=registry.families())
    collector.add_argument("--simulate", action="store_true", help="use a simulated TEE")
    collector.add_argument("--config", type=Path)

    health = sub.add_parser("health", help="exit 0 if a service's heartbeat file is fresh")
    health.add_argument("--file", type=Path, required=True)
    health.add_argument("--max-age", type=float, default=60.0)

    secretcli.add_parser(sub)

    coll = sub.add_parser("collateral", help="share vendor collateral with every verifier")
    coll.add_argument("action", choices=["import"])
    coll.add_argument("directory", type=Path, help="Intel PCS layout (tcb_info.json, ...)")
    admincli.add_target(coll)

    roots = sub.add_parser("roots", help="manage the trust directory")
    roots.add_argument("action", choices=["fetch"])
    roots.add_argument("--roots", type=Path, help="trust directory (default: user data dir)")
    roots.add_argument("--kds", default=None, help="AMD KDS base URL (a mirror)")

    audit = sub.add_parser("audit", help="verify or list the broker's release audit log")
    audit.add_argument("action", choices=["verify", "list"])
    audit.add_argument("--since", help="list: only records from this time on (RFC 3339)")
    audit.add_argument("--json", action="store_true")
    where = audit.add_mutually_exclusive_group()
    where.add_argument("--data-dir", type=Path, help="an `up` data directory (its config.json)")
    where.add_argument("--config", type=Path)
    audit.add_argument("--timeout", type=float, default=10.0, help="seconds to reach NATS")
    sealingopts.add_options(audit)

    refvaluescli.add_parser(sub)
    from bench import cli as benchcli

    benchcli.add_parser(sub)

    node = sub.add_parser("node", help="manage TEE nodes: NATS identities, hardware pins")
    node_sub = node.add_subparsers(dest="node_action", required=True)
    enroll = node_sub.add_parser("enroll", help="issue a node's credentials and admit it")
    enroll.add_argument("name", help="the node name (its subject token)")
    where = enroll.add_mutually_exclusive_group(required=True)
    where.add_argument("--data-dir", type=Path, help="the data directory of `attestmesh up`")
    where.add_argument("--config", type=Path, help="the mesh's config.json")
    enroll.add_argument("--out", type=Path, required=True, help="directory for the node's files")
    enroll.add_argument(
        "--replace", action="store_true", help="rotate the key of a node enrolled already"
    )
    reset = node_sub.add_parser("reset", help="clear a node's hardware pin (audited)")
    reset.add_argument("name", help="the node whose hardware pin to clear")
    where = reset.add_mutually_exclusive_group()
    where.add_argument("--data-dir", help="the broker's data directory (its sealing key)")
    where.add_argument("--config", type=Path)
    sealingopts.add_options(reset)
    recoverycli.add_parser(sub)
    return parser


def _parse_time(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError("cli.bad_time", f"--at {text!r} is not RFC 3339") from None
    if moment.tzinfo is None:
        raise ConfigError("cli.bad_time", "--at needs a time zone (e.g. Z)")
    return moment


def _read_bounded(path: Path) -> bytes:
    return read_bounded(path, MAX_EVIDENCE_BYTES)


def _directory(path: Path, name: str) -> Path:
    """``path`` if it is a directory; a usage error otherwise.

    A trust or collateral directory that is not there is a mistake in the command, not an
    empty set of anchors: read as empty, it would turn a typo into a contraindicated verdict
    (exit 1) that looks like a statement about the evidence.
    """
    try:
        if path.is_dir():
            return path
        exists = path.exists()
    except OSError as exc:
        raise ConfigError("cli.unreadable", f"{name} {path}: {exc.strerror}") from None
    problem = "is not a directory" if exists else "no such directory"
    raise ConfigError("cli.not_a_directory", f"{name} {path}: {problem}")


def _read_collateral(directory: Path) -> dict[str, bytes]:
    """Every regular file of ``directory`` by name, each and their number bounded."""
    try:
        files = [p for p in sorted(directory.iterdir()) if p.is_file()]
    except OSError as exc:
        raise ConfigError("cli.unreadable", f"--collateral {directory}: {exc.strerror}") from None
    if len(files) > MAX_COLLATERAL_FILES:
        raise ConfigError(
            "cli.too_large",
            f"--collateral {directory} holds more than {MAX_COLLATERAL_FILES} files",
        )
    return {p.name: _read_bounded(p) for p in files}


def _trust_store(args: argparse.Namespace) -> TrustStore:
    """The trust store of ``verify``: named directories must exist; the default one may not."""
    from services.verifier.trust import TrustStore, default_roots_dir

    if args.roots is not None:
        roots = _directory(args.roots, "--roots")
    elif os.environ.get("ATTESTMESH_ROOTS"):
        roots = _directory(default_roots_dir(), "ATTESTMESH_ROOTS")
    else:
        roots = default_roots_dir()
    test = None if args.test_roots is None else _directory(args.test_roots, "--test-roots")
    try:
        return TrustStore.load(roots, test_dir=test)
    except OSError as exc:
        raise ConfigError("cli.unreadable", f"trust directory: {exc.strerror}") from None


def verify(args: argparse.Namespace) -> int:
    evidence = _read_bounded(args.evidence)
    expected = None
    if args.nonce is not None:
        try:
            nonce = bytes.fromhex(args.nonce)
        except ValueError:
            raise ConfigError("cli.bad_nonce", "--nonce must be hex") from None
        if len(nonce) > 64:
            raise ConfigError("cli.bad_nonce", "--nonce is at most 64 bytes")
        expected = nonce.ljust(64, b"\0")
    trust = _trust_store(args)
    collateral: dict[str, bytes] = {}
    if args.collateral is not None:
        collateral = _read_collateral(_directory(args.collateral, "--collateral"))
    urls = config_mod.Config(kds_url=args.kds or DEFAULT_KDS, pcs_url=args.pcs or DEFAULT_PCS)
    plan = registry.planner(args.family, urls.vendor_urls)
    if plan is not None and not args.offline:
        collateral.update(_fetch_missing(plan(evidence, collateral)))
    options = VerifyOptions(
        now=_parse_time(args.at),
        trust=trust,
        collateral=collateral,
        expected_report_data=expected,
    )
    appraisal = appraise_untrusted(registry.get(args.family), evidence, options)
    if args.json:
        print(json.dumps(appraisal.to_json(), indent=2, sort_keys=True))
    else:
        print(_human(appraisal))
    return EXIT_CONTRAINDICATED if appraisal.status == Status.CONTRAINDICATED else EXIT_OK


def _fetch_missing(requests: Sequence[CollateralRequest]) -> dict[str, bytes]:
    """Best effort: what cannot be fetched stays missing, and the verdict names it."""
    from services.verifier.collateral import extract
    from services.verifier.fetch import http_fetch

    found = {}
    for request in requests:
        try:
            response = http_fetch(request.url, max_bytes=request.max_bytes)
            found[request.name] = extract(request, response)
        except CollateralError as exc:
            print(f"attestmesh: could not fetch {request.name}: {exc.reason}", file=sys.stderr)
    return found


def _human(appraisal: Appraisal) -> str:
    lines = [f"family: {appraisal.family}", f"status: {appraisal.status}"]
    for check in appraisal.checks:
        mark = "pass" if check.ok else "FAIL"
        lines.append(f"  [{mark}] {check.name}" + (f": {check.detail}" if check.detail else ""))
    for reason in appraisal.reasons:
        lines.append(f"  reason {reason.code}: {reason.message}")
    return "\n".join(lines)


def _config(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(getattr(args, "config", None), **sealingopts.overrides(args))


def _node_enroll(args: argparse.Namespace) -> int:
    from services.enroll import enroll

    if args.data_dir is not None:
        path = args.data_dir / "config.json"
        config = config_mod.load(path if path.is_file() else None, data_dir=str(args.data_dir))
    else:
        config = _config(args)
    done = enroll(args.name, config, args.out, replace=args.replace)
    print(f"node {done.node}: NATS user {done.public_key}")
    print(f"  seed {done.seed_file} (0600), config {done.config_file}")
    if done.embedded:
        state = "reloaded" if done.reloaded else "not running; admitted at its next start"
        print(f"  admitted to the embedded server ({state})")
    else:
        print(f"  merge {done.values_file} into the release's values and run `helm upgrade`")
    return EXIT_OK


def _node_reset(args: argparse.Namespace) -> int:
    """Runs as the broker: it holds the sealing key the audit record needs, and only the
    broker and the policy service may write pins (so no pin is cleared unaudited)."""
    from services.mesh import authconf, subjects
    from services.mesh.bus import Bus
    from services.nodes import reset_node

    overrides = {"data_dir": args.data_dir, **sealingopts.overrides(args)}
    config = authconf.signed_in_as(config_mod.load(args.config, **overrides), identities.BROKER)
    name = subjects.token(args.name)

    sealing = sealingopts.source(config)
    trusted = TrustedKeys.load(config.trusted_keys_path)

    async def work(bus: Bus) -> bool:
        return await reset_node(bus, name, sealing, trusted) is not None

    if admincli.run(config, admincli.DEFAULT_TIMEOUT_S, work, identity=identities.BROKER):
        print(f"{name}: hardware pin cleared (audited); its next allowed attestation pins anew")
    else:
        print(f"{name}: not pinned, nothing to reset")
    return EXIT_OK


def _collateral(args: argparse.Namespace) -> int:
    from services.mesh.bus import Bus
    from services.mesh.natskv import NatsKeyValue
    from services.verifier.collateral import store
    from services.verifier.families.dcap.pcsfetch import import_plan

    config = admincli.admin_config(args)
    timeout = admincli.timeout_of(args)
    directory = {p.name: _read_bounded(p) for p in sorted(args.directory.iterdir()) if p.is_file()}
    plan = import_plan(directory, base=config.pcs_url, root_crl_url=config.intel_root_crl_url)

    async def work(bus: Bus) -> None:
        kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_COLLATERAL))
        now = datetime.now(UTC).timestamp()
        for request, data in plan:
            await store(kv, request, data, at=now)

    admincli.run(config, timeout, work)
    print(f"imported {len(plan)} collateral files (TCB info from {plan[0][0].url})")
    return EXIT_OK


def _roots(args: argparse.Namespace) -> int:
    from services.verifier.roots import fetch_amd_roots
    from services.verifier.trust import default_roots_dir

    target = args.roots or default_roots_dir()
    for path in fetch_amd_roots(target, kds=args.kds or DEFAULT_KDS):
        print(f"{path}: pinned ARK verified")
    return EXIT_OK


def _collector(args: argparse.Namespace) -> int:
    from services import app
    from services.collector.service import CollectorNode
    from services.collector.simulator.node import simulated_source, test_pki
    from services.collector.sources.base import EvidenceSource
    from services.collector.sources.detect import detect_source
    from services.mesh.bus import Bus

    config = _config(args)
    source: EvidenceSource = (
        simulated_source(args.family or "snp", test_pki(Path(config.data_dir) / "test-pki"))
        if args.simulate
        else detect_source(args.family)
    )
    trusted = config.policy_trust()
    if "policy" not in trusted.names():
        raise ConfigError("collector.no_policy_key", "set policy_key_file to the policy's key")

    async def main(stop: asyncio.Event) -> None:
        async with Bus.session(
            config,
            identities.node_identity(args.node),
            declare=False,
            inbox_prefix=subjects.node_inbox(args.node),
        ) as bus:
            node = CollectorNode(bus, args.node, source, trusted)
            await app.alongside(
                config, bus, stop, node.run(stop, interval=config.reattest_interval_s)
            )

    return app.run("collector", config, main)


SERVICES = frozenset({"verifier", "policy", "broker", "collector", "up", "bench"})
"""Commands that configure their own logging (JSON lines, traces); the rest talk to a person."""


MAX_REPLICAS = 8


def _cluster(text: str) -> int:
    """A cluster keeps a majority through the loss of one member only at an odd size."""
    if text not in ("1", "3", "5"):
        raise argparse.ArgumentTypeError("--cluster is 1, 3 or 5 servers")
    return int(text)


def _replicas(text: str) -> int:
    """``--replicas``: 1 to 8 processes per service (more only burns a single machine)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= value <= MAX_REPLICAS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_REPLICAS}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command not in SERVICES or getattr(args, "policy_action", None) is not None:
        from services.mesh import telemetry

        telemetry.configure_cli()
    try:
        if args.command == "verify":
            return verify(args)
        if args.command == "up":
            from services.embedded import up

            return up(
                nodes=args.nodes,
                rounds=args.rounds,
                as_json=args.json,
                data_dir=args.data_dir,
                nats_url=args.nats,
                interval=args.interval,
                replicas=args.replicas,
                cluster=args.cluster,
            )
        if args.command == "bench":
            from bench import cli as benchcli

            return benchcli.run(args)
        if args.command == "secret":
            return secretcli.run(args)
        if args.command == "recovery":
            return recoverycli.run(args)
        if args.command == "health":
            from services.mesh.health import check

            problem = check(args.file, args.max_age)
            if problem is not None:
                print(f"attestmesh: unhealthy: {problem}", file=sys.stderr)
                return EXIT_CONTRAINDICATED
            return EXIT_OK
        if args.command == "audit":
            from services.auditcli import run_audit

            return run_audit(args)
        if args.command == "refvalues":
            return refvaluescli.run(args)
        if args.command == "policy" and args.policy_action is not None:
            return policycli.run(args)
        if args.command == "node":
            return _node_enroll(args) if args.node_action == "enroll" else _node_reset(args)
        if args.command == "roots":
            return _roots(args)
        if args.command == "collateral":
            return _collateral(args)
        if args.command == "collector":
            return _collector(args)
        from services import app

        config = _config(args)
        if args.command == "verifier":
            return app.run(
                f"verifier-{args.family}", config, lambda s: app.verifier(config, args.family, s)
            )
        if args.command == "policy":
            return app.run("policy", config, lambda s: app.policy(config, s))
        return app.run("broker", config, lambda s: app.broker(config, s))
    except AttestmeshError as exc:
        print(f"attestmesh: {exc.reason}: {exc.detail}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
