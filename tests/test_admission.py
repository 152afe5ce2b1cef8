"""No new round while the stages behind the nonce are backed up (``services/policy/admission.py``),
read from JetStream's own consumer counts on a real nats-server."""

from __future__ import annotations

import asyncio

import nats
import pytest

from services.mesh import events, subjects
from services.mesh.bus import Bus
from services.mesh.errors import ParseError
from services.mesh.responder import BUSY
from services.mesh.server import NatsServer
from services.policy.admission import (
    BURST,
    HEADROOM,
    MAX_RETRY_AFTER_S,
    MIN_BACKLOG,
    MIN_RATE,
    MIN_RETRY_AFTER_S,
    OTHER_FAMILIES,
    PACE_FROM,
    STALE_AFTER_S,
    Admission,
)
from services.testing.mesh import TestMesh


async def _nonce(bus: Bus, node: str, family: str) -> events.Message:
    request = events.NonceRequest(node=node, family=family)
    msg = await bus.nc.request(subjects.nonce(node), events.encode(request), timeout=5.0)
    try:
        return events.decode(msg.data, events.NonceChallenge)
    except ParseError:  # a refusal is the other answer
        return events.decode(msg.data, events.Refusal)


async def _poll_until(admission: Admission, family: str, at_least: int) -> None:
    """Poll until the server's counts show the backlog (they may trail a publish)."""
    for _ in range(100):
        await admission.poll_once()
        if admission.backlog(family) >= at_least:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"backlog {admission.backlog(family)} never reached {at_least}")


async def _verifiers(bus: Bus, *families: str) -> None:
    """The families' verifier consumers, as their workers declare them."""
    for family in families:
        await bus.js.add_consumer(
            subjects.STREAM_EVIDENCE,
            durable_name=f"verifier-{family}",
            filter_subject=subjects.evidence_family(family),
        )


async def _stall_snp_verifier(mesh: TestMesh, bus: Bus, waiting: int) -> None:
    """The SNP verifier stops; ``waiting`` evidence messages pile up on its consumer."""
    await mesh.halt("verifier-snp")
    for index in range(waiting):
        await bus.js.publish(subjects.evidence("snp", f"node-{index}"), b"{}")


async def test_a_backed_up_family_gets_busy_and_the_others_do_not(mesh: TestMesh, bus: Bus) -> None:
    assert mesh.policy is not None and mesh.policy.admission is not None
    admission = mesh.policy.admission
    admission.max_backlog = 3
    await admission.poll_once()
    assert isinstance(await _nonce(bus, "node-a", "snp"), events.NonceChallenge)
    await _stall_snp_verifier(mesh, bus, 4)
    await _poll_until(admission, "snp", 4)
    refused = await _nonce(bus, "node-a", "snp")
    assert isinstance(refused, events.Refusal) and refused.reason == BUSY
    assert isinstance(await _nonce(bus, "node-b", "tdx"), events.NonceChallenge)
    assert isinstance(await _nonce(bus, "node-c", ""), events.NonceChallenge)
    admission.max_backlog = 100
    assert isinstance(await _nonce(bus, "node-a", "snp"), events.NonceChallenge)


async def test_a_stale_reading_admits(bus: Bus) -> None:
    now = [0.0]
    admission = Admission(bus.js, max_backlog=1, clock=lambda: now[0])
    await bus.js.add_consumer(
        subjects.STREAM_EVIDENCE,
        durable_name="verifier-snp",
        filter_subject=subjects.evidence_family("snp"),
    )
    await bus.js.publish(subjects.evidence("snp", "node-s"), b"{}")
    await _poll_until(admission, "snp", 1)
    assert not admission.admits("snp")
    now[0] = STALE_AFTER_S + 1
    assert admission.admits("snp")


async def test_a_stage_that_stopped_delivering_admits_nothing_behind_it(bus: Bus) -> None:
    admission = Admission(bus.js, max_backlog=1000, max_wait_s=1.0)
    await bus.js.add_consumer(
        subjects.STREAM_EVIDENCE,
        durable_name="verifier-snp",
        filter_subject=subjects.evidence_family("snp"),
    )
    for index in range(MIN_BACKLOG):
        await bus.js.publish(subjects.evidence("snp", f"node-{index}"), b"{}")
    await _poll_until(admission, "snp", MIN_BACKLOG)
    admission = Admission(bus.js, max_backlog=1000, max_wait_s=1.0)
    await admission.poll_once()  # a first reading of a backlog the server already shows
    assert admission.backlog("snp") >= MIN_BACKLOG
    assert admission.admits("snp")  # no rate known yet: the count alone decides
    await asyncio.sleep(0.05)
    await admission.poll_once()  # nothing delivered since: the stage has stopped
    assert admission.wait_s("snp") >= MIN_BACKLOG / MIN_RATE
    assert not admission.admits("snp")
    assert admission.admits("tdx")


