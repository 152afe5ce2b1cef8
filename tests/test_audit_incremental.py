"""Audit checkpoints and pruning cost the records written since the last checkpoint, not the
bucket: counted on the in-memory double (whose listing, like the real one, reads every key),
for one broker, for replicas sharing the bucket, and after a restart. The attacks the
shorter walk must still catch are in ``test_audit_incremental_attacks``."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.broker.audit import AuditLog, audit_key
from services.broker.checkpoint import CHECKPOINT_KEY
from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.errors import SealingError
from services.mesh.natskv import NatsKeyValue
from services.mesh.pace import EVERY as PACE_EVERY
from services.testing.memkv import CountingKeyValue
from tests.test_audit import BROKER, KEY, TRUSTED, Clock, append

OTHER_KEYS = 300
"""Keys of other kinds sharing the bucket (decisions, release claims, secrets)."""


class Counted(CountingKeyValue):
    """Also counts listings, read-on steps and purges: every call is a round trip."""

    def __init__(self) -> None:
        super().__init__()
        self.listings = self.scans = self.purges = 0

    async def keys(self, prefix: str = "", *, pause_s: float = 0.0) -> list[str]:
        self.listings += 1
        return await super().keys(prefix, pause_s=pause_s)

    async def next_write(self, prefix: str, after: int) -> tuple[str, bytes | None, int] | None:
        self.scans += 1
        return await super().next_write(prefix, after)

    async def purge_before(self, prefix: str, revision: int) -> None:
        self.purges += 1
        await super().purge_before(prefix, revision)

    def reset(self) -> None:
        self.reads = self.listings = self.scans = self.purges = 0


@pytest.fixture
def kv() -> Counted:
    bucket = Counted()
    for i in range(OTHER_KEYS):
        bucket.overwrite(f"decision.node-{i}", b"held")
    return bucket


def log_on(kv: Counted) -> AuditLog:
    return AuditLog(kv, KEY, clock=Clock(), signer=BROKER, trusted=TRUSTED)


async def grow(log: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        await append(log, i)


def retained(kv: Counted) -> list[int]:
    return sorted(int(key.split(".")[1]) for key in kv.snapshot() if key.startswith("audit."))


async def settled(kv: Counted, n: int, *, max_records: int = 10_000) -> AuditLog:
    """A log of ``n`` records that has checkpointed and pruned once (its one listing)."""
    log = log_on(kv)
    await grow(log, n)
    assert (await log.checkpoint()) is not None
    await log.prune(max_records)
    kv.reset()
    return log


@pytest.mark.parametrize("kept", [40, 400])
async def test_a_checkpoint_reads_only_the_new_records_whatever_the_log_holds(
    kv: Counted, kept: int
) -> None:
    log = await settled(kv, kept)
    await grow(log, 25, start=kept)
    kv.reset()
    made = await log.checkpoint()
    assert made is not None and made.seq == kept + 24
    assert kv.listings == 0
    assert kv.scans == 25 + 1  # each new record, then "nothing more"
    assert kv.reads == 3  # the stored checkpoint, the walk's first record, the store's check
    assert (await log.load_checkpoint()) == made


async def test_an_idle_checkpoint_costs_three_round_trips(kv: Counted) -> None:
    log = await settled(kv, 30)
    anchor = await log.load_checkpoint()
    kv.reset()
    assert await log.checkpoint() == anchor
    assert (kv.reads, kv.scans, kv.listings) == (2, 1, 0)
    assert kv.writes == OTHER_KEYS + 31  # nothing re-signed or re-stored


async def test_pruning_is_one_purge_and_no_listing(kv: Counted) -> None:
    log = await settled(kv, 50, max_records=20)
    assert retained(kv) == list(range(30, 50))
    await grow(log, 15, start=50)
    await log.checkpoint()
    kv.reset()
    assert await log.prune(20) == 15
    assert retained(kv) == list(range(45, 65))
    assert (kv.listings, kv.purges, kv.reads) == (0, 1, 3)  # checkpoint, its head, the cut
    kv.reset()
    assert await log.prune(20) == 0  # nothing due: only the checkpoint is read
    assert (kv.listings, kv.purges, kv.reads) == (0, 0, 1)
    assert await log_on(kv).verify_chain() == 1


async def test_a_fresh_process_lists_once_then_reads_on(kv: Counted) -> None:
    await settled(kv, 60, max_records=30)
    restarted = log_on(kv)
    kv.reset()
    await grow(restarted, 5, start=60)  # finding its head: one listing
    await restarted.checkpoint()  # the full check: one listing
    assert await restarted.prune(30) == 5
    assert kv.listings == 2
    for round_ in range(3):
        kv.reset()
        await grow(restarted, 10, start=65 + 10 * round_)
        made = await restarted.checkpoint()
        assert made is not None and made.seq == 74 + 10 * round_
        assert await restarted.prune(30) == 10
        assert kv.listings == 0
    assert retained(kv) == list(range(65, 95))
    assert await log_on(kv).verify_chain() == 1


async def test_an_empty_log_checkpoints_nothing_and_a_first_record_later(kv: Counted) -> None:
    log = log_on(kv)
    assert await log.checkpoint() is None
    assert await log.prune(5) == 0
    await grow(log, 3)
    made = await log.checkpoint()
    assert made is not None and made.seq == 2


async def test_a_replica_appending_between_checkpoints_is_read_on(kv: Counted) -> None:
    first = await settled(kv, 20)
    second = log_on(kv)
    await grow(second, 1, start=20)  # the replica finds the head once
    kv.reset()
    await asyncio.gather(*(append((first, second)[i % 2], i) for i in range(21, 41)))
    made = await first.checkpoint()
    assert made is not None and made.seq == 40
    assert kv.listings == 0 and kv.scans == 22  # records 20..40, then "nothing more"
    assert await log_on(kv).verify_chain() == 1


async def test_a_replicas_newer_checkpoint_is_walked_through(kv: Counted) -> None:
    first = await settled(kv, 20, max_records=15)
    second = log_on(kv)
    await grow(second, 10, start=20)
    ahead = await second.checkpoint()  # the replica's own first, full check
    assert ahead is not None and ahead.seq == 29
    await grow(first, 5, start=30)
    kv.reset()
    made = await first.checkpoint()  # from its own last head, through the replica's
    assert made is not None and made.seq == 34
    assert kv.listings == 0
    assert await first.prune(15) == 15
    kv.reset()
    await second.prune(15)  # the same cut: its purge finds nothing left to take
    assert (kv.listings, kv.purges) == (0, 1)
    assert retained(kv) == list(range(20, 35))
    assert await first.prune(5) == 10
    kv.reset()
    assert await second.prune(12) == 0  # its cut, 23, is gone: it lists to find out why
    assert kv.listings == 1
    assert retained(kv) == list(range(30, 35))


async def test_checkpoints_from_replicas_racing_keep_one_chain(kv: Counted) -> None:
    logs = [await settled(kv, 10)] + [log_on(kv) for _ in range(2)]
    for round_ in range(4):
        await asyncio.gather(
            *(append(logs[i % 3], i) for i in range(10 + 9 * round_, 19 + 9 * round_))
        )
        made = await asyncio.gather(*(log.checkpoint() for log in logs))
        assert {m.seq for m in made if m is not None} == {18 + 9 * round_}
        await asyncio.gather(*(log.prune(12) for log in logs))
    assert retained(kv) == list(range(34, 46))
    assert await log_on(kv).verify_chain() == 1


async def test_the_read_on_walk_on_a_real_bucket(bus: Bus) -> None:
    """The same walk on JetStream: appends read on without a listing, and a record deleted
    after the checkpoint (which leaves a marker there) still stops the next one."""
    kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
    log = AuditLog(kv, KEY, clock=Clock(), signer=BROKER, trusted=TRUSTED)
    await grow(log, 12)
    assert (await log.checkpoint()) is not None
    assert await log.prune(5) == 7

    async def no_listing(prefix: str = "", *, pause_s: float = 0.0) -> list[str]:
        raise AssertionError("listed the bucket")

    kv.keys = no_listing  # type: ignore[method-assign]
    await grow(log, 6, start=12)
    made = await log.checkpoint()
    assert made is not None and made.seq == 17
    assert await log.prune(5) == 6
    assert await kv.get(audit_key(12)) is None and await kv.get(audit_key(13)) is not None
    assert await kv.get(CHECKPOINT_KEY) is not None
    await grow(log, 3, start=18)
    await kv.delete(audit_key(19))
    del kv.keys  # the full check lists, and names the gap
    with pytest.raises(SealingError) as err:
        await log.checkpoint()
    assert err.value.reason == "broker.audit_chain_broken"


class SlowListing(Counted):
    """A listing that takes its time, as one over a large bucket does under load."""

    async def keys(self, prefix: str = "", *, pause_s: float = 0.0) -> list[str]:
        listed = await super().keys(prefix, pause_s=pause_s)
        await asyncio.sleep(0.05)
        return listed


async def test_a_first_checkpoint_under_load_is_not_mistaken_for_a_truncated_log() -> None:
    """Releases go on while a fresh broker lists its log. Records appended after the listing
    was taken are not in it; the log was once judged truncated for that
    (``broker.audit_truncated`` at every first checkpoint of a busy broker, so it never
    checkpointed, and so never pruned)."""
    kv = SlowListing()
    log = log_on(kv)
    await grow(log, 10)
    checkpointing = asyncio.ensure_future(log.checkpoint())
    await asyncio.sleep(0.01)
    await grow(log, 5, start=10)
    made = await checkpointing
    assert made is not None and made.seq == 9
    following = await log.checkpoint()
    assert following is not None and following.seq == 14


async def test_a_listing_short_of_what_this_process_wrote_before_it_is_still_truncation() -> None:
    kv = SlowListing()
    log = log_on(kv)
    await grow(log, 10)
    kv.remove(audit_key(9))  # removed without a trace, before the listing
    with pytest.raises(SealingError) as failed:
        await log.checkpoint()
    assert failed.value.reason == "broker.audit_truncated"


async def test_a_checkpoint_walk_is_paced_when_asked(kv: Counted) -> None:
    """A broker's checkpoint walk shares the event loop with its releases, so it pauses
    after every few reads (both the first, listing walk and the ones reading on)."""
    log = AuditLog(kv, KEY, clock=Clock(), signer=BROKER, trusted=TRUSTED, walk_pause_s=0.02)
    await grow(log, 4 * PACE_EVERY)
    started = time.perf_counter()
    made = await log.checkpoint()
    first = time.perf_counter() - started
    await grow(log, 4 * PACE_EVERY, start=4 * PACE_EVERY)
    started = time.perf_counter()
    following = await log.checkpoint()
    second = time.perf_counter() - started
    assert made is not None and following is not None and following.seq == 8 * PACE_EVERY - 1
    assert first >= 4 * 0.02 and second >= 3 * 0.02
