"""``attestmesh refvalues add|list|remove|set|import-snp``: reference values, signed by the
operator.

Each change reads the family's stored document, refuses to go on if it does not verify under
the trusted operator keys, applies the change, and stores the result signed with the
operator key (compare-and-set). Values are checked against the claim's format
(:mod:`services.policy.claimformats`) so a mistyped measurement is an error here, not a
silent deny later. ``--expires`` makes a value stop counting at that time by itself.

Removing a claim's last value is refused: with no values the policy stops checking the
claim at all, which would let any value through. Add the replacement first.

``import-snp`` adds SNP ``measurement`` values computed from launch inputs (OVMF, vCPUs,
kernel...) instead of typed in (:mod:`services.policy.snplaunch`); inputs are checked and
digests computed before anything connects, so a bad file changes nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from services import admincli
from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.errors import ConfigError, PolicyError
from services.mesh.keys import TrustedKeys
from services.mesh.natskv import NatsKeyValue
from services.policy import claimformats, documents, refvalues
from services.policy.refvalues import Entry, RefValues
from services.verifier import registry

if TYPE_CHECKING:
    from services.policy import snplaunch

EXIT_OK = 0
EXIT_REFUSED = 1
MEASUREMENT = "measurement"


def add_parser(sub: Any) -> None:
    refs = sub.add_parser("refvalues", help="manage reference values (operator-signed)")
    actions = refs.add_subparsers(dest="refvalues_action", required=True)
    add = actions.add_parser("add", help="allow VALUE for CLAIM of FAMILY")
    add.add_argument("family", choices=registry.families())
    add.add_argument("claim")
    add.add_argument("value")
    listing = actions.add_parser("list", help="print reference values (all families or one)")
    listing.add_argument("family", nargs="?", choices=registry.families())
    remove = actions.add_parser("remove", help="stop allowing VALUE for CLAIM of FAMILY")
    remove.add_argument("family", choices=registry.families())
    remove.add_argument("claim")
    remove.add_argument("value")
    replace = actions.add_parser("set", help="replace FAMILY's values with a JSON file")
    replace.add_argument("family", choices=registry.families())
    replace.add_argument("file", help='JSON: {"measurement": ["<hex>", ...], ...}; - for stdin')
    snp = actions.add_parser(
        "import-snp",
        help="add SNP measurements computed from launch inputs (sev-snp-measure)",
        description="Compute expected SEV-SNP launch measurements (as `sev-snp-measure "
        "--mode snp` does) and add them as snp measurement values: from FILE, a JSON list "
        'of launch configurations ({"launches": [{"ovmf": ..., "vcpus": ..., '
        '"vcpu_type": ...}]}), or from --ovmf and the options below.',
    )
    snp.set_defaults(family="snp", claim=MEASUREMENT)
    snp.add_argument("file", nargs="?", help="JSON file of launch configurations")
    snp.add_argument("--ovmf", type=Path, help="the guest's OVMF firmware image")
    snp.add_argument("--vcpus", type=int, help="number of guest vCPUs")
    snp.add_argument("--vcpu-type", help="guest vCPU type, e.g. EPYC-v4, EPYC-Milan, EPYC-Genoa")
    snp.add_argument("--vmm-type", default="QEMU", help="QEMU (default), ec2 or gce")
    snp.add_argument("--kernel", type=Path, help="kernel of a direct boot (measured by hash)")
    snp.add_argument("--initrd", type=Path, help="initrd (with --kernel)")
    snp.add_argument("--append", help="kernel command line (with --kernel)")
    snp.add_argument("--guest-features", default="0x1", help="SEV features, hex (default 0x1)")
    for parser in (add, snp):
        parser.add_argument("--expires", help="RFC 3339 time after which the value stops counting")
        parser.add_argument("--note", default="", help="a note for operators (at most 256 chars)")
    for parser in (add, remove, replace, snp):
        parser.add_argument("--operator-key", type=Path, help=admincli.OPERATOR_KEY_HELP)
    for parser in (add, listing, remove, replace, snp):
        admincli.add_target(parser)


def run(args: argparse.Namespace) -> int:
    if args.refvalues_action == "list":
        return _list(args)
    imported: list[refvalues.Value] = []
    if args.refvalues_action == "import-snp":
        imported = _measured(args)
        change = _adding(args.claim, imported)
    else:
        change = _change(args)
    config = admincli.admin_config(args)
    timeout = admincli.timeout_of(args)
    operator = admincli.operator_key(args, config)
    trusted = TrustedKeys.load(config.trusted_keys_path)

    async def work(bus: Bus) -> tuple[int, RefValues]:
        bucket = await bus.key_value(subjects.BUCKET_REFVALUES)
        history = await refvalues.key_history(bucket, args.family)
        return await refvalues.modify(
            NatsKeyValue(bucket),
            args.family,
            change,
            operator=operator,
            trusted=trusted,
            history=history,
        )

    version, _ = admincli.run(config, timeout, work)
    action = args.refvalues_action
    done = {"add": "added", "remove": "removed", "set": "replaced", "import-snp": "added"}
    what = "reference values" if action == "set" else f"{args.claim} value"
    if action == "import-snp":
        what = f"{len(imported)} {args.claim} value(s)"
    print(f"{args.family}: {what} {done[action]} (version {version}, signed {operator.kid})")
    return EXIT_OK


def _expiry(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError("cli.bad_time", f"--expires {text!r} is not RFC 3339") from None
    if moment.tzinfo is None:
        raise ConfigError("cli.bad_time", "--expires needs a time zone (e.g. Z)")
    if moment <= datetime.now(UTC):
        raise ConfigError("cli.bad_time", "--expires is in the past")
    return moment


def _change(args: argparse.Namespace) -> Callable[[RefValues], RefValues]:
    """The edit to apply to the family's current values (checked before connecting)."""
    family = args.family
    if args.refvalues_action == "set":
        wanted = _checked_file(family, refvalues.validate(admincli.read_input(args.file)))
        return lambda _current: wanted
    value = claimformats.normalise(family, args.claim, args.value)
    if args.refvalues_action == "add":
        return _adding(args.claim, [_item(value, _expiry(args.expires), args.note)])

    def remove(current: RefValues) -> RefValues:
        allowed = current.get(args.claim, [])
        kept = [v for v in allowed if refvalues.value_of(v) != value]
        if len(kept) == len(allowed):
            raise PolicyError("refvalues.not_found", f"{family} {args.claim} has no {value!r}")
        if not kept:
            raise PolicyError(
                "refvalues.last_value",
                f"{value!r} is the last {args.claim} value: without values the claim is not "
                "checked at all; add its replacement first",
            )
        current[args.claim] = kept
        return current

    return remove