async def test_an_unreadable_backlog_admits(nats_server: NatsServer) -> None:
    closed = await nats.connect(nats_server.url)
    admission = Admission(closed.jetstream(), max_backlog=1)
    await closed.close()
    await admission.poll_once()
    assert admission.admits("snp") and admission.backlog("snp") == 0


def test_the_family_named_in_a_nonce_request_is_bounded() -> None:
    for bad in ("SNP", "a" * 33, "snp.x", "snp>"):
        raw = events.encode(events.NonceRequest(node="node-a")).replace(
            b'"family":""', f'"family":"{bad}"'.encode()
        )
        try:
            events.decode(raw, events.NonceRequest)
        except ParseError as exc:
            assert exc.reason.startswith("wire."), bad
        else:
            raise AssertionError(f"{bad!r} was accepted")


def _report(waiting: int, served: int) -> events.LoadReport:
    return events.LoadReport(replica="b1", waiting=waiting, served=served)


async def test_a_backed_up_broker_holds_back_every_family(bus: Bus) -> None:
    now = [0.0]
    admission = Admission(bus.js, max_backlog=1000, max_wait_s=1.0, clock=lambda: now[0])
    admission.on_report("broker", _report(40, 100))
    assert admission.admits("snp")  # no rate known yet
    now[0] = 0.5
    admission.on_report("broker", _report(40, 110))  # 20/s: two seconds to drain 40
    assert admission.backlog("snp") == 40 and admission.wait_s("tdx") == pytest.approx(2.0)
    assert not admission.admits("snp") and not admission.admits("")
    now[0] = 1.0
    admission.on_report("broker", _report(40, 210))  # catching up: about 0.4 s now
    assert admission.admits("snp")
    now[0] = 1.0 + STALE_AFTER_S + 1  # a replica gone quiet no longer counts
    assert admission.backlog("snp") == 0


async def test_a_busy_mesh_admits_at_the_rate_its_slowest_stage_drains(bus: Bus) -> None:
    """Nodes refused while the mesh was backed up come back together; paced, they are let in
    at the rate the stages drain, not all at once."""
    now = [0.0]
    admission = Admission(bus.js, max_backlog=1000, max_wait_s=1.0, clock=lambda: now[0])
    await _verifiers(bus, "snp", "tdx")
    await admission.poll_once()
    admission.on_report("broker", _report(MIN_BACKLOG + 4, 100))
    now[0] = 0.5
    admission.on_report("broker", _report(MIN_BACKLOG + 4, 120))  # 40/s, 0.5 s to drain
    burst = [admission.admits("snp") for _ in range(int(BURST) + 5)]
    assert burst.count(True) == BURST and not any(burst[int(BURST) :])
    now[0] = 0.625  # 1/8 s at 40/s with its headroom (50/s): six more
    later = [admission.admits("snp") for _ in range(8)]
    assert later == [True] * 6 + [False] * 2
    assert HEADROOM * 40 == 50
    assert admission.admits("tdx")  # every family has its own pace
    admission.on_report("broker", _report(MIN_BACKLOG - 1, 130))
    assert all(admission.admits("snp") for _ in range(50))  # not busy: no pacing
    now[0] = 1.0
    admission.on_report("broker", _report(MIN_BACKLOG + 4, 130 + 40))  # a third of a second
    assert admission.wait_s("snp") < PACE_FROM * admission.max_wait_s
    assert all(admission.admits("snp") for _ in range(50))  # a short queue: no pacing


async def test_the_refused_are_told_to_come_back_as_fast_as_rounds_are_admitted(
    bus: Bus,
) -> None:
    admission = Admission(bus.js, max_backlog=1000, max_wait_s=1.0)
    await _verifiers(bus, "snp", "tdx")
    await admission.poll_once()
    assert admission.retry_after_ms("snp") == MIN_RETRY_AFTER_S * 1000
    admission.on_report("broker", _report(1000, 0))  # backed up: every round refused
    hints = []
    for _ in range(8):
        assert not any(admission.admits("snp") for _ in range(10))
        await admission.poll_once()
        hints.append(admission.retry_after_ms("snp"))
    assert hints == sorted(hints) and hints[0] > MIN_RETRY_AFTER_S * 1000
    assert hints[-1] == MAX_RETRY_AFTER_S * 1000  # grows, within its bound
    assert admission.retry_after_ms("tdx") == MIN_RETRY_AFTER_S * 1000  # not asked: no change
    admission.on_report("broker", _report(0, 0))  # room again: nothing refused
    for _ in range(8):
        assert admission.admits("snp")
        await admission.poll_once()
    assert admission.retry_after_ms("snp") == MIN_RETRY_AFTER_S * 1000


