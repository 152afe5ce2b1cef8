"""What the policy service decides with: the compiled release policy in force, or a reason
to deny everything.

The engine is rebuilt from the ``policies`` and ``refvalues`` buckets whenever they change,
through the :class:`~services.policy.ledger.Ledger` of each, so only operator-signed, newer
documents ever take effect. Failure never loosens anything:

* an entry that is refused (unsigned, foreign, rolled back, tampered) or a policy that does
  not compile leaves the last good version in force;
* with no good policy at all, every decision is a deny with ``policy.unavailable``;
* a failed read of either bucket blocks decisions (``policy.unavailable`` /
  ``policy.refvalues_unavailable``) until a read succeeds (:attr:`Loader.read_failed` lets the
  service defer a fresh verdict for a while first rather than deny, and so revoke, a node
  over a server's failover), and so do a family's stored
  reference values refused with no good version in force: evaluating with missing
  reference values would let any measurement through.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import nats.errors

from services.mesh import events, outage, subjects, telemetry
from services.mesh.errors import BusError, PolicyError
from services.mesh.keys import TrustedKeys
from services.mesh.kv import KeyValue
from services.policy import refvalues, release_policy
from services.policy.documents import Document
from services.policy.engine import PolicyEngine
from services.policy.ledger import Ledger
from services.policy.release_policy import POLICY_KEY

log = telemetry.logger("policy")

UNAVAILABLE = "policy.unavailable"
REFVALUES_UNAVAILABLE = "policy.refvalues_unavailable"

_READ_ERRORS = (BusError, nats.errors.Error)
"""``nats.errors.Error`` too: a bucket error the KV seam does not map must still block."""


History = Callable[[str], Awaitable[dict[str, list[bytes]]]]
"""Per bucket: every key's retained earlier values (deletions left out)."""


