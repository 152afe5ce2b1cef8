"""``attestmesh policy check``: compile a release or resource policy and run its Rego tests,
offline.

Tests are the ``test_*`` rules of the ``*_test.rego`` files beside the policy, as with
``opa test``: a test passes when its rule is true. regopy has no test runner, so each rule
is queried as ``data.<package>.<rule>``. A test module whose package is the *other* kind's
(``attestmesh.resource_test`` beside a release policy, say) is left out, so both policies
and their tests can share a directory.

Each test runs in a child process of its own. The interpreter is native code, and some
valid Rego (the ``with`` keyword over rules that call other rules, in the regopy version
this project pins) crashes the process rather than raising; a crash in the child is a
failed test (``crashed``), never a crashed command and never a pass. Children are bounded
in time, and their count and the files' sizes are bounded.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.mesh.errors import ConfigError, PolicyError
from services.policy import release_policy
from services.policy.engine import KINDS, RELEASE, PolicyEngine, PolicyKind

MAX_TEST_FILES = 32
MAX_TESTS = 200
TEST_TIMEOUT_S = 10.0
CHECK_DATA: dict[str, Any] = {"refvalues": {}, "settings": {}}
"""The data a policy is compiled and tested with: tests supply their own with ``with``."""
_PACKAGE = re.compile(r"^package\s+([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*$", re.M)
_MESSAGE = re.compile(r"^([^\n]+)\n-- ([^\s:]+:\d+:\d+)$", re.M)
"""The interpreter's human-readable errors: a message, then ``-- file:line:col``."""
_TEST_RULE = re.compile(r"^(test_[A-Za-z0-9_]*)\b(?=\s*(?:if\b|\{|:=|=|contains\b))", re.M)


@dataclass(frozen=True)
class RegoTestResult:
    file: str
    name: str
    outcome: str
    """``pass``, ``fail`` (false or undefined), ``error`` (an evaluation error) or ``crashed``."""
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.outcome == "pass"


