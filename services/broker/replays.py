"""The same answer to the same secret request, asked again.

Why: a node whose secret request is not answered in time sends the very same request again
(same bytes, same request id: :meth:`services.mesh.bus.Bus.request`). If the broker had
released the secret to the first copy, whose answer came too late or was lost, the repeat
used to be refused ``broker.already_released`` and the round failed, although nothing about
it was wrong. Now a repeat gets the first copy's answer:

* while the first copy is still being answered, the repeat waits for that answer instead of
  racing it (both run at once since requests are served concurrently);
* once released, the answer is kept for :data:`KEEP_S` seconds, keyed by the SHA-256 of the
  request's subject and bytes, so only a byte-identical request on the same subject
  (the same node, decision, resource, public key and request id) gets it. The answer holds
  the secret only HPKE-wrapped to the requester's key, with the request id as associated
  data; handing it out again tells nobody anything new and adds no audit record (the
  release was recorded once). Refusals are never kept: the next copy is decided afresh.

Before a kept answer is handed out again, the caller checks that it still holds
(``still_holds``): the broker confirms the node's current decision is still the one it was
released under and the secret is still the one released, so a revocation, a deletion or a
replacement takes effect for repeats too.

This is per broker process: a repeat that reaches another replica is still refused
``broker.already_released`` (its claim is shared, its answer is not: sharing it would put
wrapped secrets in the bucket). Memory is bounded by :data:`MAX_KEPT` answers and
:data:`MAX_KEPT_BYTES` of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from services.mesh import events

KEEP_S = 60.0
MAX_KEPT = 4096
MAX_KEPT_BYTES = 16 * 1024 * 1024


def request_key(subject: str, data: bytes) -> bytes:
    return hashlib.sha256(subject.encode() + b"\0" + data).digest()


class Replays:
    """Released answers by request, and the requests being answered right now."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._kept: OrderedDict[bytes, tuple[float, events.Message]] = OrderedDict()
        self._kept_bytes = 0
        self._running: dict[bytes, asyncio.Future[events.Message]] = {}
        self.replayed = 0

    def __repr__(self) -> str:
        return f"Replays(kept={len(self._kept)}, running={len(self._running)})"

    def _recall(self, key: bytes) -> events.Message | None:
        found = self._kept.get(key)
        if found is None:
            return None
        if self._clock() - found[0] > KEEP_S:
            self._forget(key)
            return None
        return found[1]

    def _keep(self, key: bytes, answer: events.Message) -> None:
        now = self._clock()
        self._forget(key)
        self._kept[key] = (now, answer)
        self._kept_bytes += _size(answer)
        while self._kept and (
            len(self._kept) > MAX_KEPT
            or self._kept_bytes > MAX_KEPT_BYTES
            or now - next(iter(self._kept.values()))[0] > KEEP_S
        ):
            self._forget(next(iter(self._kept)))

    def _forget(self, key: bytes) -> None:
        found = self._kept.pop(key, None)
        if found is not None:
            self._kept_bytes -= _size(found[1])

    async def answer(
        self,
        key: bytes,
        make: Callable[[], Awaitable[events.Message]],
        still_holds: Callable[[events.Message], Awaitable[bool]] | None = None,
    ) -> tuple[events.Message, bool]:
        """``make()``'s answer to this request, made once while a copy is running and
        replayed for :data:`KEEP_S` seconds if it released the secret and ``still_holds``
        says so; and whether it was a copy's (already counted) answer."""
        kept = self._recall(key)
        if kept is not None:
            if still_holds is None or await still_holds(kept):
                self.replayed += 1
                return kept, True
            self._forget(key)
        running = self._running.get(key)
        if running is not None:
            await asyncio.wait([running])
            if not running.cancelled():
                answer = running.result()
                self.replayed += 1
                return answer, True
            return await self.answer(key, make)  # the first copy was stopped: answer this one
        future: asyncio.Future[events.Message] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            answer = await make()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # marked retrieved: a copy nobody waits on logs nothing
            raise
        finally:
            del self._running[key]
        future.set_result(answer)
        if isinstance(answer, events.SecretResponse) and answer.ok:
            self._keep(key, answer)
        return answer, False


def _size(answer: events.Message) -> int:
    return len(answer.ciphertext) if isinstance(answer, events.SecretResponse) else 0
