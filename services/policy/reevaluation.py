"""Tightened rules take effect at once: on a policy or reference-value change, every node's
allowed verdict is appraised again, and a node that no longer passes is revoked.

Why not wait for the next re-attestation: a decision stays valid for minutes, and an operator
who withdraws a measurement (a vulnerable firmware build) or switches to a deny-all policy
means now. The verdicts behind the current allow decisions live in the ``appraisals`` bucket,
which every policy replica reads, so whichever replica sees the change first acts on it (the
others' identical decisions are de-duplicated by id). Like a re-appraisal against changed
collateral, this can only withdraw trust: it publishes deny decisions, never allows.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import datetime

import msgspec

from services.mesh import events, telemetry
from services.mesh.errors import ParseError, VerificationError
from services.mesh.keys import TrustedKeys
from services.mesh.kv import KeyValue, WriteConflictError
from services.verifier import ear

log = telemetry.logger("policy")

MAX_REMEMBERED = 65_536
REASON = "policy.tightened"
"""The reason a re-evaluation's deny carries before the policy's own reasons."""

Evaluate = Callable[[events.Verdict, ear.Result], tuple[bool, list[str]]]
Publish = Callable[[events.Verdict, ear.Result, list[str]], Awaitable[None]]


class _Entry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A node's allow: the signed verdict, when it was accepted, and when the decision made
    on it expires (the verdict's own token may expire first: its lifetime is the verifier's,
    counted from an earlier moment; the decision is what must be withdrawable while valid)."""

    verdict: bytes
    accepted_at: datetime
    decision_expires_at: datetime


class Standing:
    """The verdict behind each node's current allow decision (node -> :class:`_Entry`)."""

    def __init__(self, kv: KeyValue, trusted: TrustedKeys, clock: Callable[[], datetime]) -> None:
        self._kv = kv
        self._trusted = trusted
        self._clock = clock
        self._written: OrderedDict[str, int] = OrderedDict()
        """The revision of this replica's last write per node (bounded): the next write
        for the node is tried against it before the entry is read back."""

    async def allowed(
        self, verdict: events.Verdict, *, accepted_at: datetime, decision_expires_at: datetime
    ) -> None:
        """Remember the verdict an allow decision was made on (the node's latest).

        A node re-attests again and again, mostly through the same replica, so the write is
        first tried against the revision this replica wrote last; only if the entry changed
        since (another replica, a re-evaluation) is it read back first."""
        node = verdict.node
        payload = msgspec.msgpack.encode(
            _Entry(
                verdict=events.encode(verdict),
                accepted_at=accepted_at,
                decision_expires_at=decision_expires_at,
            )
        )
        last = self._written.pop(node, None)
        if last is not None:
            with contextlib.suppress(WriteConflictError):
                self._wrote(node, await self._kv.update(node, payload, last))
                return
        found = await self._kv.get(node)
        if found is None:
            self._wrote(node, await self._kv.create(node, payload))
        else:
            self._wrote(node, await self._kv.update(node, payload, found[1]))

    def _wrote(self, node: str, revision: int) -> None:
        self._written[node] = revision
        while len(self._written) > MAX_REMEMBERED:
            self._written.popitem(last=False)

    async def denied(self, node: str) -> None:
        """The node's latest decision is a deny: nothing of it is left to withdraw.

        The entry this replica wrote last is removed by compare-and-set, unread; anything
        else is read first, so a node with no standing costs no delete marker."""
        last = self._written.pop(node, None)
        if last is not None:
            with contextlib.suppress(WriteConflictError):
                await self._kv.delete(node, last_revision=last)
                return
        if await self._kv.get(node) is not None:
            await self._kv.delete(node)

    async def reevaluate(self, evaluate: Evaluate, publish: Publish) -> int:
        """Appraise every remembered verdict again; deny (and forget) those that no longer
        pass. Returns how many nodes were denied. A listing error raises: the caller logs it
        and tries again at the next change, and the decisions' expiry still bounds them."""
        denied = 0
        for node in await self._kv.keys():
            found = await self._kv.get(node)
            if found is None:
                continue
            try:
                entry = msgspec.msgpack.decode(found[0], type=_Entry)
                if entry.decision_expires_at <= self._clock():
                    raise VerificationError("reevaluation.expired", "the decision has expired")
                verdict = events.decode(entry.verdict, events.Verdict)
                # Signature and signer now; lifetime as when the verdict was accepted.
                result = ear.read(verdict.ear, self._trusted, now=entry.accepted_at)
            except (ParseError, VerificationError, msgspec.DecodeError) as exc:
                # Its decision expired, or unreadable: nothing left to withdraw.
                reason = exc.reason if isinstance(exc, ParseError | VerificationError) else "bad"
                log.info("reevaluation.dropped", node=node, reason=reason)
                with contextlib.suppress(WriteConflictError):
                    await self._kv.delete(node, last_revision=found[1])
                continue
            allow, reasons = evaluate(verdict, result)
            if allow:
                continue
            await publish(verdict, result, [REASON, *reasons])
            with contextlib.suppress(WriteConflictError):  # allowed again meanwhile: keep it
                await self._kv.delete(node, last_revision=found[1])
            denied += 1
        if denied:
            log.warning("reevaluation.revoked", nodes=denied)
        return denied
