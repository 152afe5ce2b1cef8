"""What a checkpoint that reads on from the last one still catches.

The log below checkpointed at record 19 and then grew to 29; someone with raw access to the
bucket (and, where a record is resealed, the data key) then changes it. Records written since
the checkpoint and the checkpoint's own head are held to the full standard: the next
checkpoint refuses to sign and the stored one stays. Records behind the checkpoint were
verified before it was signed; a change to them is noticed (the checkpoint makes the full
check, which, as it always has, verifies from the checkpoint's head on), reported by
``entries()``, and pruned when the cut passes it. Only a removal straight from the stream
behind the checkpoint goes unseen by the checkpoint; the listing checks (and the broker's
hourly full checkpoint) report it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from services.broker import checkpoint
from services.broker.audit import AuditLog, AuditRecord, audit_key
from services.broker.sealing import open_sealed, seal
from services.mesh.errors import SealingError
from tests.test_audit import BROKER, KEY
from tests.test_audit_incremental import Counted, grow, log_on, retained, settled


@pytest.fixture
def kv() -> Counted:
    return Counted()


async def checkpointed_then_grown(kv: Counted) -> AuditLog:
    log = await settled(kv, 20)
    await grow(log, 10, start=20)
    kv.reset()
    return log


def resealed(kv: Counted, number: int, /, **changes: Any) -> bytes:
    """Record ``number`` changed and sealed again, as the data key's holder could."""
    key = audit_key(number)
    record = msgspec.msgpack.decode(
        open_sealed(KEY, kv.raw(key), purpose="audit", name=key).plaintext, type=AuditRecord
    )
    forged = msgspec.structs.replace(record, **changes)
    name = audit_key(forged.seq)
    return seal(KEY, msgspec.msgpack.encode(forged), purpose="audit", name=name, version=forged.seq)


def flipped(blob: bytes) -> bytes:
    return blob[:40] + bytes([blob[40] ^ 1]) + blob[41:]


def swap(kv: Counted, a: int, b: int) -> None:
    first, second = kv.raw(audit_key(a)), kv.raw(audit_key(b))
    kv.overwrite(audit_key(a), second)
    kv.overwrite(audit_key(b), first)


def relinked(kv: Counted) -> None:
    """Record 25 renumbered as 24, linking to 23 as 24 did; 25 gone: one record dropped."""
    kv.overwrite(audit_key(24), resealed(kv, 25, seq=24, prev=resealed_prev(kv, 24)))
    kv.remove(audit_key(25))


def truncated(kv: Counted, first: int) -> None:
    for seq in range(first, 30):
        kv.remove(audit_key(seq))


def resealed_prev(kv: Counted, seq: int) -> bytes:
    key = audit_key(seq)
    plain = open_sealed(KEY, kv.raw(key), purpose="audit", name=key).plaintext
    return msgspec.msgpack.decode(plain, type=AuditRecord).prev


