"""The sealed, hash-chained release audit log."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from services.broker import checkpoint
from services.broker.audit import GENESIS, AuditLog, Outcome, audit_key
from services.broker.sealing import AeadKey, seal
from services.mesh.errors import ConfigError, SealingError
from services.mesh.keys import SigningKey, TrustedKeys
from services.testing.memkv import CountingKeyValue, MemoryKeyValue

KEY = AeadKey(b"\x05" * 32)
DIGEST = hashlib.sha256(b"verdict").hexdigest()
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def kv() -> MemoryKeyValue:
    return MemoryKeyValue()


def new_log(kv: MemoryKeyValue) -> AuditLog:
    return AuditLog(kv, KEY, clock=Clock())


async def append(log: AuditLog, i: int = 0, /, **overrides: Any) -> None:
    fields: dict[str, Any] = {
        "node": f"node-{i}",
        "resource": "default/node-key",
        "decision_id": f"dec-{i}",
        "verdict_digest": DIGEST,
        "outcome": Outcome.RELEASED,
        "trace_id": TRACE,
    }
    fields.update(overrides)
    await log.append(**fields)


async def filled(kv: MemoryKeyValue, n: int) -> AuditLog:
    log = new_log(kv)
    for i in range(n):
        await append(log, i)
    return log


async def test_append_and_read_back(kv: MemoryKeyValue) -> None:
    log = await filled(kv, 3)
    await append(log, 3, outcome=Outcome.REFUSED, reason="policy.nonce_replayed", trace_id="")
    entries = await log.entries()
    assert [e.seq for e in entries] == [0, 1, 2, 3]
    assert [e.node for e in entries] == ["node-0", "node-1", "node-2", "node-3"]
    assert entries[0].prev == GENESIS
    assert entries[0].time == T0 + timedelta(seconds=1)
    assert entries[3].outcome is Outcome.REFUSED
    assert entries[3].reason == "policy.nonce_replayed"
    assert await log.verify_chain() == 4
    assert sorted(kv.snapshot()) == [audit_key(i) for i in range(4)]


async def test_chain_links_sealed_blobs(kv: MemoryKeyValue) -> None:
    log = await filled(kv, 2)
    entries = await log.entries()
    assert entries[1].prev == hashlib.sha256(kv.raw(audit_key(0))).digest()


async def test_records_are_sealed(kv: MemoryKeyValue) -> None:
    await filled(kv, 1)
    blob = kv.raw(audit_key(0))
    assert b"node-0" not in blob and b"default/node-key" not in blob


async def test_empty_log_verifies(kv: MemoryKeyValue) -> None:
    assert await new_log(kv).verify_chain() == 0


async def test_restart_continues_the_chain(kv: MemoryKeyValue) -> None:
    await filled(kv, 3)
    log = new_log(kv)
    await append(log, 3)
    assert await log.verify_chain() == 4


async def test_deleted_middle_record_detected(kv: MemoryKeyValue) -> None:
    await filled(kv, 4)
    kv.remove(audit_key(1))
    with pytest.raises(SealingError) as err:
        await new_log(kv).verify_chain()
    assert err.value.reason == "broker.audit_chain_broken"


async def test_deleted_first_record_detected(kv: MemoryKeyValue) -> None:
    await filled(kv, 3)
    kv.remove(audit_key(0))
    with pytest.raises(SealingError, match="audit_chain_broken"):
        await new_log(kv).entries()


async def test_reordered_records_detected(kv: MemoryKeyValue) -> None:
    await filled(kv, 3)
    first, second = kv.raw(audit_key(1)), kv.raw(audit_key(2))
    kv.overwrite(audit_key(1), second)
    kv.overwrite(audit_key(2), first)
    with pytest.raises(SealingError) as err:
        await new_log(kv).verify_chain()
    assert err.value.reason == "broker.seal_tampered"


async def test_resealed_record_with_wrong_link_detected(kv: MemoryKeyValue) -> None:
    """Even someone holding the data key cannot drop a record without breaking the chain."""
    log = await filled(kv, 3)
    entries = await log.entries()
    forged = msgspec.structs.replace(entries[2], seq=1, prev=GENESIS)
    blob = seal(KEY, msgspec.msgpack.encode(forged), purpose="audit", name=audit_key(1), version=1)
    kv.overwrite(audit_key(1), blob)
    kv.remove(audit_key(2))
    with pytest.raises(SealingError) as err:
        await new_log(kv).verify_chain()
    assert err.value.reason == "broker.audit_chain_broken"


async def test_record_byte_flips_detected(kv: MemoryKeyValue) -> None:
    await filled(kv, 2)
    original = kv.raw(audit_key(1))
    for i in range(0, len(original), 7):
        bad = bytearray(original)
        bad[i] ^= 0x10
        kv.overwrite(audit_key(1), bytes(bad))
        with pytest.raises(SealingError):
            await new_log(kv).verify_chain()
    kv.overwrite(audit_key(1), original)
    assert await new_log(kv).verify_chain() == 2


async def test_truncated_tail_detected_by_a_running_log(kv: MemoryKeyValue) -> None:
    log = await filled(kv, 3)
    kv.remove(audit_key(2))
    with pytest.raises(SealingError) as err:
        await log.verify_chain()
    assert err.value.reason == "broker.audit_truncated"


async def test_stray_audit_key_detected(kv: MemoryKeyValue) -> None:
    await filled(kv, 1)
    kv.overwrite("audit.x", b"junk")
    with pytest.raises(SealingError, match="audit_chain_broken"):
        await new_log(kv).verify_chain()


async def test_wrong_key_cannot_read(kv: MemoryKeyValue) -> None:
    await filled(kv, 1)
    with pytest.raises(SealingError, match="wrong_key"):
        await AuditLog(kv, AeadKey.generate()).entries()


async def test_concurrent_replicas_append_one_chain(kv: MemoryKeyValue) -> None:
    logs = [new_log(kv) for _ in range(3)]
    await asyncio.gather(*(append(logs[i % 3], i) for i in range(15)))
    entries = await logs[0].entries()
    assert len(entries) == 15
    assert sorted(e.node for e in entries) == sorted(f"node-{i}" for i in range(15))


async def test_concurrent_appends_in_one_process_take_turns() -> None:
    """Each append is one create: none races another from the same head (which would cost
    a failed write and a read per loser), and the records' times follow their order."""
    kv = CountingKeyValue()
    log = new_log(kv)
    await append(log, 0)
    before = kv.calls.copy()
    await asyncio.gather(*(append(log, i) for i in range(1, 16)))
    assert kv.calls - before == {"create": 15}
    entries = await log.entries()
    assert [e.seq for e in entries] == list(range(16))
    assert [e.time for e in entries] == sorted(e.time for e in entries)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("node", ""),
        ("node", "n" * 254),
        ("resource", "a\nb"),
        ("decision_id", ""),
        ("verdict_digest", "abc"),
        ("verdict_digest", DIGEST.upper()),
        ("trace_id", "xyz"),
        ("reason", "Not A Code"),
    ],
)
async def test_fields_validated(kv: MemoryKeyValue, field: str, value: str) -> None:
    with pytest.raises(SealingError) as err:
        await append(new_log(kv), **{field: value})
    assert err.value.reason == "broker.audit_field_invalid"
    assert await kv.keys() == []


