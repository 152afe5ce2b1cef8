"""What ``attestmesh up`` reports about its rounds: which stage went silent, and the summary.

A node cannot see verdicts (its NATS identity may not), so when its decision never comes it
only knows that (``collector.decision_timeout``). ``up`` runs as the operator, which may watch
verdicts and decisions, so :class:`StageWatch` tells the two silent stages apart: no verdict
for the evidence means the verifier did not answer (``collector.no_verdict``), a verdict but
no decision means the policy service did not (``collector.no_decision``), and a decision the
node gave up on before it came is ``collector.decision_late``. The same record counts, at
the end, evidence that never got any decision (lost) and evidence that got more than one
distinct decision (duplicated).

One second decision is not a duplicate: a re-appraisal's deny, which withdraws an allow when
the policy, the reference values or the collateral changed (it names the same evidence, under
its own id). It is counted apart (revoked), but only if the policy service's signed token says
it is one; a watch without the policy key, or a token that does not verify, counts it as a
duplicate, so a forged "re-appraisal" cannot hide a real duplicate.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg

from services.collector.decisions import POLICY_SIGNER
from services.collector.service import RoundResult
from services.mesh import events, subjects
from services.mesh.bus import Bus
from services.mesh.errors import ParseError, VerificationError
from services.mesh.keys import TrustedKeys

TIMEOUT = "collector.decision_timeout"
NO_VERDICT = "collector.no_verdict"
NO_DECISION = "collector.no_decision"
DECISION_LATE = "collector.decision_late"
MAX_TRACKED = 100_000
"""Evidence ids remembered (oldest forgotten first): bounds memory in a continuous run."""


class StageWatch:
    """Verdicts and decisions seen on the bus, by evidence id."""

    def __init__(
        self, *, trusted: TrustedKeys | None = None, max_tracked: int = MAX_TRACKED
    ) -> None:
        """``trusted`` holds the policy service's key, to tell its re-appraisal denies from
        second decisions; without it every second decision counts as duplicated."""
        self.trusted = trusted
        self.max_tracked = max_tracked
        self.verdicts: OrderedDict[str, None] = OrderedDict()
        self.decisions: OrderedDict[str, set[str]] = OrderedDict()
        self.revocations: OrderedDict[str, set[str]] = OrderedDict()
        """Evidence id -> ids of the re-appraisal denies that withdrew its decision."""
        self.ignored = 0

    async def start(self, bus: Bus) -> None:
        await bus.nc.subscribe(subjects.VERDICT_ALL, cb=self.on_verdict)
        await bus.nc.subscribe(subjects.DECISION_ALL, cb=self.on_decision)

    def _remember(self, table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.max_tracked:
            table.popitem(last=False)

    async def on_verdict(self, msg: Msg) -> None:
        try:
            verdict = events.decode(msg.data, events.Verdict)
        except ParseError:
            self.ignored += 1
            return
        self._remember(self.verdicts, verdict.evidence_id, None)

    async def on_decision(self, msg: Msg) -> None:
        try:
            decision = events.decode(msg.data, events.Decision)
        except ParseError:
            self.ignored += 1
            return
        table = self.revocations if self._is_revocation(decision) else self.decisions
        seen = table.get(decision.evidence_id, set())
        seen.add(decision.id)
        self._remember(table, decision.evidence_id, seen)

    def _is_revocation(self, decision: events.Decision) -> bool:
        """A deny the policy service signed as a re-appraisal of this very evidence. Only
        denies are checked (the rare case), so a busy run pays for no extra signatures."""
        if self.trusted is None or decision.allow or decision.refused:
            return False
        try:
            # Read whenever it arrives: a count does not care whether the deny has expired.
            claims = self.trusted.verify(
                decision.token, accept=lambda name: name == POLICY_SIGNER, now=decision.expires_at
            )
        except VerificationError:
            return False
        return (
            claims.get("reappraisal") is True
            and claims.get("allow") is False
            and claims.get("jti") == decision.id
            and claims.get("evidence_id") == decision.evidence_id
        )

    def attribute(self, result: RoundResult) -> RoundResult:
        """A timed-out round, with the stage that did not answer as its reason."""
        if result.reason != TIMEOUT or not result.evidence_id:
            return result
        if result.evidence_id in self.decisions:
            reason = DECISION_LATE
        elif result.evidence_id in self.verdicts:
            reason = NO_DECISION
        else:
            reason = NO_VERDICT
        return dataclasses.replace(result, reason=reason)

    def unanswered(self, results: list[RoundResult]) -> list[str]:
        """Evidence the mesh accepted that has had no decision at all (so far)."""
        return [
            r.evidence_id
            for r in results
            if r.evidence_id and r.status == "none" and r.evidence_id not in self.decisions
        ]

    def duplicated(self, results: list[RoundResult]) -> int:
        """Evidence answered by more than one distinct decision (a redelivery is not one:
        decisions are derived from the verdict, so a repeat carries the same id)."""
        ids = {r.evidence_id for r in results if r.evidence_id}
        return sum(1 for e in ids if len(self.decisions.get(e, ())) > 1)

    def revoked(self, results: list[RoundResult]) -> int:
        """Evidence whose decision a re-appraisal later withdrew."""
        ids = {r.evidence_id for r in results if r.evidence_id}
        return sum(1 for e in ids if e in self.revocations)

    def late(self, results: list[RoundResult]) -> int:
        return sum(1 for r in results if r.status == "none" and r.evidence_id in self.decisions)


def completed(result: RoundResult) -> bool:
    """A decision came, and if it allowed a release, the secret came too."""
    return result.status != "none" and (result.released or not result.allowed)


@dataclass
class Summary:
    nodes: int
    results: list[RoundResult] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)
    """Restarts of each service process."""
    service_exits: dict[str, int] = field(default_factory=dict)
    """Service process deaths, by reason (``signal.sigkill``, ``exit.1``)."""
    lost: int = 0
    duplicated: int = 0
    revoked: int = 0
    """Evidence whose allow a re-appraisal withdrew (a policy or collateral change): a second
    decision, but not a duplicate."""
    late_decisions: int = 0

    def to_json(self) -> dict[str, Any]:
        latencies = sorted(r.latency_ms for r in self.results if r.released)
        failures = [r for r in self.results if not completed(r)]
        return {
            "nodes": self.nodes,
            "attestations": len(self.results),
            "verdicts": dict(Counter(r.status for r in self.results)),
            "decisions": sum(1 for r in self.results if r.status != "none"),
            "secrets_released": sum(1 for r in self.results if r.released),
            "latency_ms": {
                "p50": round(_percentile(latencies, 50), 2),
                "p99": round(_percentile(latencies, 99), 2),
                "max": round(latencies[-1], 2) if latencies else 0.0,
            },
            "failed": len(failures),
            "failures_by_reason": dict(Counter(r.reason for r in failures)),
            "restarts": dict(sorted(self.restarts.items())),
            "service_exits": dict(sorted(self.service_exits.items())),
            "late_decisions": self.late_decisions,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "revoked": self.revoked,
        }


def _percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(pct) - 1]
