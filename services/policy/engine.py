"""Rego evaluation with ``regopy``: compile once into a bundle, evaluate many times.

A plain ``query`` re-plans the policy on every call and grows with the reference data (about
10 ms at 100 values, 600 ms at 5,000); the compiled bundle answers in well under a millisecond
at either size, so the engine rebuilds only when the policy or the reference values change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import regopy

from services.mesh.errors import PolicyError

ENTRYPOINT = "attestmesh/release/decision"
QUERY = "x = data.attestmesh.release.decision"


def default_policy() -> str:
    """The packaged release policy."""
    return (resources.files("services.policy") / "policies" / "release.rego").read_text()


@dataclass(frozen=True)
class Outcome:
    allow: bool
    reasons: list[str]


class PolicyEngine:
    """One compiled policy plus its data (reference values and settings)."""

    def __init__(self, policy: str, data: dict[str, Any], *, policy_id: str = "default") -> None:
        self.policy_id = policy_id
        builder = regopy.Interpreter()
        try:
            builder.add_module("release.rego", policy)
            builder.add_data_json(json.dumps(data))
            self._bundle = builder.build(QUERY, [ENTRYPOINT])
        except regopy.RegoError as exc:
            raise PolicyError("policy.compile_failed", str(exc)[:500]) from None
        self._runner = regopy.Interpreter()

    def evaluate(self, document: dict[str, Any]) -> Outcome:
        """Evaluate the policy on ``document``; anything but a well-formed answer denies."""
        try:
            self._runner.set_input_term(json.dumps(document))
            output = self._runner.query_bundle_entrypoint(self._bundle, ENTRYPOINT)
        except (regopy.RegoError, ValueError) as exc:
            raise PolicyError("policy.evaluation_failed", str(exc)[:500]) from None
        try:
            result = json.loads(str(output))["expressions"][0]
            allow = result["allow"] is True
            reasons = [str(r) for r in result["reasons"]]
        except (ValueError, KeyError, IndexError, TypeError):
            raise PolicyError("policy.bad_output", str(output)[:200]) from None
        if allow and reasons:
            allow = False
        return Outcome(allow=allow, reasons=reasons)
