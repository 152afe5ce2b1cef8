"""The broker's resource policy: which attested node may have which secret.

The policy service decides whether a node is trustworthy at all (the appraisal policy);
this second operator-signed Rego document (key ``resources`` in the ``policies`` bucket,
package ``attestmesh.resource``; input in :mod:`services.policy.resource_policy`) decides,
for each secret request under an allow decision, whether that node may read that resource.
The packaged default allows ``default/*`` and the node's own ``<node>/*``.

Loaded, watched and refused like the appraisal policy (:class:`~services.policy.ledger.Ledger`):
only an operator-signed document newer than the one in force that compiles replaces it;
anything else (unsigned, foreign, tampered, rolled back, deleted, not compiling) is logged and
the last good document stays. The broker keeps answering whatever KV holds, but with no good
document, or while the bucket cannot be read, every release is refused with
:data:`UNAVAILABLE`: fail closed. It compiles once per document and evaluates per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec
import nats.errors

from services.mesh import subjects, telemetry
from services.mesh.bus import Bus
from services.mesh.errors import BusError, PolicyError
from services.mesh.keys import TrustedKeys
from services.mesh.natskv import NatsKeyValue
from services.policy import documents
from services.policy.documents import Document
from services.policy.engine import RESOURCE, Outcome, PolicyEngine
from services.policy.ledger import Ledger
from services.policy.release_policy import RESOURCE_KEY, validate_resource
from services.policy.resource_policy import ALL_CLAIMS, claims_read, request_input
from services.policy.summary import AppraisalSummary

log = telemetry.logger("broker")

UNAVAILABLE = "broker.resource_policy_unavailable"
FORBIDDEN = "broker.resource_forbidden"
FAILED = "broker.resource_policy_failed"
MAX_REMEMBERED_OUTCOMES = 16_384
REMEMBER_S = 60.0
"""An answer is asked again after this long, whatever the policy: a bound on any mistake in
:func:`deterministic`."""
_VARYING_BUILTINS = (
    "time.",
    "rand.",
    "uuid.",
    "http.",
    "net.",
    "opa.runtime",
    "trace(",
    "io.jwt.",
    "crypto.x509.",
)


def deterministic(source: str) -> bool:
    """Whether the policy's answer depends only on its input: Rego has no function values,
    so a builtin whose result varies (the clock, including the validity checks of JWT and
    X.509 builtins; randomness; the network) is named in the source wherever it is called,
    possibly with white space inside the reference (``time . now_ns``), which is taken out
    before looking. A policy naming none may have its answers remembered."""
    compact = "".join(source.split())
    return not any(name in compact for name in _VARYING_BUILTINS)
RETRY_BLOCKED_S = 2.0
HISTORY_TIMEOUT_S = 5.0
WATCH_POLL_S = 0.5

_READ_ERRORS = (BusError, nats.errors.Error, TimeoutError)


class ResourcePolicy:
    """The compiled resource policy in force, or why there is none."""

    def __init__(
        self, trusted: TrustedKeys, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self.ledger = Ledger(
            subjects.BUCKET_POLICIES, RESOURCE.reason, trusted, validate=validate_resource
        )
        self.engine: PolicyEngine | None = None
        self._outcomes: OrderedDict[bytes, tuple[float, Outcome]] | None = None
        """The outcome per input (by SHA-256), for the policy in force if it is
        :func:`deterministic`: a node re-attesting with the same claims asks the same question
        (evaluating it was about a tenth of the broker's CPU per release)."""
        self.claims: frozenset[str] | None = ALL_CLAIMS
        """The claims the policy in force can read (the others stay out of its input)."""
        self.blocked: str | None = UNAVAILABLE
        """Set: every release is refused with this reason."""
        self._digest = ""
        self._earlier: list[Document] = []
        """At start, the key's earlier signed versions, newest first: the last good one is
        among them when the newest does not compile."""

    @property
    def refusal(self) -> str | None:
        """Why the stored document is not in force (for status and tests), if it is not."""
        return self.ledger.refusals.get(RESOURCE_KEY)

    def prime(self, history: list[bytes]) -> None:
        """Learn the newest signed document from the key's retained history at start, so a
        writer who put back an older one cannot wait for a restart to have it adopted; keep
        the earlier signed ones in case the newest does not compile."""
        self.ledger.prime(RESOURCE_KEY, history)
        signed: list[Document] = []
        for raw in history:
            with contextlib.suppress(PolicyError):
                document = documents.open_signed(
                    raw,
                    self.ledger.trusted,
                    bucket=subjects.BUCKET_POLICIES,
                    key=RESOURCE_KEY,
                    kind=RESOURCE.reason,
                )
                validate_resource(document.payload)
                signed.append(document)
        self._earlier = sorted(signed, key=lambda d: d.version, reverse=True)

    def offer(self, raw: bytes | None) -> None:
        """The key's current KV value (``None``: absent); adopt it if it may replace the
        document in force and compiles, else keep the one in force."""
        offered = self.ledger.offer(RESOURCE_KEY, raw)
        candidates = [offered] if offered is not None else []
        previous = self.ledger.in_force(RESOURCE_KEY)
        if previous is not None and previous is not offered:
            candidates.append(previous)  # primed from history, never compiled yet
        if self.engine is None:  # nothing compiled yet: the newest earlier one that does
            candidates += [d for d in self._earlier if all(d is not c for c in candidates)]
        for candidate in candidates:
            refusal = self.ledger.refusals.get(RESOURCE_KEY)
            if self._adopt(candidate):
                if candidate is not offered and refusal is not None:
                    self.ledger.refusals[RESOURCE_KEY] = refusal  # the stored one still is not
                self._earlier = []
                return
        if self.engine is None:
            self._block(UNAVAILABLE, "no operator-signed resource policy compiles")
        else:
            self.blocked = None

    def block(self, detail: str) -> None:
        """The bucket cannot be read: refuse releases until a read succeeds (an operator's
        tightened policy could be what is unreadable)."""
        self._block(UNAVAILABLE, detail)

    def _adopt(self, document: Document) -> bool:
        if self.engine is not None and document.digest == self._digest:
            self.blocked = None
            return True
        policy_id = f"{RESOURCE_KEY}@v{document.version}"
        try:
            source = validate_resource(document.payload)
            engine = PolicyEngine(source, {}, policy_id=policy_id, kind=RESOURCE)
        except PolicyError as exc:
            self.ledger.refusals[RESOURCE_KEY] = exc.reason
            log.error(
                "resource_policy.refused",
                reason=exc.reason,
                version=document.version,
                detail=exc.detail[:300],
            )
            return False
        self.ledger.commit(document)
        self.engine, self._digest, self.blocked = engine, document.digest, None
        self.claims = claims_read(source)
        self._outcomes = OrderedDict() if deterministic(source) else None
        log.info(
            "resource_policy.loaded",
            policy_id=policy_id,
            signer=document.signer,
            claims="all" if self.claims is ALL_CLAIMS else sorted(self.claims),
        )
        return True

    def _block(self, reason: str, detail: str) -> None:
        if self.blocked != reason:
            log.error("resource_policy.blocked", reason=reason, detail=detail)
        self.blocked = reason

    def check(self, node: str, resource: str, appraisal: AppraisalSummary) -> str | None:
        """Why ``node`` may not have ``resource``, or ``None``; an evaluation error refuses."""
        engine = self.engine
        if self.blocked is not None or engine is None:
            return self.blocked or UNAVAILABLE
        document = request_input(node, resource, appraisal, claims=self.claims)
        memo = self._outcomes
        key = hashlib.sha256(msgspec.json.encode(document)).digest() if memo is not None else b""
        now = self._clock()
        kept = memo.get(key) if memo is not None else None
        if kept is not None and now - kept[0] <= REMEMBER_S:
            outcome = kept[1]
        else:
            try:
                outcome = engine.evaluate(document)
            except PolicyError as exc:
                log.error("resource_policy.evaluation_failed", reason=exc.reason)
                return FAILED
            if memo is not None:
                memo[key] = (now, outcome)
                memo.move_to_end(key)
                while len(memo) > MAX_REMEMBERED_OUTCOMES:
                    memo.popitem(last=False)
        if outcome.allow:
            return None
        log.info("resource_policy.denied", node=node, resource=resource, reasons=outcome.reasons)
        return FORBIDDEN


class ResourcePolicyWatch:
    """Keeps a :class:`ResourcePolicy` current from the ``policies`` bucket."""

    def __init__(self, bus: Bus, policy: ResourcePolicy) -> None:
        self.bus = bus
        self.policy = policy

    async def start(self) -> None:
        """Prime from history, then load; a failure leaves releases refused, never raises
        (the watch retries)."""
        try:
            self.policy.prime(await self._history())
        except _READ_ERRORS as exc:
            self.policy.block(f"reading the resource policy's history failed: {_describe(exc)}")
            return
        await self.reload()

    async def reload(self) -> None:
        try:
            kv = NatsKeyValue(await self.bus.key_value(subjects.BUCKET_POLICIES))
            entry = await kv.get(RESOURCE_KEY)
        except _READ_ERRORS as exc:
            self.policy.block(f"reading the resource policy failed: {_describe(exc)}")
            return
        self.policy.offer(entry[0] if entry else None)

    async def _history(self) -> list[bytes]:
        kv = await self.bus.key_value(subjects.BUCKET_POLICIES)
        watcher = await kv.watch(RESOURCE_KEY, include_history=True)
        found: list[bytes] = []
        try:
            while True:
                entry = await watcher.updates(timeout=HISTORY_TIMEOUT_S)
                if entry is None:
                    return found
                if entry.operation is None and entry.value:
                    found.append(entry.value)
        finally:
            with contextlib.suppress(*_READ_ERRORS):
                await watcher.stop()

    async def run(self, stop: asyncio.Event) -> None:
        """Reload on every change of the key, and every few seconds while releases are
        refused for want of a good document. A watcher that fails is made again; until it
        is, releases are refused, since a change made meanwhile would go unseen."""
        while not stop.is_set():
            try:
                await self._watch(stop)
            except Exception as exc:  # noqa: BLE001 - whatever broke the watch, fail closed
                self.policy.block(f"watching the resource policy failed: {_describe(exc)}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RETRY_BLOCKED_S)

    async def _watch(self, stop: asyncio.Event) -> None:
        kv = await self.bus.key_value(subjects.BUCKET_POLICIES)
        watcher: Any = await kv.watch(RESOURCE_KEY, include_history=False)
        loop = asyncio.get_running_loop()
        last_try = loop.time()
        initial_done = False
        try:
            while not stop.is_set():
                changed = False
                if self.policy.blocked is not None and loop.time() - last_try > RETRY_BLOCKED_S:
                    changed, last_try = True, loop.time()
                try:
                    entry = await watcher.updates(timeout=WATCH_POLL_S)
                except (TimeoutError, nats.errors.TimeoutError):
                    pass
                else:
                    if entry is None:
                        initial_done = changed = True  # catches writes made before watching
                    elif initial_done:
                        changed = True
                if changed:
                    await self.reload()
        finally:
            with contextlib.suppress(*_READ_ERRORS):
                await watcher.stop()


def _describe(exc: Exception) -> str:
    return exc.reason if isinstance(exc, BusError) else type(exc).__name__