def _item(value: str | int, expires: datetime | None, note: str) -> refvalues.Value:
    if len(note) > refvalues.MAX_NOTE or not note.isprintable():
        raise ConfigError("cli.usage", f"--note: at most {refvalues.MAX_NOTE} printable")
    return Entry(value=value, expires=expires, note=note) if expires or note else value


def _adding(claim: str, items: list[refvalues.Value]) -> Callable[[RefValues], RefValues]:
    """Add ``items`` to ``claim``, replacing entries with the same values (and of two
    items with one value, keeping the first)."""
    added: set[str | int] = set()
    unique: list[refvalues.Value] = []
    for item in items:
        if refvalues.value_of(item) not in added:
            added.add(refvalues.value_of(item))
            unique.append(item)

    def add(current: RefValues) -> RefValues:
        kept = [v for v in current.get(claim, []) if refvalues.value_of(v) not in added]
        current[claim] = [*kept, *unique]
        return current

    return add


def _measured(args: argparse.Namespace) -> list[refvalues.Value]:
    """``import-snp``'s measurement values, each printed as it is computed."""
    from services.policy import snplaunch

    if (args.file is None) == (args.ovmf is None):
        raise ConfigError("cli.usage", "import-snp takes FILE or --ovmf, one of them")
    expires = _expiry(args.expires)
    if args.file is None:
        if args.vcpus is None or args.vcpu_type is None:
            raise ConfigError("cli.usage", "--ovmf needs --vcpus and --vcpu-type")
        try:
            features = int(args.guest_features, 0)
        except ValueError:
            raise ConfigError("cli.usage", "--guest-features is a number (e.g. 0x1)") from None
        launch = snplaunch.Launch(
            ovmf=args.ovmf,
            vcpus=args.vcpus,
            vcpu_type=args.vcpu_type,
            vmm_type=args.vmm_type,
            kernel=args.kernel,
            initrd=args.initrd,
            append=args.append,
            guest_features=features,
        )
        plan = [(launch, expires, args.note)]
    else:
        beside = (args.vcpus, args.vcpu_type, args.kernel, args.initrd, args.append)
        if any(option is not None for option in beside) or args.vmm_type != "QEMU":
            raise ConfigError("cli.usage", "launch options go into FILE, not beside it")
        path = Path(args.file)
        launches = snplaunch.read_launch_file(admincli.read_input(args.file), path.parent)
        plan = [
            (launch, _entry_expiry(entry.expires) or expires, entry.note or args.note)
            for launch, entry in launches
        ]
    items: list[refvalues.Value] = []
    for launch, until, note in plan:
        digest = snplaunch.launch_digest(launch)
        value = claimformats.normalise(args.family, args.claim, digest)
        items.append(_item(value, until, note))
        print(f"{args.family} {args.claim} {value} ({_described(launch)})")
    return items