async def test_made_up_families_share_one_pace_and_cannot_push_out_a_real_one(bus: Bus) -> None:
    """The family is the node's word: a flood of invented names gets no state of its own."""
    admission = Admission(bus.js, max_backlog=1000, max_wait_s=1.0)
    await _verifiers(bus, "snp")
    await admission.poll_once()
    admission.on_report("broker", _report(1000, 0))
    for _ in range(3):
        assert not any(admission.admits("snp") for _ in range(10))
        await admission.poll_once()
    grown = admission.retry_after_ms("snp")
    assert grown > MIN_RETRY_AFTER_S * 1000
    admission.on_report("broker", _report(0, 0))
    for _ in range(3):  # junk only: the real family's hint is not reset, nor its entry gone
        assert all(admission.admits(f"junk-{i}") for i in range(200))
        await admission.poll_once()
    assert admission.retry_after_ms("snp") == grown
    assert set(admission._retry_after) <= {"snp", OTHER_FAMILIES}
    assert set(admission._buckets) <= {"snp", OTHER_FAMILIES}


async def test_broker_replicas_drain_side_by_side(bus: Bus) -> None:
    """Two replicas at 50/s each are one stage at 100/s: neither's share is the pace."""
    now = [0.0]
    admission = Admission(bus.js, max_backlog=1000, max_wait_s=1.0, clock=lambda: now[0])
    await _verifiers(bus, "snp")
    await admission.poll_once()
    for replica in ("b1", "b2"):
        admission.on_report("broker", events.LoadReport(replica=replica, waiting=30, served=0))
    now[0] = 0.5
    for replica in ("b1", "b2"):
        admission.on_report("broker", events.LoadReport(replica=replica, waiting=30, served=25))
    assert admission.backlog("snp") == 60
    assert admission.wait_s("snp") == pytest.approx(0.6)  # 60 at 100/s, not 0.6 + 0.6
    assert sum(admission.admits("snp") for _ in range(40)) == BURST
    now[0] = 0.625  # 1/8 s at 1.25 x 100/s
    assert sum(admission.admits("snp") for _ in range(40)) == 15


async def test_a_busy_nonce_answer_names_when_to_come_back(mesh: TestMesh, bus: Bus) -> None:
    assert mesh.policy is not None and mesh.policy.admission is not None
    admission = mesh.policy.admission
    admission.on_report("broker", _report(admission.max_backlog, 0))
    refused = await _nonce(bus, "node-a", "snp")
    assert isinstance(refused, events.Refusal) and refused.reason == BUSY
    assert refused.retry_after_ms == admission.retry_after_ms("snp") > 0


async def test_a_burst_after_a_quiet_spell_is_not_judged_by_the_quiet_pace(bus: Bus) -> None:
    """An idle stage delivers what it is offered, not what it can do: 32 nodes starting
    together were refused for up to 0.95 s on the pace of the quiet spell before."""
    now = [0.0]
    admission = Admission(bus.js, max_backlog=1000, max_wait_s=1.0, clock=lambda: now[0])
    admission.on_report("broker", _report(0, 0))
    now[0] = 0.5
    admission.on_report("broker", _report(40, 5))  # quiet until now: 10/s says nothing
    assert admission.wait_s("snp") == 0.0 and admission.admits("snp")
    now[0] = 1.0
    admission.on_report("broker", _report(40, 55))  # busy throughout: 100/s is its pace
    assert admission.wait_s("snp") == pytest.approx(0.4)
    for at in (1.5, 2.0):  # a busy stage that stops: its pace halves each reading
        now[0] = at
        admission.on_report("broker", _report(40, 55))
    assert admission.wait_s("snp") == pytest.approx(1.6)
    assert not admission.admits("snp")


async def test_the_policy_hears_the_brokers_load(mesh: TestMesh) -> None:
    assert mesh.policy is not None and mesh.policy.admission is not None
    admission = mesh.policy.admission
    for _ in range(50):
        if admission._reported:
            break
        await asyncio.sleep(0.05)
    assert [key.split("/")[0] for key in admission._reported] == ["broker"]
