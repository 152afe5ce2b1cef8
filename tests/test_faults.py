"""Fault tests on real processes: ``kill -9`` of each service of a running ``attestmesh up``
in turn, with and without replicas; a 10 s outage of its nats-server; and, with replicas, the
operator tightening the policy, whose revocations must be counted as such, not as duplicates.

Each run is ``up`` as a user runs it (a subprocess with its own nats-server), nodes attesting
continuously; the faults come one at a time, each once the mesh recovered from the last
(``tests/faultrun.py``). Then Ctrl-C, the one-line JSON summary, and the release audit log
from outside (``attestmesh audit verify`` and ``list``, against the mesh's server brought
back on its store). Counted: per fault, the rounds attempted, failed and released until
every node had finished two rounds after it; per run, lost (accepted evidence that never got
a decision), duplicated (two distinct decisions), revoked, and releases: every secret the
nodes received is a release record in the audit log, none twice for one decision.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faultrun import LOST_REPLY, Phase, UpRun, cli

pytestmark = pytest.mark.slow

NODES = 6
SERVICES = ("verifier-snp", "verifier-nitro", "verifier-tpm", "policy", "broker")
DENY_ALL = (
    "package attestmesh.release\nimport rego.v1\n"
    'decision := {"allow": false, "reasons": ["all releases suspended"]}\n'
)


def _tighten_policy(run: UpRun, tmp_path: Path) -> Phase:
    """The operator signs a deny-all policy: every node's standing allow is withdrawn by a
    re-appraisal deny (a second decision on its evidence), and later rounds are denied. The
    phase lasts until every node has been denied once."""
    policy = tmp_path / "deny.rego"
    policy.write_text(DENY_ALL)

    def act() -> None:
        code, out, err = cli("policy", "set", str(policy), "--data-dir", str(run.data_dir))
        assert code == 0, out + err

    def denied_everyone(since: int) -> bool:
        denied = {r.node for r in run.rounds()[since:] if r.status != "none" and not r.released}
        return denied == set(run.nodes)

    return run.fault("policy tightened to deny all", act, denied_everyone, takes_effect_after=True)


@pytest.mark.parametrize("replicas", [1, 2])
def test_kill_9_of_each_service_in_turn_loses_and_duplicates_nothing(
    tmp_path: Path, replicas: int
) -> None:
    with UpRun(tmp_path, NODES, "--replicas", str(replicas)) as run:
        run.warm_up()
        assert len(run.pids()) == len(SERVICES) * replicas
        phases = [run.kill_service(victim) for victim in SERVICES]
        if replicas == 1:
            phases.append(run.outage(10.0))
        else:
            phases.append(run.kill_service("policy-2", hang=1.0))
            phases.append(_tighten_policy(run, tmp_path))
        summary = run.stop()
    released = run.audit_after_stop()

    victims = [p.name.rsplit(" ", 1)[1] for p in phases if "kill -9" in p.name]
    for phase in phases:
        print(phase.row())
    print(f"replicas {replicas}: {summary}; audit: {sum(released.values())} releases")
    # Each victim was noticed with its reason and restarted once; nothing else died.
    assert summary["service_exits"] == {"signal.sigkill": len(victims)}, run.stderr()[-2000:]
    assert summary["restarts"] == dict.fromkeys(victims, 1)
    # Nothing accepted was lost or decided twice, and every secret a node received is one
    # sealed release record (the audit chain verified), never two for one decision; the only
    # other records are releases whose reply was lost. A round refused as already released
    # may also have no record at all: the broker claimed the release, then could not append
    # its record (the server was down) and so never answered it (fail closed).
    assert summary["lost"] == 0 and summary["duplicated"] == 0, summary
    lost_replies = summary["failures_by_reason"].get(LOST_REPLY, 0)
    records = sum(released.values())
    assert summary["secrets_released"] <= records <= summary["secrets_released"] + lost_replies
    assert all(n == 1 for n in released.values())
    for phase in phases:
        # Whatever rounds failed name a stage or a lost reply, never a crash; a fault's
        # denies (if any) are the policy service failing closed.
        assert phase.unexplained == [], phase
        if "policy tightened" not in phase.name:
            assert phase.denied_unexpectedly == [], phase
        if replicas > 1 and "kill" in phase.name:
            # The surviving replica kept serving: at most the rounds the victim held in
            # flight were late, and they completed within the node's decision timeout.
            assert len(phase.failed) <= NODES, phase
    # Only the tightened policy revoked anyone, and those second decisions were not counted
    # as duplicates (above). Not necessarily every node: one whose fresh evidence was denied
    # before the re-evaluation reached it no longer had an allow to withdraw; and a node may
    # be revoked twice (an allow a replica still gave under the old policy, withdrawn when
    # that replica caught up).
    if replicas > 1:
        assert 1 <= summary["revoked"] <= summary["secrets_released"], summary
    else:
        assert summary["revoked"] == 0
