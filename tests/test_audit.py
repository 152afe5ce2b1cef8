"""The sealed, hash-chained release audit log."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from services.broker.audit import GENESIS, AuditLog, Outcome, audit_key
from services.broker.sealing import AeadKey, seal
from services.mesh.errors import SealingError
from services.testing.memkv import MemoryKeyValue

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