async def test_naive_clock_refused(kv: MemoryKeyValue) -> None:
    log = AuditLog(kv, KEY, clock=lambda: datetime(2025, 1, 1))
    with pytest.raises(SealingError, match="audit_field_invalid"):
        await append(log)


# --- retention: signed checkpoints and pruning ------------------------------------------

BROKER = SigningKey.generate("broker")
TRUSTED = TrustedKeys({"broker": BROKER.public_key()})


def kept_log(kv: MemoryKeyValue, *, trusted: TrustedKeys = TRUSTED) -> AuditLog:
    return AuditLog(kv, KEY, clock=Clock(), signer=BROKER, trusted=trusted)


async def checkpointed(kv: MemoryKeyValue, n: int, *, max_records: int, after: int = 0) -> AuditLog:
    """``n`` records, a checkpoint at the last, pruning to ``max_records``, then ``after`` more."""
    log = kept_log(kv)
    for i in range(n):
        await append(log, i)
    made = await log.checkpoint()
    assert made is not None and made.seq == n - 1 and made.count == n
    await log.prune(max_records)
    for i in range(n, n + after):
        await append(log, i)
    return log


def retained(kv: MemoryKeyValue) -> list[int]:
    return sorted(int(key.split(".")[1]) for key in kv.snapshot() if key.startswith("audit."))