def _entry_expiry(moment: datetime | None) -> datetime | None:
    if moment is not None and (moment.tzinfo is None or moment <= datetime.now(UTC)):
        raise ConfigError("cli.bad_time", "a launch's expires needs a time zone and the future")
    return moment


def _described(launch: snplaunch.Launch) -> str:
    text = f"{launch.vcpus} x {launch.vcpu_type}, {launch.vmm_type}, {launch.ovmf.name}"
    return text + (f", kernel {launch.kernel.name}" if launch.kernel is not None else "")


def _checked_file(family: str, values: RefValues) -> RefValues:
    """Every value of a file normalised to its claim's format."""
    out: RefValues = {}
    for claim, allowed in values.items():
        normalised: list[refvalues.Value] = []
        for item in allowed:
            bare = refvalues.value_of(item)
            value = claimformats.normalise(family, claim, str(bare))
            if isinstance(bare, int) and not isinstance(value, int):
                value = bare
            normalised.append(
                msgspec.structs.replace(item, value=value) if isinstance(item, Entry) else value
            )
        out[claim] = normalised
    return out


def _list(args: argparse.Namespace) -> int:
    config = admincli.admin_config(args)
    timeout = admincli.timeout_of(args)
    trusted = TrustedKeys.load(config.trusted_keys_path)

    async def work(bus: Bus) -> dict[str, bytes]:
        kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_REFVALUES))
        if args.family is None:
            return await refvalues.read_all(kv)
        found = await kv.get(args.family)
        return {} if found is None else {args.family: found[0]}

    stored = admincli.run(config, timeout, work)
    now = datetime.now(UTC)
    status = EXIT_OK
    for family, raw in sorted(stored.items()):
        try:
            document = documents.open_signed(
                raw, trusted, bucket=subjects.BUCKET_REFVALUES, key=family, kind="refvalues"
            )
            values = refvalues.validate(document.payload)
        except PolicyError as exc:
            print(f"attestmesh: {family}: {exc.reason}: {exc.detail}", file=sys.stderr)
            status = EXIT_REFUSED
            continue
        print(f"{family} (version {document.version}, signed {document.signer})")
        for claim, allowed in sorted(values.items()):
            for item in allowed:
                print(f"  {claim} {refvalues.value_of(item)}{_suffix(item, now)}")
    return status


def _suffix(item: refvalues.Value, now: datetime) -> str:
    if not isinstance(item, Entry):
        return ""
    text = ""
    if item.expires is not None:
        state = "EXPIRED" if item.expires <= now else "expires"
        text += f" {state} {item.expires.isoformat(timespec='seconds')}"
    if item.note:
        text += f" note={item.note!r}"
    return text
