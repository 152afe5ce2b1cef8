"""``attestmesh secret put|list|delete``: the broker's sealed secrets, by an operator.

Resources are named as Confidential Containers' key broker names them,
``<repository>/<type>/<tag>``. No command prints a secret value.

The commands never touch sealed state themselves and need no sealing key: each is a request
to the broker signed with the operator key (:mod:`services.broker.operator`), which seals the
value, appends the change to its audit log with the signer's key id, and only then applies
it. A value travels HPKE-wrapped to the broker's intake key, whose public half the broker
signs (:mod:`services.broker.intake`); a request names the store generation it was made at,
so if another change lands first the command re-reads and signs again (a few times).
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

from services import admincli
from services.broker import intake, release
from services.broker.store import MAX_SECRET_SIZE, validate_name
from services.mesh import events, subjects
from services.mesh.bus import Bus
from services.mesh.errors import ConfigError, Rejected, ReleaseError, VerificationError
from services.mesh.keys import SigningKey, TrustedKeys
from services.verifier.ear import unb64url

EXIT_OK = 0
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
_KBS_RESOURCE = re.compile(rf"{_SEGMENT}/{_SEGMENT}/{_SEGMENT}")


MAX_ATTEMPTS = 4
"""Re-signings after another change moved the store's generation first."""


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
        parser.add_argument("--operator-key", help=admincli.OPERATOR_KEY_HELP)


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
    operator = admincli.operator_key(args, config)
    trusted = TrustedKeys.load(config.trusted_keys_path)
    desk = _Desk(operator, trusted, timeout)

    async def work(bus: Bus) -> str:
        if action == "list":
            return "\n".join((await desk.ask(bus, "secret-list")).secrets)
        for _ in range(MAX_ATTEMPTS):
            try:
                done = await desk.change(bus, action, resource, value)
            except Rejected as exc:
                if exc.reason != "broker.generation_moved":
                    raise
                continue
            if action == "put":
                return f"{resource} stored (version {done.version}, audit record {done.audit_id})"
            return f"{resource} deleted (audit record {done.audit_id})"
        raise ReleaseError("broker.generation_moved", "other changes kept landing first")

    out = admincli.run(config, timeout, work)
    if out:
        print(out)
    return EXIT_OK


class _Desk:
    """The operator's end of :mod:`services.broker.operator`."""

    def __init__(self, operator: SigningKey, trusted: TrustedKeys, timeout: float) -> None:
        self.operator = operator
        self.trusted = trusted
        self.timeout = timeout

    async def _send(self, bus: Bus, request: events.OperatorRequest) -> events.OperatorResponse:
        response = await bus.request(
            subjects.operator(request.action),
            request,
            events.OperatorResponse,
            timeout=self.timeout,
            retry_for=self.timeout,
        )
        if not response.ok:
            raise Rejected(response.reason or "broker.refused", f"{request.action} refused")
        return response

    def _sign(
        self,
        action: str,
        request_id: str,
        *,
        resource: str = "",
        generation: int = 0,
        enc: bytes = b"",
        ciphertext: bytes = b"",
    ) -> str:
        now = int(time.time())
        return self.operator.sign(
            {
                "act": action,
                "jti": request_id,
                "resource": resource,
                "generation": generation,
                "digest": intake.value_digest(enc, ciphertext),
                "iat": now,
                "exp": now + intake.TOKEN_LIFETIME_S // 2,
            }
        )

    async def ask(self, bus: Bus, action: events.OperatorAction) -> events.OperatorResponse:
        """A request without a value (a listing)."""
        request_id = events.new_id()
        token = self._sign(action, request_id)
        return await self._send(
            bus, events.OperatorRequest(id=request_id, action=action, token=token)
        )

    async def _intake(self, bus: Bus) -> tuple[bytes, int]:
        """The broker's intake key, only if the broker's own key signed it."""
        response = await self._send(bus, events.OperatorRequest(action="intake"))
        try:
            claims = self.trusted.verify(
                response.intake, accept=lambda name: name == intake.BROKER_SIGNER
            )
            if claims.get("sub") != intake.INTAKE_SUBJECT:
                raise VerificationError("operator.intake_invalid", "not an intake statement")
            public = unb64url(str(claims["intake"]))
        except (KeyError, ValueError) as exc:
            raise VerificationError("operator.intake_invalid", type(exc).__name__) from None
        return public, response.generation

    async def change(
        self, bus: Bus, action: str, resource: str, value: bytes
    ) -> events.OperatorResponse:
        """Sign and send one put or delete at the store's current generation."""
        public, generation = await self._intake(bus)
        request_id = events.new_id()
        enc = ciphertext = b""
        if action == "put":
            wrapped = release.wrap(
                value, public, info=intake.value_info(resource), aad=request_id.encode()
            )
            enc, ciphertext = wrapped.enc, wrapped.ciphertext
        kind: events.OperatorAction = "secret-put" if action == "put" else "secret-delete"
        token = self._sign(
            kind,
            request_id,
            resource=resource,
            generation=generation,
            enc=enc,
            ciphertext=ciphertext,
        )
        return await self._send(
            bus,
            events.OperatorRequest(
                id=request_id, action=kind, token=token, enc=enc, ciphertext=ciphertext
            ),
        )