CHAIN = "broker.audit_chain_broken"
SEAL = "broker.seal_tampered"
ATTACKS: dict[str, tuple[Callable[[Counted], object], str]] = {
    "new record resealed": (
        lambda kv: kv.overwrite(audit_key(24), resealed(kv, 24, node="someone-else")),
        CHAIN,
    ),
    "new record byte-flipped": (
        lambda kv: kv.overwrite(audit_key(24), flipped(kv.raw(audit_key(24)))),
        SEAL,
    ),
    "new record deleted": (lambda kv: kv.remove(audit_key(24)), CHAIN),
    "new records swapped": (lambda kv: swap(kv, 23, 24), SEAL),
    "new record dropped and the next renumbered": (relinked, CHAIN),
    "stray key": (lambda kv: kv.overwrite("audit.x", b"junk"), CHAIN),
    "record planted ahead": (
        lambda kv: kv.overwrite(audit_key(31), resealed(kv, 29, seq=31)),
        CHAIN,
    ),
    "newest records removed": (lambda kv: truncated(kv, 28), "broker.audit_truncated"),
    "checkpoint head resealed": (
        lambda kv: kv.overwrite(audit_key(19), resealed(kv, 19, node="someone-else")),
        CHAIN,
    ),
    "checkpoint head removed": (lambda kv: kv.remove(audit_key(19)), CHAIN),
    "checkpoint head byte-flipped": (
        lambda kv: kv.overwrite(audit_key(19), flipped(kv.raw(audit_key(19)))),
        SEAL,
    ),
    "checkpoint removed": (lambda kv: kv.remove(checkpoint.CHECKPOINT_KEY), CHAIN),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_a_change_at_or_after_the_checkpoint_stops_the_next_one(
    kv: Counted, attack: str
) -> None:
    log = await checkpointed_then_grown(kv)
    await log.prune(10)  # records 10..29 kept: a log that no longer starts at 0
    tamper, reason = ATTACKS[attack]
    tamper(kv)
    with pytest.raises(SealingError) as err:
        await log.checkpoint()
    assert err.value.reason == reason
    stored = await log_on(kv).load_checkpoint() if attack != "checkpoint removed" else None
    assert stored is None or stored.seq == 19


@pytest.mark.parametrize("victim", [24, 29])
async def test_a_delete_marker_after_the_checkpoint_stops_the_next_one(
    kv: Counted, victim: int
) -> None:
    log = await checkpointed_then_grown(kv)
    await kv.delete(audit_key(victim))  # a KV delete: a marker the walk reads
    with pytest.raises(SealingError) as err:
        await log.checkpoint()
    assert err.value.reason == (CHAIN if victim == 24 else "broker.audit_truncated")


async def test_a_byte_identical_rewrite_is_noticed_and_passes(kv: Counted) -> None:
    log = await checkpointed_then_grown(kv)
    kv.overwrite(audit_key(19), kv.raw(audit_key(19)))
    kv.overwrite(audit_key(25), kv.raw(audit_key(25)))
    made = await log.checkpoint()
    assert made is not None and made.seq == 29
    assert kv.listings == 1  # the walk met writes out of order: the full check ran
    kv.reset()
    await grow(log, 3, start=30)
    await log.checkpoint()
    assert kv.listings == 0  # and the next walk reads on past them


async def test_a_rewrite_behind_the_checkpoint_is_noticed_reported_and_pruned(
    kv: Counted,
) -> None:
    log = await checkpointed_then_grown(kv)
    kv.overwrite(audit_key(10), resealed(kv, 10, node="someone-else"))
    made = await log.checkpoint()  # what it signs, from the checkpoint's head on, holds
    assert made is not None and made.seq == 29
    assert kv.listings == 1
    with pytest.raises(SealingError, match=r"audit\.000000000011 does not follow"):
        await log.entries()  # the listing of every retained record finds it
    assert await log.prune(15) == 15  # the cut passes it: the purge leaves it (newer)...
    assert retained(kv) == list(range(15, 30))  # ...so the prune deleted it itself
    assert [entry.seq for entry in await log_on(kv).entries()] == list(range(15, 30))


async def test_a_removal_behind_the_checkpoint_is_left_to_the_listing_checks(
    kv: Counted,
) -> None:
    log = await checkpointed_then_grown(kv)
    kv.remove(audit_key(10))  # straight from the stream: no marker for the walk to read
    made = await log.checkpoint()
    assert made is not None and made.seq == 29 and kv.listings == 0
    with pytest.raises(SealingError) as err:
        await log_on(kv).verify_chain()
    assert err.value.reason == CHAIN
    kv.reset()
    with pytest.raises(SealingError) as err:  # the broker's periodic full check
        await log.checkpoint(full=True)
    assert err.value.reason == CHAIN and kv.listings == 1


async def test_a_rewritten_cut_cannot_make_the_purge_take_the_head(kv: Counted) -> None:
    log = await checkpointed_then_grown(kv)
    await log.checkpoint()
    kv.overwrite(audit_key(15), kv.raw(audit_key(15)))  # now newer than the head, 29
    with pytest.raises(SealingError) as err:
        await log.prune(15)
    assert err.value.reason == CHAIN
    assert retained(kv) == list(range(30))


async def test_an_older_checkpoint_put_back_is_walked_from(kv: Counted) -> None:
    log = await checkpointed_then_grown(kv)
    old = await log.load_checkpoint()
    assert old is not None and old.seq == 19
    await log.checkpoint()
    kv.overwrite(checkpoint.CHECKPOINT_KEY, checkpoint.sign(BROKER, old).encode())
    kv.reset()
    await grow(log, 2, start=30)
    made = await log.checkpoint()  # not the one it left: the full check, from 19
    assert made is not None and made.seq == 31
    assert kv.listings == 1
