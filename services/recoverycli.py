"""``attestmesh recovery officer-key|init|recover``: Shamir recovery of the broker's data key.

The data key seals every secret and audit record; the sealing key only wraps it (the
``keyring`` record). Lose the sealing key (a host gone, an SNP-derived key that a new image
or chip cannot derive again) and the data key is lost with it, unless it was split
beforehand:

1. ``officer-key --out DIR NAME``: each officer's X25519 key pair (or their own, made with
   openssl; formats in :mod:`services.broker.officers`). Only the ``.pub`` is handed over.
2. ``init --shares N --threshold K --officers DIR [--out DIR]``: opens the keyring with the
   configured sealing key (read only: nothing is created), splits the data key into N
   shares of which any K rebuild it, and writes one ``<officer>.share`` per officer, each
   HPKE-sealed to that officer's key. Shares are of the data key, so they stay valid across
   sealing-key rotations and recoveries.
3. ``recover SHARE... --officer-key KEY... [--new-key PATH]``: the officers bring their
   share files and private keys to one machine (no plaintext share is ever written); K
   shares are opened and combined, the result is checked against the data key id in the
   sealed index's header, and the keyring is re-wrapped under the new sealing key: a key
   file created at ``--new-key`` (refused if the path exists), or the configured source
   (e.g. a new Kubernetes Secret, or the SNP key of the new host). ``rewrap_keyring``
   opens the index with the recovered key before writing, so a wrong key never replaces
   the real one.

No command prints key material. Exit codes: 0 done; 1 recovery refused (fewer shares than
the threshold, shares of another key or of mixed sets, a share that does not open, no
matching officer key); 2 usage, configuration, I/O or connection error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from services import admincli, sealingopts
from services.broker import officers
from services.broker.keysources import new_key_file
from services.broker.recovery import Share, combine_shares, decrypt_share, make_recovery_shares
from services.broker.sealing import AeadKey, KeyFileSource, SealingKeySource
from services.broker.store import data_key_id, open_keyring, rewrap_keyring
from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.errors import ConfigError, SealingError
from services.mesh.natskv import NatsKeyValue

EXIT_OK = 0
EXIT_REFUSED = 1
MAX_SHARE_FILES = 255
REFUSALS = frozenset(
    {
        "recovery.too_few_shares",
        "recovery.mixed_shares",
        "recovery.duplicate_share",
        "recovery.wrong_officer_key",
        "recovery.wrong_key",
        "recovery.share_file_invalid",
        "broker.recovery_failed",
        "broker.recovery_share_invalid",
        "broker.seal_tampered",
    }
)


def add_parser(sub: Any) -> None:
    recovery = sub.add_parser("recovery", help="Shamir recovery of the broker's data key")
    actions = recovery.add_subparsers(dest="recovery_action", required=True)
    officer = actions.add_parser("officer-key", help="make a recovery officer's key pair")
    officer.add_argument("name", help="the officer's name (letters, digits, ._-)")
    officer.add_argument("--out", type=Path, required=True, help="directory for NAME.key/.pub")
    init = actions.add_parser("init", help="split the data key into shares for the officers")
    init.add_argument("--shares", type=int, required=True, help="N: one per officer")
    init.add_argument("--threshold", type=int, required=True, help="K: shares that recover")
    init.add_argument("--officers", type=Path, required=True, help="directory of NAME.pub")
    init.add_argument("--out", type=Path, help="directory for NAME.share (default: --officers)")
    recover = actions.add_parser(
        "recover", help="rebuild the data key from shares; re-wrap it under a new sealing key"
    )
    recover.add_argument("share_files", nargs="+", type=Path, metavar="SHARE")
    recover.add_argument(
        "--officer-key",
        dest="officer_keys",
        action="append",
        type=Path,
        required=True,
        help="an officer's private key (repeat for each share)",
    )
    recover.add_argument(
        "--new-key",
        type=Path,
        help="create the new sealing key file here (refused if it exists); "
        "default: the configured sealing source",
    )
    for parser in (init, recover):
        admincli.add_target(parser)
        sealingopts.add_options(parser)


def run(args: argparse.Namespace) -> int:
    action = args.recovery_action
    if action == "officer-key":
        return _officer_key(args)
    try:
        return _init(args) if action == "init" else _recover(args)
    except SealingError as exc:
        if exc.reason not in REFUSALS:
            raise
        print(f"attestmesh: {exc.reason}: {exc.detail}", file=sys.stderr)
        print("attestmesh: nothing was changed", file=sys.stderr)
        return EXIT_REFUSED


def _officer_key(args: argparse.Namespace) -> int:
    private, public, officer = officers.generate(args.out, args.name)
    print(f"officer {officer.name}: {officer.fingerprint}")
    print(f"  public key {public} (hand this to whoever runs `recovery init`)")
    print(f"  private key {private} (0600; keep it offline, it opens this officer's share)")
    return EXIT_OK


def _init(args: argparse.Namespace) -> int:
    count, threshold = args.shares, args.threshold
    if not 2 <= threshold <= count <= officers.MAX_OFFICERS:
        raise ConfigError(
            "recovery.bad_parameters",
            f"need 2 <= --threshold <= --shares <= {officers.MAX_OFFICERS} "
            f"(got {threshold} of {count}): one share alone must never recover the key",
        )
    found = officers.load_officers(args.officers)
    if len(found) != count:
        raise ConfigError(
            "recovery.officer_count",
            f"--shares {count} but {len(found)} officer keys (*.pub) in {args.officers}",
        )
    out = args.out or args.officers
    targets = [out / f"{o.name}{officers.SHARE_SUFFIX}" for o in found]
    for path in targets:
        if path.exists() or path.is_symlink():
            raise ConfigError("recovery.file_exists", f"{path} exists; nothing was written")
    config = admincli.admin_config(args)
    timeout = admincli.timeout_of(args)
    sealing = sealingopts.source(config)
    sealing.sealing_key()  # fail before connecting if the key is not there

    async def work(bus: Bus) -> AeadKey:
        kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
        data_key = await open_keyring(kv, sealing)
        if await data_key_id(kv) != data_key.key_id:
            raise SealingError(
                "broker.index_foreign", "the sealed index is not under this keyring's data key"
            )
        return data_key

    data_key = admincli.run(config, timeout, work)
    shares = make_recovery_shares(data_key, [o.public_key for o in found], threshold)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    for officer, share, path in zip(found, shares, targets, strict=True):
        document = officers.ShareFile(
            format=officers.SHARE_FORMAT,
            officer=officer.name,
            officer_key=officer.fingerprint,
            shares=count,
            share=share,
        )
        officers.write_new(path, officers.encode_share(document), 0o600)
    print(f"data key {data_key.key_id.hex()}: {count} shares, any {threshold} recover it")
    for officer, path in zip(found, targets, strict=True):
        print(f"  {path} for {officer.name} ({officer.fingerprint})")
    return EXIT_OK


def _opened_shares(args: argparse.Namespace) -> tuple[list[Share], bytes]:
    """Each share opened with the officer key its fingerprint names; (shares, key id)."""
    if len(args.share_files) > MAX_SHARE_FILES:
        raise ConfigError("cli.usage", f"at most {MAX_SHARE_FILES} share files")
    files = [(path, officers.read_share(path)) for path in args.share_files]
    keys = {}
    for path in args.officer_keys:
        private = officers.load_private_key(path)
        keys[officers.fingerprint(officers.raw_public(private.public_key()))] = private
    first = files[0][1].share
    if any(
        (f.share.key_id, f.share.threshold) != (first.key_id, first.threshold) for _, f in files
    ):
        raise SealingError(
            "recovery.mixed_shares", "the shares are not all of one key and one split"
        )
    if len({f.share.x for _, f in files}) != len(files):
        raise SealingError("recovery.duplicate_share", "the same share was given twice")
    if len(files) < first.threshold:
        raise SealingError(
            "recovery.too_few_shares",
            f"{len(files)} shares given; this split needs {first.threshold}",
        )
    opened = []
    for path, document in files:
        key = keys.get(document.officer_key)
        if key is None:
            raise SealingError(
                "recovery.wrong_officer_key",
                f"no --officer-key is {document.officer}'s ({document.officer_key}) for {path}",
            )
        opened.append(decrypt_share(document.share, key))
    return opened, first.key_id


def _recover(args: argparse.Namespace) -> int:
    shares, key_id = _opened_shares(args)
    config = admincli.admin_config(args)
    timeout = admincli.timeout_of(args)
    new_key: Path | None = args.new_key
    target: SealingKeySource
    if new_key is not None:
        if new_key.exists() or new_key.is_symlink():
            raise ConfigError("recovery.file_exists", f"{new_key} exists; name a new path")
        target = KeyFileSource(new_key, create=False)
    else:
        target = sealingopts.source(config)
        target.sealing_key()  # the new key must be there before anything is rewritten

    async def work(bus: Bus) -> tuple[AeadKey, AeadKey]:
        kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
        expected = await data_key_id(kv)
        if key_id != expected:
            raise SealingError(
                "recovery.wrong_key",
                f"the shares are of data key {key_id.hex()}; this mesh's is {expected.hex()}",
            )
        data_key = combine_shares(shares, expected)
        sealing_key = new_key_file(new_key) if new_key is not None else target.sealing_key()
        await rewrap_keyring(kv, data_key, target)
        if (await open_keyring(kv, target)).key_id != data_key.key_id:
            raise SealingError("broker.recovery_failed", "the keyring does not read back")
        return data_key, sealing_key

    data_key, sealing_key = admincli.run(config, timeout, work)
    where = f"key file {new_key}" if new_key is not None else f"{config.sealing_source} source"
    print(f"data key {data_key.key_id.hex()} recovered from {len(shares)} shares")
    print(f"keyring re-wrapped under sealing key {sealing_key.key_id.hex()} ({where})")
    if new_key is not None:
        print("  install it where the broker reads its sealing key, then restart the broker")
    return EXIT_OK