async def test_prune_behind_a_checkpoint_and_verify_still_passes(kv: MemoryKeyValue) -> None:
    log = await checkpointed(kv, 30, max_records=10, after=5)
    assert retained(kv) == list(range(20, 35))
    assert await log.verify_chain() == 6  # the checkpoint's head and the 5 after it
    assert await kept_log(kv).verify_chain() == 6  # a fresh reader, from the checkpoint
    entries = await kept_log(kv).entries()
    assert [e.seq for e in entries] == list(range(20, 35))


async def test_prune_never_passes_the_checkpoint(kv: MemoryKeyValue) -> None:
    log = await checkpointed(kv, 10, max_records=1, after=20)
    assert await log.prune(3) == 0  # everything left is the checkpoint's head or after it
    assert retained(kv) == list(range(9, 30))
    await log.checkpoint()
    assert await log.prune(3) == 18
    assert retained(kv) == [27, 28, 29]
    assert await kept_log(kv).verify_chain() == 1


async def test_nothing_is_pruned_without_a_checkpoint(kv: MemoryKeyValue) -> None:
    log = kept_log(kv)
    for i in range(5):
        await append(log, i)
    assert await log.prune(1) == 0
    assert retained(kv) == list(range(5))


async def test_deleting_the_checkpoint_head_is_detected(kv: MemoryKeyValue) -> None:
    await checkpointed(kv, 12, max_records=5, after=3)
    kv.remove(audit_key(11))  # the record the checkpoint names as its head
    with pytest.raises(SealingError) as err:
        await kept_log(kv).verify_chain()
    assert err.value.reason == "broker.audit_chain_broken"


async def test_deleting_the_oldest_retained_head_is_detected(kv: MemoryKeyValue) -> None:
    await checkpointed(kv, 12, max_records=1, after=2)
    assert retained(kv) == [11, 12, 13]
    kv.remove(audit_key(11))  # would look like pruning, but it is the checkpoint's head
    with pytest.raises(SealingError, match="head record 11 is missing"):
        await kept_log(kv).verify_chain()


@pytest.mark.parametrize("victim", [13, 15, 8])
async def test_deleting_a_record_after_or_inside_the_kept_range_is_detected(
    kv: MemoryKeyValue, victim: int
) -> None:
    await checkpointed(kv, 12, max_records=6, after=5)
    assert retained(kv) == list(range(6, 17))
    kv.remove(audit_key(victim))
    with pytest.raises(SealingError) as err:
        await kept_log(kv).verify_chain()
    assert err.value.reason in ("broker.audit_chain_broken", "broker.audit_truncated")


async def test_deleting_the_newest_record_is_caught_by_a_running_log(kv: MemoryKeyValue) -> None:
    log = await checkpointed(kv, 12, max_records=6, after=5)
    kv.remove(audit_key(16))
    with pytest.raises(SealingError, match="audit_truncated"):
        await log.verify_chain()


async def test_deleting_the_oldest_record_behind_the_checkpoint_is_pruning(
    kv: MemoryKeyValue,
) -> None:
    await checkpointed(kv, 12, max_records=6, after=2)
    kv.remove(audit_key(6))
    assert await kept_log(kv).verify_chain() == 3


async def test_truncating_behind_the_checkpoint_is_detected_after_a_restart(
    kv: MemoryKeyValue,
) -> None:
    await checkpointed(kv, 8, max_records=2, after=0)
    for seq in retained(kv):
        kv.remove(audit_key(seq))
    with pytest.raises(SealingError) as err:
        await kept_log(kv).verify_chain()
    assert err.value.reason == "broker.audit_truncated"
    with pytest.raises(SealingError, match="audit_truncated"):
        await append(kept_log(kv), 99)  # never restarts the chain at 0 under a checkpoint


