"""``attestmesh audit verify|list``: check and read the broker's audit log from outside.

It reads the ``broker-state`` bucket directly with the broker's sealing key (the configured
source, ``--sealing-source``; by default the key file in the data directory) and the
trusted keys of the deployment (the broker's public key checks the checkpoint), and writes
nothing. Everything, from connecting onwards, runs under one deadline: an unreachable NATS
is a clear error with exit code 2, never a hang.

Exit codes: 0 the chain verifies, 1 the chain is broken (or a record cannot be opened),
2 usage, configuration, I/O or connection error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from services import sealingopts
from services.broker.audit import AUDIT_PREFIX, AuditLog, AuditRecord
from services.broker.checkpoint import CHECKPOINT_KEY, Checkpoint
from services.broker.store import KEYRING_KEY, load_keyring
from services.mesh import authconf, identities, subjects
from services.mesh import config as config_mod
from services.mesh.bus import Bus
from services.mesh.config import Config
from services.mesh.errors import BusError, ConfigError, SealingError
from services.mesh.keys import TrustedKeys
from services.mesh.natskv import NatsKeyValue

EXIT_OK = 0
EXIT_BROKEN = 1
EXIT_USAGE = 2
NO_KEY = ("broker.sealing_key_", "broker.sealing_params_", "broker.snp_")
"""Reasons of a sealing-key source that could not produce the key."""
DEFAULT_DATA_DIR = Path(".attestmesh")


def audit_config(config_file: Path | None, data_dir: Path | None, **overrides: object) -> Config:
    """``--config FILE``, else ``DATA_DIR/config.json`` (the embedded default); ``overrides``
    from the command line (the sealing-key options)."""
    if config_file is not None:
        return config_mod.load(config_file, **overrides)
    directory = data_dir if data_dir is not None else DEFAULT_DATA_DIR
    path = directory / "config.json"
    if not path.is_file():
        if data_dir is not None:
            raise ConfigError("cli.no_config", f"{path} does not exist (run `attestmesh up`)")
        return config_mod.load(None, **overrides)
    return config_mod.load(path, **overrides)


def _since(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError("cli.bad_time", f"--since {text!r} is not RFC 3339") from None
    if moment.tzinfo is None:
        raise ConfigError("cli.bad_time", "--since needs a time zone (e.g. Z)")
    return moment


async def _open_log(bus: Bus, config: Config) -> AuditLog | None:
    """The audit log, or ``None`` if the bucket holds no broker state at all.

    Never creates anything: a bucket with audit state but no keyring is an error.
    """
    kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
    if await kv.get(KEYRING_KEY) is None:
        if any(k.startswith(AUDIT_PREFIX) or k == CHECKPOINT_KEY for k in await kv.keys()):
            raise SealingError("broker.keyring_missing", "audit records exist but no keyring")
        return None
    data_key = await load_keyring(kv, sealingopts.source(config))
    return AuditLog(kv, data_key, trusted=TrustedKeys.load(config.trusted_keys_path))


def _record_json(record: AuditRecord) -> dict[str, Any]:
    return {
        "seq": record.seq,
        "time": record.time.isoformat(),
        "outcome": str(record.outcome),
        "node": record.node,
        "resource": record.resource,
        "decision_id": record.decision_id,
        "verdict_digest": record.verdict_digest,
        "reason": record.reason,
        "trace_id": record.trace_id,
        "counts": dict(record.counts),
        "actor": record.actor,
        "reasons": list(record.reasons),
        "prev": record.prev.hex(),
    }


def _record_line(record: AuditRecord) -> str:
    line = (
        f"{record.seq:>8} {record.time.isoformat()} {record.outcome:<8} "
        f"{record.node} {record.resource} decision={record.decision_id}"
    )
    if record.reason:
        line += f" reason={record.reason}"
    if record.actor:
        line += f" actor={record.actor}"
    if record.counts:
        line += " " + ",".join(f"{k}={v}" for k, v in sorted(record.counts.items()))
    if record.reasons:
        line += f" reasons={json.dumps(record.reasons)}"
    return line


def _checkpoint_json(anchor: Checkpoint | None) -> dict[str, Any] | None:
    if anchor is None:
        return None
    return {"seq": anchor.seq, "head": anchor.head.hex(), "time": anchor.time.isoformat()}


async def _run(args: argparse.Namespace, config: Config) -> int:
    since = _since(args.since)
    async with Bus.session(
        config,
        identities.ADMIN,
        wait=args.timeout,
        declare=False,
        retry_for=args.timeout,
        quiet=True,
    ) as bus:
        log = await _open_log(bus, config)
        if args.action == "verify":
            checked = 0 if log is None else await log.verify_chain()
            anchor = None if log is None else await log.load_checkpoint()
            if args.json:
                out = {"ok": True, "checked": checked, "checkpoint": _checkpoint_json(anchor)}
                print(json.dumps(out, sort_keys=True))
            else:
                where = f"from checkpoint {anchor.seq}" if anchor else "from the first record"
                print(f"audit chain intact: {checked} records checked ({where})")
            return EXIT_OK
        records = [] if log is None else await log.entries(since)
        if args.json:
            print(json.dumps([_record_json(r) for r in records], indent=2, sort_keys=True))
        else:
            for record in records:
                print(_record_line(record))
        return EXIT_OK


def run_audit(args: argparse.Namespace) -> int:
    """Entry point for ``attestmesh audit``; maps a broken chain to exit 1."""
    config = audit_config(args.config, args.data_dir, **sealingopts.overrides(args))
    config = authconf.signed_in_as(config, identities.ADMIN)
    if not 0 < args.timeout <= 600:
        raise ConfigError("cli.usage", "--timeout must be in (0, 600] seconds")

    async def bounded() -> int:
        try:
            # Connecting may take up to the timeout; reading gets as long again.
            return await asyncio.wait_for(_run(args, config), 2 * args.timeout + 1)
        except TimeoutError:
            raise BusError("bus.timeout", f"no answer from {config.nats_url}") from None

    try:
        return asyncio.run(bounded())
    except SealingError as exc:
        if exc.reason.startswith(NO_KEY):
            raise  # no sealing key to check with: a configuration error (exit 2), not a break
        if args.json:
            print(json.dumps({"ok": False, "reason": exc.reason, "detail": exc.detail}))
        print(f"attestmesh: audit log broken: {exc.reason}: {exc.detail}", file=sys.stderr)
        return EXIT_BROKEN
