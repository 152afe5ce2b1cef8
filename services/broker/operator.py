"""The broker's side of operator requests: secret changes it applies and audits itself.

The admin identity may publish operator requests but write nothing sealed, so every secret
change passes through here and lands in the hash-chained audit log *before* it is applied,
naming the operator key that signed it. A change the store then refuses (the generation
moved under it) gets a second record saying so, so the log never shows a change that did
not happen without also showing its failure.

Checks, in order: the subject matches the action; the token is the operator's (signature,
expiry, a lifetime of at most :data:`~services.broker.intake.TOKEN_LIFETIME_S`, not issued
in the future); it names this very request, action and resource, and the digest of the
wrapped value; the value opens under the intake key for that resource; the store is at the
generation the token names.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from datetime import datetime
from typing import Any

from nats.aio.msg import Msg

from services.broker import intake, release
from services.broker.audit import AuditLog, Outcome
from services.broker.sealing import AeadKey
from services.broker.store import SecretStore, validate_name
from services.mesh import events, jws, subjects, telemetry
from services.mesh.errors import ParseError, ReleaseError, SealingError, VerificationError
from services.mesh.keys import SigningKey, TrustedKeys
from services.verifier.ear import b64url

log = telemetry.logger("broker")

OPERATOR_NODE = "operator"
"""The audit record's ``node`` field for an operator's change (it concerns no node)."""
_CHANGES = {"secret-put": Outcome.SECRET_PUT, "secret-delete": Outcome.SECRET_DELETED}


class OperatorDesk:
    """Answers ``attest.operator.*`` for one broker process."""

    def __init__(
        self,
        store: SecretStore,
        audit: AuditLog,
        data_key: AeadKey,
        trusted: TrustedKeys,
        *,
        signer: SigningKey | None,
        clock: Callable[[], datetime],
    ) -> None:
        self.store = store
        self.audit = audit
        self.trusted = trusted
        self.signer = signer
        self.clock = clock
        self._intake = intake.intake_key(data_key)

    async def on_request(self, msg: Msg) -> events.Message:
        try:
            request = events.decode(msg.data, events.OperatorRequest)
        except ParseError as exc:
            return events.Refusal(reason=exc.reason)
        try:
            if msg.subject != subjects.operator(request.action):
                raise ReleaseError("broker.routing_mismatch", "subject names another action")
            return await self._dispatch(request)
        except (ReleaseError, SealingError, VerificationError) as exc:
            log.info("operator.refused", action=request.action, reason=exc.reason)
            return events.OperatorResponse(ok=False, reason=exc.reason)

    async def _dispatch(self, request: events.OperatorRequest) -> events.OperatorResponse:
        if request.action == "intake":
            return await self._intake_token()
        claims, kid = self._claims(request)
        if request.action == "secret-list":
            return events.OperatorResponse(
                ok=True, generation=await self.store.generation(), secrets=await self.store.list()
            )
        return await self._change(request, claims, kid)

    async def _intake_token(self) -> events.OperatorResponse:
        if self.signer is None:
            raise ReleaseError("broker.no_signing_key", "this broker cannot vouch for its key")
        now = int(self.clock().timestamp())
        public = self._intake.public_key().public_bytes_raw()
        token = self.signer.sign(
            {"sub": intake.INTAKE_SUBJECT, "intake": b64url(public), "iat": now, "exp": now + 300}
        )
        return events.OperatorResponse(
            ok=True, intake=token, generation=await self.store.generation()
        )

    def _claims(self, request: events.OperatorRequest) -> tuple[dict[str, Any], str]:
        """The operator's verified claims about exactly this request, and its key id."""
        claims = self.trusted.verify(
            request.token, accept=lambda name: name == intake.OPERATOR_SIGNER, now=self.clock()
        )
        now = self.clock().timestamp()
        issued, expires = claims.get("iat"), claims.get("exp")
        if not isinstance(issued, int) or not isinstance(expires, int):
            raise VerificationError("operator.token_malformed", "iat and exp must be integers")
        if issued > now + intake.MAX_CLOCK_SKEW_S or expires - issued > intake.TOKEN_LIFETIME_S:
            raise VerificationError("operator.token_lifetime", "issued ahead or lives too long")
        wanted = {"act": request.action, "jti": request.id}
        for name, value in wanted.items():
            if claims.get(name) != value:
                raise VerificationError("operator.token_mismatch", f"{name} differs")
        digest = intake.value_digest(request.enc, request.ciphertext)
        if not hmac.compare_digest(str(claims.get("digest", "")), digest):
            raise VerificationError("operator.token_mismatch", "digest differs")
        return claims, str(jws.split(request.token).kid)

    async def _change(
        self, request: events.OperatorRequest, claims: dict[str, Any], kid: str
    ) -> events.OperatorResponse:
        resource = claims.get("resource")
        generation = claims.get("generation")
        if not isinstance(resource, str) or not isinstance(generation, int):
            raise VerificationError("operator.token_malformed", "resource or generation")
        validate_name(resource)
        value = b""
        if request.action == "secret-put":
            value = release.unwrap(
                release.Wrapped(enc=request.enc, ciphertext=request.ciphertext),
                self._intake,
                info=intake.value_info(resource),
                aad=request.id.encode(),
            )
        elif request.enc or request.ciphertext:
            raise ReleaseError("broker.request_invalid", "a delete carries no value")
        elif resource not in await self.store.list():  # nothing to delete: not audited
            raise SealingError("broker.secret_not_found", repr(resource))
        if await self.store.generation() != generation:
            raise SealingError("broker.generation_moved", "re-read and sign again")
        outcome = _CHANGES[request.action]
        actor = f"{intake.OPERATOR_SIGNER}:{kid}"
        token_digest = hashlib.sha256(request.token.encode()).hexdigest()
        record = await self.audit.append(
            node=OPERATOR_NODE,
            resource=resource,
            decision_id=request.id,
            verdict_digest=token_digest,
            outcome=outcome,
            reason=f"operator.{outcome.value}",
            actor=actor,
        )
        try:
            if request.action == "secret-put":
                version = await self.store.put(resource, value, at_generation=generation)
            else:
                version = 0
                await self.store.delete(resource, at_generation=generation)
        except SealingError as exc:
            await self.audit.append(
                node=OPERATOR_NODE,
                resource=resource,
                decision_id=request.id,
                verdict_digest=token_digest,
                outcome=Outcome.REFUSED,
                reason=exc.reason,
                actor=actor,
            )
            raise
        log.info("operator.secret_changed", action=request.action, resource=resource)
        return events.OperatorResponse(
            ok=True,
            generation=await self.store.generation(),
            version=version,
            audit_id=str(record.seq),
        )