async def test_rewritten_checkpoint_head_is_detected(kv: MemoryKeyValue) -> None:
    """Even the data key's holder cannot rewrite a checkpointed record."""
    await checkpointed(kv, 4, max_records=10, after=1)
    (record,) = [e for e in await kept_log(kv).entries() if e.seq == 3]
    forged = msgspec.structs.replace(record, node="someone-else")
    kv.overwrite(
        audit_key(3),
        seal(KEY, msgspec.msgpack.encode(forged), purpose="audit", name=audit_key(3), version=3),
    )
    with pytest.raises(SealingError, match="audit_chain_broken"):
        await kept_log(kv).verify_chain()


async def test_forged_or_unverifiable_checkpoints_fail_closed(kv: MemoryKeyValue) -> None:
    await checkpointed(kv, 4, max_records=2)
    with pytest.raises(SealingError) as err:
        await AuditLog(kv, KEY).verify_chain()  # no trusted broker key
    assert err.value.reason == "broker.checkpoint_untrusted"
    impostor = SigningKey.generate("broker")
    other = TrustedKeys({"broker": impostor.public_key()})
    with pytest.raises(SealingError) as err:
        await kept_log(kv, trusted=other).verify_chain()
    assert err.value.reason == "broker.checkpoint_invalid"
    forged = checkpoint.sign(impostor, checkpoint.Checkpoint(seq=3, head=GENESIS, count=4, time=T0))
    kv.overwrite(checkpoint.CHECKPOINT_KEY, forged.encode())
    with pytest.raises(SealingError, match="checkpoint_invalid"):
        await kept_log(kv).verify_chain()


async def test_a_checkpoint_never_moves_backwards(kv: MemoryKeyValue) -> None:
    log = await checkpointed(kv, 5, max_records=100, after=5)
    newer = await log.checkpoint()
    assert newer is not None and newer.seq == 9
    old = checkpoint.Checkpoint(seq=4, head=GENESIS, count=5, time=T0)
    await checkpoint.store(kv, checkpoint.sign(BROKER, old), old, TRUSTED)
    loaded = await log.load_checkpoint()
    assert loaded is not None and loaded.seq == 9


async def test_checkpoint_refuses_to_sign_a_broken_chain(kv: MemoryKeyValue) -> None:
    log = kept_log(kv)
    for i in range(4):
        await append(log, i)
    kv.remove(audit_key(1))
    with pytest.raises(SealingError, match="audit_chain_broken"):
        await log.checkpoint()
    assert checkpoint.CHECKPOINT_KEY not in kv.snapshot()


async def test_summary_records_carry_counts(kv: MemoryKeyValue) -> None:
    log = kept_log(kv)
    await log.append_summary({"broker.no_decision": 1000, "broker.already_released": 5})
    (entry,) = await log.entries()
    assert entry.outcome is Outcome.SUMMARY
    assert entry.counts == {"broker.no_decision": 1000, "broker.already_released": 5}
    for bad in ({"Not A Code": 1}, {"broker.x": 0}, {f"broker.r{i}": 1 for i in range(65)}):
        with pytest.raises(SealingError, match="audit_field_invalid"):
            await log.append_summary(bad)


async def test_list_since_filters_by_time(kv: MemoryKeyValue) -> None:
    log = await filled(kv, 5)
    later = await log.entries(since=T0 + timedelta(seconds=4))
    assert [e.seq for e in later] == [3, 4]


async def test_a_broker_trusts_its_own_unpublished_checkpoint_key(kv: MemoryKeyValue) -> None:
    await checkpointed(kv, 3, max_records=1)
    with pytest.raises(SealingError, match="checkpoint_invalid"):
        await kept_log(kv, trusted=TrustedKeys({})).verify_chain()
    own = TrustedKeys({}).including("broker", BROKER.public_key())
    assert await kept_log(kv, trusted=own).verify_chain() == 1


def test_checkpoint_key_must_be_the_brokers(kv: MemoryKeyValue) -> None:
    with pytest.raises(ConfigError, match="wrong_name"):
        AuditLog(kv, KEY, signer=SigningKey.generate("policy"))
