"""``attestmesh policy check|show|set|history|rollback``: the policies, by an operator.

Each action addresses the release (appraisal) policy, or with ``--resource`` the broker's
resource policy (:mod:`services.broker.resources`); both are signed and kept the same way.
``check`` is offline: compile, then run the Rego tests beside the file. ``set`` runs the same
check and refuses what fails before anything is signed. ``rollback REVISION`` does not put
the old KV entry back (the policy service refuses an older signed version as a rollback
attack, rightly): it verifies that revision's signature, compiles it, and signs its text
again as a new version. ``attestmesh policy`` with no action runs the policy service.

Exit codes: 0 done, 1 the policy fails its check (or what is stored does not verify), 2
usage, configuration, I/O or connection error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from services import admincli
from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.errors import BusError, ConfigError, PolicyError
from services.mesh.keys import TrustedKeys
from services.mesh.natskv import NatsKeyValue
from services.policy import documents, regotest, release_policy
from services.policy.documents import Document
from services.policy.engine import RELEASE, RESOURCE, PolicyKind

EXIT_OK = 0
EXIT_FAILED = 1


RESOURCE_HELP = "the broker's resource policy (package attestmesh.resource), not the release policy"


def add_parser(sub: Any) -> None:
    policy = sub.add_parser(
        "policy", help="run the policy service, or (with an action) manage the policies"
    )
    policy.add_argument("--config", type=Path, help="service mode: the service's config")
    actions = policy.add_subparsers(dest="policy_action")
    check = actions.add_parser("check", help="offline: compile FILE and run its Rego tests")
    check.add_argument("file", type=Path)
    show = actions.add_parser("show", help="print the policy in force (source on stdout)")
    admincli.add_target(show)
    put = actions.add_parser("set", help="check FILE, sign it and make it the policy in force")
    put.add_argument("file", type=Path)
    put.add_argument("--operator-key", type=Path, help=admincli.OPERATOR_KEY_HELP)
    admincli.add_target(put)
    history = actions.add_parser("history", help="the policy's stored revisions")
    admincli.add_target(history)
    back = actions.add_parser("rollback", help="sign an earlier revision again as the newest")
    back.add_argument("revision", type=int)
    back.add_argument("--operator-key", type=Path, help=admincli.OPERATOR_KEY_HELP)
    admincli.add_target(back)
    for action in (check, show, put, history, back):
        action.add_argument("--resource", action="store_true", help=RESOURCE_HELP)


def run(args: argparse.Namespace) -> int:
    action = args.policy_action
    kind = RESOURCE if args.resource else RELEASE
    if action == "check":
        return _check(args.file, kind)
    if action == "set":
        return _set(args, kind)
    if action == "show":
        return _show(args, kind)
    if action == "history":
        return _history(args, kind)
    return _rollback(args, kind)


def _report(result: regotest.CheckResult) -> None:
    for test in result.tests:
        mark = "PASS" if test.passed else test.outcome.upper()
        detail = f": {test.detail}" if test.detail and not test.passed else ""
        print(f"  [{mark}] {test.file} {test.name}{detail}")
    passed = sum(t.passed for t in result.tests)
    print(f"policy compiles; {passed}/{len(result.tests)} tests passed")


def _checked(path: Path, kind: PolicyKind) -> regotest.CheckResult | None:
    """The check's result, printed; ``None`` (and the compiler's message) if it fails."""
    try:
        result = regotest.check(path, kind)
    except PolicyError as exc:
        print(f"attestmesh: {exc.reason}: {exc.detail}", file=sys.stderr)
        return None
    _report(result)
    if not result.ok:
        why = f"{kind.reason}.tests_failed: the policy's tests do not pass"
        print(f"attestmesh: {why}", file=sys.stderr)
        return None
    return result


def _check(path: Path, kind: PolicyKind) -> int:
    return EXIT_OK if _checked(path, kind) is not None else EXIT_FAILED


def _set(args: argparse.Namespace, kind: PolicyKind) -> int:
    config = admincli.admin_config(args)
    timeout = admincli.timeout_of(args)
    operator = admincli.operator_key(args, config)
    result = _checked(args.file, kind)
    if result is None:
        print("attestmesh: policy not stored", file=sys.stderr)
        return EXIT_FAILED

    async def work(bus: Bus) -> int:
        kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_POLICIES))
        return await release_policy.store(kv, result.source, operator=operator, kind=kind)

    version = admincli.run(config, timeout, work)
    print(f"{kind.label} stored (version {version}, signed {operator.kid})")
    return EXIT_OK


def _open(raw: bytes, trusted: TrustedKeys, kind: PolicyKind) -> Document:
    return documents.open_signed(
        raw, trusted, bucket=subjects.BUCKET_POLICIES, key=kind.key, kind=kind.reason
    )


def _describe(document: Document) -> str:
    issued = document.issued_at.isoformat(timespec="seconds")
    return (
        f"version {document.version}, signed {document.signer}, issued {issued}, "
        f"sha256 {document.digest[:16]}"
    )


def _show(args: argparse.Namespace, kind: PolicyKind) -> int:
    config = admincli.admin_config(args)
    timeout = admincli.timeout_of(args)
    trusted = TrustedKeys.load(config.trusted_keys_path)

    async def work(bus: Bus) -> tuple[bytes, int] | None:
        return await NatsKeyValue(await bus.key_value(subjects.BUCKET_POLICIES)).get(kind.key)

    found = admincli.run(config, timeout, work)
    if found is None:
        print(f"attestmesh: {kind.reason}.none: no {kind.label} is stored", file=sys.stderr)
        return EXIT_FAILED
    try:
        document = _open(found[0], trusted, kind)
    except PolicyError as exc:
        # What does not verify is not shown: it is not what the policy service runs.
        print(f"attestmesh: {exc.reason}: revision {found[1]}: {exc.detail}", file=sys.stderr)
        return EXIT_FAILED
    print(f"# revision {found[1]}: {_describe(document)}", file=sys.stderr)
    sys.stdout.write(release_policy.validate(document.payload, kind))
    return EXIT_OK


async def _revisions(bus: Bus, kind: PolicyKind) -> list[Any]:
    """Every retained KV entry of the policy, oldest first (deletions included)."""
    import nats.errors
    import nats.js.errors

    kv = await bus.key_value(subjects.BUCKET_POLICIES)
    try:
        return list(await kv.history(kind.key))
    except nats.js.errors.NoKeysError:
        return []
    except (nats.errors.Error, TimeoutError) as exc:
        raise BusError("kv.read_failed", f"policy history: {type(exc).__name__}") from None


def _history(args: argparse.Namespace, kind: PolicyKind) -> int:
    config = admincli.admin_config(args)
    timeout = admincli.timeout_of(args)
    trusted = TrustedKeys.load(config.trusted_keys_path)

    async def revisions(bus: Bus) -> list[Any]:
        return await _revisions(bus, kind)

    entries = admincli.run(config, timeout, revisions)
    if not entries:
        print(f"no {kind.label} has been stored")
        return EXIT_OK
    for index, entry in enumerate(entries):
        current = " (current)" if index == len(entries) - 1 else ""
        created = entry.created.isoformat(timespec="seconds") if entry.created else "-"
        if entry.operation is not None or not entry.value:
            print(f"revision {entry.revision}{current}: deleted at {created}")
            continue
        try:
            line = _describe(_open(entry.value, trusted, kind))
        except PolicyError as exc:
            line = f"REFUSED {exc.reason}"
        print(f"revision {entry.revision}{current}: written {created}, {line}")
    return EXIT_OK


def _rollback(args: argparse.Namespace, kind: PolicyKind) -> int:
    import nats.errors
    import nats.js.errors

    config = admincli.admin_config(args)
    timeout = admincli.timeout_of(args)
    trusted = TrustedKeys.load(config.trusted_keys_path)
    operator = admincli.operator_key(args, config)
    if args.revision < 1:
        raise ConfigError("cli.usage", "REVISION is a positive KV revision (see policy history)")

    async def fetch(bus: Bus) -> bytes | None:
        kv = await bus.key_value(subjects.BUCKET_POLICIES)
        try:
            entry = await kv.get(kind.key, revision=args.revision)
        except nats.js.errors.KeyNotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError("kv.read_failed", f"revision: {type(exc).__name__}") from None
        if entry.key != kind.key or not entry.value:
            return None
        value: bytes = entry.value
        return value

    raw = admincli.run(config, timeout, fetch)
    if raw is None:
        print(f"attestmesh: {kind.reason}.no_revision: revision {args.revision}", file=sys.stderr)
        return EXIT_FAILED
    try:
        document = _open(raw, trusted, kind)
        source = regotest.compile_policy(document.payload, kind=kind)
    except PolicyError as exc:
        print(f"attestmesh: {exc.reason}: revision {args.revision}: {exc.detail}", file=sys.stderr)
        return EXIT_FAILED

    async def store(bus: Bus) -> int:
        kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_POLICIES))
        return await release_policy.store(kv, source, operator=operator, kind=kind)

    version = admincli.run(config, timeout, store)
    print(
        f"{kind.label} of revision {args.revision} (version {document.version}) signed again "
        f"as version {version} by {operator.kid}"
    )
    return EXIT_OK