@dataclass(frozen=True)
class CheckResult:
    source: str
    tests: list[RegoTestResult]

    @property
    def ok(self) -> bool:
        return all(t.passed for t in self.tests)


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(release_policy.MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise ConfigError("cli.unreadable", f"{path}: {exc.strerror}") from None
    return data


def compile_policy(raw: bytes, name: str | None = None, kind: PolicyKind = RELEASE) -> str:
    """The policy source if it is bounded UTF-8 that compiles as a ``kind`` policy;
    ``PolicyError`` carrying the compiler's messages (``file:line:col: message``) otherwise."""
    name = name or kind.filename
    source = release_policy.validate(raw, kind)
    answer = _child({"modules": {name: source}, "query": None, "kind": kind.name})
    if answer.get("outcome") != "pass":
        # The engine names its module after the kind whatever the file is called.
        detail = str(answer.get("detail", "")).replace(f"{kind.filename}:", f"{name}:")
        raise PolicyError(f"{kind.reason}.compile_failed", detail[:1000])
    return source


def _other_kinds(package: str, kind: PolicyKind) -> bool:
    """Whether a test module of ``package`` tests a policy of another kind than ``kind``."""
    return any(
        package in (other.package, f"{other.package}_test")
        or package.startswith(f"{other.package}.")
        for other in KINDS
        if other is not kind
    )


def find_test_files(policy: Path) -> list[Path]:
    """The ``*_test.rego`` files beside ``policy`` (bounded in number)."""
    try:
        found = sorted(p for p in policy.parent.glob("*_test.rego") if p.is_file())
    except OSError as exc:
        raise ConfigError("cli.unreadable", f"{policy.parent}: {exc.strerror}") from None
    if len(found) > MAX_TEST_FILES:
        raise ConfigError("policy.too_many_tests", f"more than {MAX_TEST_FILES} test files")
    return [p for p in found if p.resolve() != policy.resolve()]


def find_test_rules(source: str) -> tuple[str, list[str]]:
    """The package of a test module and its ``test_`` rule names (each once, in order)."""
    package = _PACKAGE.search(source)
    if package is None:
        raise PolicyError("policy.test_invalid", "a test file without a package")
    return package.group(1), list(dict.fromkeys(_TEST_RULE.findall(source)))


def check(policy: Path, kind: PolicyKind = RELEASE) -> CheckResult:
    """Compile ``policy`` as a ``kind`` policy, then run every test beside it; ``PolicyError``
    if it does not compile. A test module that does not compile fails each of its tests
    (``error``)."""
    source = compile_policy(_read(policy), policy.name, kind)
    plan: list[tuple[str, str, str, str]] = []
    for path in find_test_files(policy):
        text = release_policy.validate(_read(path), kind)
        package, names = find_test_rules(text)
        if _other_kinds(package, kind):
            continue
        plan.extend((path.name, package, name, only_test(text, name)) for name in names)
    if len(plan) > MAX_TESTS:
        raise PolicyError(f"{kind.reason}.too_many_tests", f"more than {MAX_TESTS} tests")
    results = [
        _run_one({policy.name: source, file: text}, file, package, name)
        for file, package, name, text in plan
    ]
    return CheckResult(source, results)


def only_test(source: str, name: str) -> str:
    """``source`` with every top-level ``test_`` rule but ``name`` left out.

    Each test then runs with only its own rule beside the helpers, so one test the
    interpreter cannot cope with fails alone rather than taking its neighbours with it.
    Top-level statements start in the first column (as ``opa fmt`` writes them).
    """
    kept: list[str] = []
    keep = True
    for line in source.splitlines():
        if line[:1] not in ("", " ", "\t", "}", "]", ")"):
            match = _TEST_RULE.match(line)
            keep = match is None or match.group(1) == name
        kept.append(line if keep else "")
    return "\n".join(kept) + "\n"


def _run_one(modules: dict[str, str], file: str, package: str, name: str) -> RegoTestResult:
    answer = _child({"modules": modules, "query": f"x = data.{package}.{name}"})
    outcome = str(answer.get("outcome", "error"))
    return RegoTestResult(file, name, outcome, str(answer.get("detail", ""))[:300])


def _child(request: dict[str, Any]) -> dict[str, Any]:
    try:
        done = subprocess.run(
            [sys.executable, "-m", "services.policy.regotest"],
            input=json.dumps(request).encode(),
            capture_output=True,
            timeout=TEST_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"outcome": "error", "detail": f"no result within {TEST_TIMEOUT_S:.0f} s"}
    if done.returncode < 0:
        died = f"the Rego interpreter died (signal {-done.returncode})"
        return {"outcome": "crashed", "detail": died}
    text = done.stdout.decode(errors="replace")
    lines = text.strip().splitlines()
    try:
        # The interpreter prints compile errors to stdout itself; the answer is the last line.
        answer: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    except ValueError:
        return {"outcome": "crashed", "detail": f"the Rego interpreter exited {done.returncode}"}
    located = _MESSAGE.findall(text)
    if located and answer.get("outcome") != "pass":
        answer["detail"] = "; ".join(f"{where}: {message.strip()}" for message, where in located)
    return answer


def _evaluate(request: dict[str, Any]) -> dict[str, str]:
    """In the child: load the modules, then run the query (``None``: compile the policy as
    the policy service does)."""
    import regopy

    if request["query"] is None:
        ((name, source),) = request["modules"].items()
        kind = next((k for k in KINDS if k.name == request.get("kind")), RELEASE)
        try:
            PolicyEngine(source, CHECK_DATA, policy_id=name, kind=kind)
        except PolicyError as exc:
            return {"outcome": "error", "detail": exc.detail}
        return {"outcome": "pass"}
    interpreter = regopy.Interpreter()
    try:
        for name, text in request["modules"].items():
            interpreter.add_module(name, text)
        interpreter.add_data_json(json.dumps(CHECK_DATA))
        output = str(interpreter.query(request["query"]))
    except regopy.RegoError as exc:
        return {"outcome": "error", "detail": str(exc)}
    if output.strip() == "undefined":
        return {"outcome": "fail", "detail": "undefined"}
    try:
        bindings = json.loads(output)["bindings"]
    except (ValueError, KeyError, TypeError):
        return {"outcome": "error", "detail": output[:300]}
    if bindings.get("x") is True:
        return {"outcome": "pass"}
    return {"outcome": "fail", "detail": json.dumps(bindings.get("x"))[:300]}


if __name__ == "__main__":
    sys.stdout.write(json.dumps(_evaluate(json.loads(sys.stdin.buffer.read()))))