class Loader:
    def __init__(
        self,
        policies: KeyValue,
        refs: KeyValue,
        trusted: TrustedKeys,
        *,
        settings: dict[str, Any],
        history: History | None = None,
        clock: Callable[[], datetime] = events.utcnow,
    ) -> None:
        self.policies = policies
        self.clock = clock
        self.expires_next: datetime | None = None
        """When a reference value in force next expires: the engine is rebuilt then
        (:meth:`refresh`), so an expired value stops counting without a KV change."""
        self.refs = refs
        self.settings = settings
        self.history = history
        self._primed = history is None
        self.policy_ledger = Ledger(
            subjects.BUCKET_POLICIES, "policy", trusted, validate=release_policy.validate
        )
        self.ref_ledger = Ledger(
            subjects.BUCKET_REFVALUES, "refvalues", trusted, validate=refvalues.validate
        )
        self.engine: PolicyEngine | None = None
        self.read_failed = False
        """The last reload could not read the buckets: what blocks decisions may pass."""
        self.read_unanswered = False
        """That failure was a server not answering (a failover), not a refusal such as a
        missing bucket: worth waiting out before spending a verdict's deliveries on it."""
        self.blocked: str | None = UNAVAILABLE
        """Set: every decision is a deny with this reason (nothing good is known, or the
        buckets cannot be read right now)."""
        self._fingerprint: tuple[str, tuple[tuple[str, str], ...], str] | None = None
        self._in_force: tuple[Document, dict[str, Document]] | None = None
        self.unusable_refvalues: dict[str, str] = {}
        """Families whose stored reference values were refused with none good in force (a
        service that starts after they were overwritten): their decisions are denied, as
        going without reference values would let every measurement through."""

    def blocked_for(self, family: str) -> list[str]:
        """Why a decision for ``family`` must be a deny whatever the policy says (or [])."""
        if self.blocked is not None or self.engine is None:
            return [self.blocked or UNAVAILABLE]
        refusal = self.unusable_refvalues.get(family)
        return [REFVALUES_UNAVAILABLE, refusal] if refusal else []

    async def reload(self) -> None:
        """Read both buckets and rebuild. ``read_failed`` changes only once the reads are
        over: replicas' handlers reload concurrently, and one must not see another's read
        half done as a failure."""
        try:
            entry = await self.policies.get(POLICY_KEY)
        except _READ_ERRORS as exc:
            self._read_failure(UNAVAILABLE, "reading the policy failed", exc)
            return
        try:
            stored = await refvalues.read_all(self.refs)
        except _READ_ERRORS as exc:
            self._read_failure(REFVALUES_UNAVAILABLE, "reading reference values failed", exc)
            return
        if not self._primed:
            try:
                await self._prime()
            except _READ_ERRORS as exc:
                self._read_failure(UNAVAILABLE, "reading KV history failed", exc)
                return
        self.read_failed = False
        policy = self.policy_ledger.offer(POLICY_KEY, entry[0] if entry else None)
        refs: dict[str, Document] = {}
        unusable: dict[str, str] = {}
        for family in sorted(set(stored) | self.ref_ledger.keys()):
            document = self.ref_ledger.offer(family, stored.get(family))
            if document is not None:
                refs[family] = document
            else:
                unusable[family] = self.ref_ledger.refusals.get(family, "refvalues.invalid")
        self.unusable_refvalues = unusable
        if policy is None:
            self._block(UNAVAILABLE, "no operator-signed policy has been accepted")
            return
        candidates = [policy]
        previous = self.policy_ledger.in_force(POLICY_KEY)
        if previous is not None and previous is not policy:
            candidates.append(previous)
        for candidate in candidates:
            if self._adopt(candidate, refs):
                return
        if self.engine is None:
            self._block(UNAVAILABLE, "no signed policy compiles")
        else:
            self.blocked = None

    async def _prime(self) -> None:
        """At start, learn the newest signed documents from the buckets' history: without
        it, a writer could put back an older signed policy (or delete reference values)
        and wait for a replica to restart. History is bounded (the buckets keep a few
        values per key), so this narrows that window rather than closing it."""
        assert self.history is not None
        for key, values in (await self.history(subjects.BUCKET_POLICIES)).items():
            if key == POLICY_KEY:
                self.policy_ledger.prime(key, values)
        for key, values in (await self.history(subjects.BUCKET_REFVALUES)).items():
            self.ref_ledger.prime(key, values)
        self._primed = True

    def refresh(self) -> None:
        """Rebuild the engine if a reference value in force has expired since it was built.

        Called before each evaluation; costs a comparison unless something expired. The
        rebuild uses the documents already in force (no KV read), so it cannot fail on the
        bus; if the policy no longer compiles with the shrunken data, decisions block."""
        now = self.clock()
        if self.expires_next is None or now < self.expires_next or self._in_force is None:
            return
        policy, refs = self._in_force
        if not self._adopt(policy, refs):
            self.engine = None
            self._block(UNAVAILABLE, "the policy does not compile without expired values")

    def _adopt(self, policy: Document, refs: dict[str, Document]) -> bool:
        now = self.clock()
        stored = {f: refvalues.validate(d.payload) for f, d in refs.items()}
        live = {f: refvalues.effective(v, now) for f, v in stored.items()}
        fingerprint = (
            policy.digest,
            tuple((f, d.digest) for f, d in sorted(refs.items())),
            repr(sorted(live.items())),
        )
        if fingerprint == self._fingerprint and self.engine is not None:
            self.blocked = None
            return True
        data = {"refvalues": live, "settings": self.settings}
        policy_id = f"{POLICY_KEY}@v{policy.version}"
        try:
            engine = PolicyEngine(
                release_policy.validate(policy.payload), data, policy_id=policy_id
            )
        except PolicyError as exc:
            self.policy_ledger.refusals[POLICY_KEY] = exc.reason
            log.error(
                "policy.refused", reason=exc.reason, version=policy.version, detail=exc.detail[:300]
            )
            return False
        self.policy_ledger.commit(policy)
        for document in refs.values():
            self.ref_ledger.commit(document)
        self.engine, self._fingerprint, self.blocked = engine, fingerprint, None
        self._in_force = (policy, dict(refs))
        expiries = [e for v in stored.values() if (e := refvalues.next_expiry(v, now))]
        self.expires_next = min(expiries, default=None)
        log.info(
            "policy.loaded",
            policy_id=policy_id,
            signer=policy.signer,
            refvalues={f: d.version for f, d in refs.items()},
        )
        return True

    def _read_failure(self, reason: str, what: str, exc: Exception) -> None:
        self.read_failed = True
        self.read_unanswered = outage.unanswered(exc)
        self._block(reason, f"{what}: {_describe(exc)}")

    def _block(self, reason: str, detail: str) -> None:
        if self.blocked != reason:
            log.error("policy.blocked", reason=reason, detail=detail)
        self.blocked = reason


def _describe(exc: Exception) -> str:
    return exc.reason if isinstance(exc, BusError) else type(exc).__name__
