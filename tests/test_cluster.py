"""A real three-server JetStream cluster on loopback: streams and buckets at three replicas
keep every acknowledged message when any one server is killed (SIGKILL, no goodbye), clients
fail over to the survivors, and the killed server rejoins and catches up; and ``attestmesh up
--cluster 3`` under load, with and without service replicas, loses nothing when it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import nats.errors
import pytest

from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.cluster import LocalCluster, client_url, replicas_for, server_urls
from services.mesh.errors import AttestmeshError, ConfigError
from tests.faultrun import LOST_REPLY, UpRun

pytestmark = pytest.mark.slow
T = TypeVar("T")


def test_replicas_and_urls_follow_the_cluster_size() -> None:
    assert [replicas_for(n) for n in (1, 2, 3, 5)] == [1, 1, 3, 3]
    with pytest.raises(ConfigError):
        replicas_for(0)
    url = client_url(["nats://127.0.0.1:1", "nats://127.0.0.1:2"])
    assert server_urls(url) == ["nats://127.0.0.1:1", "nats://127.0.0.1:2"]
    assert server_urls(" nats://a:1 ") == ["nats://a:1"]
    with pytest.raises(ConfigError):
        server_urls(" , ")


async def connect_cluster(cluster: LocalCluster) -> Bus:
    """Connect and declare at R3 once the cluster has elected its JetStream meta leader."""
    bus = await Bus.connect(cluster.url, "test", wait=30.0)
    deadline = time.monotonic() + 30
    while True:
        try:
            await bus.setup(nonce_ttl=60.0, replicas=cluster.replicas)
            return bus
        except (AttestmeshError, nats.errors.Error, TimeoutError):  # no meta leader yet
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _publish(bus: Bus, subject: str, msg_id: str, deadline: float) -> None:
    """Publish until JetStream acknowledges it (retries keep the id: de-duplicated)."""
    while True:
        try:
            await bus.js.publish(subject, msg_id.encode(), headers={"Nats-Msg-Id": msg_id})
            return
        except (nats.errors.Error, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _retrying(op: Callable[[], Awaitable[T]], deadline: float) -> T:
    """A KV call while the cluster settles after a member rejoined (a timeout is retried)."""
    while True:
        try:
            return await op()
        except (nats.errors.Error, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _stream_ids(bus: Bus, subject: str, expected: int, deadline: float) -> list[str]:
    """Every message on ``subject`` in stream order. A cluster that just lost and regained a
    member may answer slowly: the read is retried from the start until it has at least
    ``expected`` messages (then a quiet second shows there are no extras) or time runs out."""
    found: list[str] = []
    while time.monotonic() < deadline:
        found = []
        try:
            sub = await bus.js.subscribe(subject, ordered_consumer=True)
        except (nats.errors.Error, TimeoutError):
            await asyncio.sleep(0.5)
            continue
        try:
            while True:
                wait = 1.0 if len(found) >= expected else max(deadline - time.monotonic(), 0.1)
                try:
                    msg = await sub.next_msg(timeout=wait)
                except (nats.errors.TimeoutError, TimeoutError):
                    break
                found.append(msg.data.decode())
        finally:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await sub.unsubscribe()
        if len(found) >= expected:
            return found
    return found


async def test_losing_any_one_server_loses_no_acknowledged_message(
    cluster: LocalCluster,
) -> None:
    bus = await connect_cluster(cluster)
    try:
        info = await bus.js.stream_info(subjects.STREAM_EVIDENCE)
        assert info.config.num_replicas == 3
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        kv = await bus.key_value(subjects.BUCKET_REFVALUES)
        await kv.put("before", b"1")

        acked: list[str] = []
        deadline = time.monotonic() + 60
        subject = "attest.evidence.snp.node-c"
        for i in range(300):
            if i == 100:
                cluster.servers[1].kill()
            if i == 200:
                cluster.servers[1].start()  # rejoins on its old ports and store
            msg_id = f"m{i:04d}"
            await _publish(bus, subject, msg_id, deadline)
            acked.append(msg_id)

        settle = time.monotonic() + 60
        stored = await _stream_ids(bus, subject, len(acked), settle)
        assert stored == acked, "a message was lost, duplicated or reordered"
        assert (await _retrying(lambda: kv.get("before"), settle)).value == b"1"
        await _retrying(lambda: kv.put("after", b"2"), settle)

        # The restarted server catches up: every replica current again.
        for _ in range(60):
            info = await _retrying(lambda: bus.js.stream_info(subjects.STREAM_EVIDENCE), settle)
            replicas = info.cluster.replicas if info.cluster else None
            if replicas and len(replicas) == 2 and all(r.current for r in replicas):
                break
            await asyncio.sleep(0.5)
        else:
            raise AssertionError(f"replicas never caught up: {info.cluster}")
    finally:
        await bus.close()


NODES = 4


@pytest.mark.parametrize("replicas", [1, 2])
def test_up_on_a_cluster_survives_a_kill_9_of_one_server(tmp_path: Path, replicas: int) -> None:
    """``attestmesh up --cluster 3`` under load, with one process per service or two: one
    nats-server is killed (SIGKILL), ``up`` restarts it and it rejoins; then the policy
    service (one of its replicas) is killed too (``tests/faultrun.py``). No accepted evidence
    is lost or decided twice; the release audit chain verifies against the running cluster
    and holds every release the nodes had counted when it was read, none twice."""
    with UpRun(tmp_path, NODES, "--cluster", "3", "--replicas", str(replicas)) as run:
        run.warm_up()
        phases = [run.kill_server("n2"), run.kill_service("policy")]
        counted = sum(r.released for r in run.rounds())
        released = run.audit()
        summary = run.stop()
    for phase in phases:
        print(phase.row())
    audited = sum(released.values())
    print(f"cluster, replicas {replicas}: {summary}; {counted} counted, {audited} audited")
    assert summary["restarts"] == {"nats-n2": 1, "policy": 1}, (summary, run.stderr()[-2000:])
    assert summary["service_exits"] == {"signal.sigkill": 1}
    assert "nats-n2 exited; restarting" in run.stderr()
    assert summary["lost"] == 0 and summary["duplicated"] == 0, summary
    assert all(n == 1 for n in released.values())
    lost_replies = summary["failures_by_reason"].get(LOST_REPLY, 0)
    assert counted <= audited <= summary["secrets_released"] + lost_replies
    for phase in phases:
        assert phase.unexplained == [] and phase.denied_unexpectedly == [], phase


async def test_enroll_admits_a_node_to_every_member_of_an_up_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every member reads the one authorization file, so every member must reload it: the
    new node may then connect to whichever server it reaches first."""
    from services.cli import main as cli
    from services.embedded import prepare, provision_identities
    from services.mesh import authconf

    data_dir = tmp_path / "data"
    provision_identities(data_dir, 0)
    running = LocalCluster(
        data_dir / "nats-cluster", size=3, config_file=authconf.server_config_path(data_dir)
    )
    running.start()
    try:
        prepare(data_dir, running.url, jetstream_replicas=running.replicas)
        out = tmp_path / "edge"
        argv = ["node", "enroll", "edge-9", "--data-dir", str(data_dir), "--out", str(out)]
        assert await asyncio.to_thread(cli, argv) == 0
        assert "reloaded" in capsys.readouterr().out
        seed = str(out / "node-edge-9.nk")
        for server in running.servers:
            bus = None
            for _ in range(50):  # each reload is asynchronous
                try:
                    bus = await Bus.connect(
                        server.url,
                        "node-edge-9",
                        wait=0.5,
                        nkey_seed_file=seed,
                        inbox_prefix=subjects.node_inbox("edge-9"),
                    )
                    break
                except AttestmeshError:
                    await asyncio.sleep(0.1)
            assert bus is not None, f"{server.url} did not admit the enrolled node"
            await bus.close()
    finally:
        running.stop()
