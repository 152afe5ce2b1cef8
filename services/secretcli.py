"""``attestmesh secret put|list|delete``: the broker's sealed secrets, by an operator.

Resources are named as Confidential Containers' key broker names them,
``<repository>/<type>/<tag>``. No command prints a secret value.

Secret changes are not yet in the broker's audit log: the operator may not write that log
(it could then erase or rewrite it), so the record has to be appended by the broker on the
operator's request, which is still to be built.

The sealing key must already exist where the broker keeps it (``DATA_DIR/broker-sealing.key``):
these commands never create one (:class:`~services.broker.sealing.KeyFileSource`).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from services import admincli
from services.broker.sealing import KeyFileSource
from services.broker.store import MAX_SECRET_SIZE, SecretStore, validate_name
from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.errors import ConfigError, SealingError
from services.mesh.natskv import NatsKeyValue

EXIT_OK = 0
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
_KBS_RESOURCE = re.compile(rf"{_SEGMENT}/{_SEGMENT}/{_SEGMENT}")


def add_parser(sub: Any) -> None:
    secret = sub.add_parser("secret", help="manage the broker's sealed secrets (audited)")
    actions = secret.add_subparsers(dest="secret_action", required=True)
    put = actions.add_parser("put", help="store FILE (or - for stdin) as RESOURCE")
    put.add_argument("resource", help="<repository>/<type>/<tag>")
    put.add_argument("file", nargs="?", help="the value's file, - for standard input")
    put.add_argument("--file", dest="file_option", help=argparse.SUPPRESS)
    listing = actions.add_parser("list", help="the names of the stored secrets")
    delete = actions.add_parser("delete", help="delete RESOURCE")
    delete.add_argument("resource")
    for parser in (put, listing, delete):
        admincli.add_target(parser)


def resource_name(text: str) -> str:
    """``text`` if it is a key-broker resource path ``<repository>/<type>/<tag>``."""
    if _KBS_RESOURCE.fullmatch(text) is None:
        raise ConfigError(
            "secret.bad_resource", "a resource is <repository>/<type>/<tag> (letters, digits, ._-)"
        )
    return validate_name(text)


def run(args: argparse.Namespace) -> int:
    action = args.secret_action
    value = b""
    resource = ""
    if action == "put":
        resource = resource_name(args.resource)
        source = args.file or args.file_option
        if source is None:
            raise ConfigError("cli.usage", "secret put needs RESOURCE and FILE (or -)")
        value = admincli.read_input(source, limit=MAX_SECRET_SIZE)
        if not value:
            raise ConfigError("secret.empty", f"{source} is empty")
    elif action == "delete":
        resource = validate_name(args.resource)
    config = admincli.admin_config(args)
    timeout = admincli.timeout_of(args)
    sealing = KeyFileSource.in_data_dir(Path(config.data_dir), create=False)
    sealing.sealing_key()  # fail before connecting if the key is not where it should be

    async def work(bus: Bus) -> str:
        kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
        store = await SecretStore.open(kv, sealing)
        if action == "list":
            return "\n".join(await store.list())
        if action == "put":
            version = await store.put(resource, value)
            return f"{resource} stored (version {version})"
        if resource not in await store.list():  # nothing to delete: an error, not audited
            raise SealingError("broker.secret_not_found", repr(resource))
        await store.delete(resource)
        return f"{resource} deleted"

    out = admincli.run(config, timeout, work)
    if out:
        print(out)
    return EXIT_OK
