"""Collects every check and every violation of one verification, instead of stopping at the first.

Shared DCAP code names its reasons ``dcap.<what>``; the family that owns the appraisal rewrites
the prefix (``tdx.quote_signature_invalid``), so one code path serves TDX and SGX while verdicts
speak the family's vocabulary. A failure is either an *integrity* failure (a signature, chain,
revocation or collateral that does not hold: the evidence is not verified) or a *policy* one
(the evidence is authentic but unacceptable: debug, TCB status, report data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from services.verifier.families.base import Check, Reason, Status

PREFIX = "dcap."


@dataclass
class Findings:
    """Checks for the human-readable report and reasons for the verdict, in order."""

    checks: list[Check] = field(default_factory=list)
    reasons: list[Reason] = field(default_factory=list)
    integrity_ok: bool = True
    valid_from: datetime | None = None
    valid_until: datetime | None = None

    def window(self, start: datetime | None, end: datetime | None) -> None:
        """Narrow the span of time in which every validity window checked so far is open.

        Findings made at a time inside that span are the same at any other time inside it,
        which is what lets a verifier reuse them.
        """
        if start is not None and (self.valid_from is None or start > self.valid_from):
            self.valid_from = start
        if end is not None and (self.valid_until is None or end < self.valid_until):
            self.valid_until = end

    def holds_at(self, now: datetime) -> bool:
        """True when ``now`` is inside the span of :meth:`window` (always, if none was set)."""
        return (self.valid_from is None or self.valid_from <= now) and (
            self.valid_until is None or now <= self.valid_until
        )

    def extend(self, other: Findings) -> None:
        """Append ``other``'s checks and reasons (and its integrity) to these."""
        self.checks.extend(other.checks)
        self.reasons.extend(other.reasons)
        self.integrity_ok = self.integrity_ok and other.integrity_ok

    def passed(self, name: str, detail: str = "") -> None:
        self.checks.append(Check(name, True, detail))

    def failed(
        self,
        name: str,
        code: str,
        message: str,
        *,
        status: Status = Status.CONTRAINDICATED,
        integrity: bool = True,
    ) -> None:
        """Record a failed check and the reason it gives the verdict."""
        self.checks.append(Check(name, False, message))
        self.reasons.append(Reason(code, message, status))
        if integrity:
            self.integrity_ok = False

    def expect(self, ok: bool, name: str, code: str, message: str, detail: str = "") -> bool:
        """:meth:`passed` or :meth:`failed` (integrity) depending on ``ok``; returns ``ok``."""
        if ok:
            self.passed(name, detail)
        else:
            self.failed(name, code, message)
        return ok

    def note(self, code: str, message: str, status: Status) -> None:
        """A reason that is not a failed check (e.g. an advisory behind a warning)."""
        self.reasons.append(Reason(code, message, status))

    def for_family(self, family: str) -> list[Reason]:
        """The reasons with the shared ``dcap.`` prefix replaced by ``family.``."""
        return [
            Reason(family + "." + r.code[len(PREFIX) :], r.message, r.status)
            if r.code.startswith(PREFIX)
            else r
            for r in self.reasons
        ]
