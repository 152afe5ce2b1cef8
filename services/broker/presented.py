"""A decision presented with a secret request, recorded by the broker if it is the newest.

Why: the node receives its signed decision the moment the policy publishes it, while the
broker's own consumer records it some milliseconds later; a node that asked in between was
told ``broker.decision_pending`` and asked again, which was a third of a round at half load.
Now the node presents the token with its request. The broker verifies it as it verifies a
recorded one (the policy's key, this node, unexpired) and records it itself, but only if no
decision at least as new is stored for the node, by compare-and-set on the same key its
consumer writes. So:

* an older allow can never replace a newer decision, whether that arrived through the
  consumer or was presented; a replayed or delayed allow finds its successor stored and is
  refused as ``broker.decision_superseded``;
* only allow decisions are taken this way: a deny, a refusal or a re-appraisal is recorded
  by the consumer alone, which also announces the revocation and audits it;
* the consumer, meeting a decision already recorded this way, finds the same token stored
  (or, in the broker that recorded it, remembers it: :mod:`.recorded`).

A newer decision is written against the revision this broker last saw stored for the node
(:mod:`.recorded`) without reading first; any conflict falls back to the read below.

"Newer" is the policy's ``issued_us`` (microseconds), signed with the decision: ``iat`` has
whole seconds only, and a busy node re-attests several times a second. A token without it
(an older policy) counts as issued at the start of its second, so two such decisions from
the same second never replace each other here; the consumer's order decides them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from services.broker.recorded import Recorded, write_over
from services.mesh.errors import ReleaseError
from services.mesh.kv import KeyValue, WriteConflictError

MAX_ATTEMPTS = 16
_US = 1_000_000


class Ordered(Protocol):
    @property
    def decision_id(self) -> str: ...

    @property
    def order(self) -> int: ...


H = TypeVar("H", bound=Ordered)


def order_of(claims: Mapping[str, Any]) -> int:
    """When the decision was issued, in microseconds: ``issued_us`` if it lies within the
    signed ``iat`` second, else the start of that second."""
    iat = int(claims["iat"])
    precise = claims.get("issued_us")
    if isinstance(precise, bool) or not isinstance(precise, int):
        return iat * _US
    return precise if iat * _US <= precise < (iat + 1) * _US else iat * _US


async def adopt(
    state: KeyValue,
    key: str,
    raw: bytes,
    presented: H,
    read_stored: Callable[[bytes], H | None],
    *,
    memory: Recorded,
) -> H:
    """Record ``raw`` (the decision as the broker stores it, verified by the caller as
    ``presented``) under ``key`` unless a decision at least as new is stored there; return
    the node's decision afterwards: the presented one, or the stored one that wins over it.

    ``read_stored`` reads a stored decision (``None`` if it no longer verifies or has
    expired: it is then no decision at all, as the consumer treats it). ``memory`` is what
    this broker last saw under ``key``: a presented decision newer than that is written
    against its revision first, and whatever is read or written here is noted in it."""
    async with memory.turn(key):
        if await write_over(state, memory, key, raw, presented.order):
            return presented
        for _ in range(MAX_ATTEMPTS):
            current = await state.get(key)
            if current is not None:
                if current[0] == raw:
                    memory.note(key, raw, current[1], presented.order)
                    return presented
                stored = read_stored(current[0])
                if stored is not None:
                    memory.note(key, current[0], current[1], stored.order)
                    if stored.order >= presented.order:
                        return stored
            try:
                if current is None:
                    revision = await state.create(key, raw)
                else:
                    revision = await state.update(key, raw, current[1])
            except WriteConflictError:
                continue
            memory.note(key, raw, revision, presented.order)
            return presented
        raise ReleaseError("broker.write_conflict", "the node's decision kept changing")
