"""Reading a secret costs one KV read once its sealed blob is kept, and is never stale.

What must hold (``services/broker/store.py``, "Reads and freshness"): a put or delete that
has returned on one replica is seen by the very next read on any other; a kept blob is used
only while the index names exactly its version; what is kept is sealed, and bounded; the
rollback checks hold with a warm store as with a cold one.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.broker import sealing
from services.broker import store as store_module
from services.broker.sealing import StaticKeySource
from services.broker.store import INDEX_KEY, SecretStore, record_key
from services.mesh.errors import SealingError
from services.testing.memkv import CountingKeyValue, MemoryKeyValue

SOURCE = StaticKeySource(b"\x07" * 32)


async def _replicas(kv: MemoryKeyValue, count: int = 2) -> list[SecretStore]:
    return [await SecretStore.open(kv, SOURCE) for _ in range(count)]


async def test_a_kept_blob_leaves_one_read_and_no_index_unseal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kv = CountingKeyValue()
    writer, reader = await _replicas(kv)
    await writer.put("default/key", b"value-1")
    assert await reader.get("default/key") == b"value-1"
    opened: list[str] = []

    def counting_open(*args: object, **kwargs: object) -> sealing.Opened:
        opened.append(str(kwargs["purpose"]))
        return sealing.open_sealed(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module, "open_sealed", counting_open)
    before = kv.round_trips
    for _ in range(5):
        assert await reader.get("default/key") == b"value-1"
    assert kv.round_trips - before == 5  # the index each time, never the record
    assert kv.calls["get"] == kv.reads and opened == ["secret"] * 5  # never the index


async def test_a_delete_on_one_replica_is_refused_by_the_next_read_on_another() -> None:
    kv = MemoryKeyValue()
    operator, serving = await _replicas(kv)
    await operator.put("default/key", b"doomed")
    assert await serving.get("default/key") == b"doomed"
    await operator.delete("default/key")
    with pytest.raises(SealingError) as refused:
        await serving.get("default/key")
    assert refused.value.reason == "broker.secret_not_found"
    assert serving._kept.get("default/key", 1) is None  # the blob is not kept either


async def test_a_replaced_secret_is_served_new_by_the_next_read_on_another_replica() -> None:
    kv = MemoryKeyValue()
    operator, serving = await _replicas(kv)
    await operator.put("default/key", b"old")
    assert await serving.get("default/key") == b"old"
    await operator.put("default/key", b"new")
    assert await serving.get("default/key") == b"new"
    await operator.delete("default/key")
    await operator.put("default/key", b"after a delete")
    assert await serving.get("default/key") == b"after a delete"


async def test_a_record_rolled_back_behind_the_index_is_never_served() -> None:
    """A warm store serves the committed value; a cold one notices the rollback."""
    kv = MemoryKeyValue()
    operator, serving = await _replicas(kv)
    await operator.put("a", b"v1")
    old_blob = kv.raw(record_key("a"))
    await operator.put("a", b"v2")
    assert await serving.get("a") == b"v2"
    kv.overwrite(record_key("a"), old_blob)
    assert await serving.get("a") == b"v2"
    with pytest.raises(SealingError, match="rollback_detected"):
        await (await SecretStore.open(kv, SOURCE)).get("a")
    kv.overwrite(record_key("a"), b"garbage")
    await operator.put("b", b"another name: the index moves, a's version does not")
    assert await serving.get("a") == b"v2"


async def test_the_index_it_committed_past_cannot_be_put_back() -> None:
    """The opened index is reused only at or above the generation the store has reached: a
    store that committed past it refuses the very bytes it opened before."""
    kv = MemoryKeyValue()
    (store,) = await _replicas(kv, 1)
    await store.put("a", b"v1")
    assert await store.get("a") == b"v1"
    opened_before = kv.raw(INDEX_KEY)
    await store.put("a", b"v2")  # a commit: the floor rises past what was opened
    kv.overwrite(INDEX_KEY, opened_before)
    with pytest.raises(SealingError, match="rollback_detected"):
        await store.get("a")


async def test_a_whole_bucket_rollback_is_detected_by_a_warm_store() -> None:
    kv = MemoryKeyValue()
    operator, serving = await _replicas(kv)
    await operator.put("a", b"v1")
    snapshot = kv.snapshot()
    await operator.put("a", b"v2")
    assert await serving.get("a") == b"v2"
    kv.restore(snapshot)
    for store in (operator, serving):
        with pytest.raises(SealingError, match="rollback_detected"):
            await store.get("a")


async def test_a_tampered_index_is_noticed_by_a_warm_store() -> None:
    kv = MemoryKeyValue()
    (store,) = await _replicas(kv, 1)
    await store.put("a", b"v")
    assert await store.get("a") == b"v"
    blob = bytearray(kv.raw(INDEX_KEY))
    blob[-1] ^= 1
    kv.overwrite(INDEX_KEY, bytes(blob))
    with pytest.raises(SealingError, match="seal_tampered"):
        await store.get("a")


async def test_what_is_kept_is_sealed_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "MAX_KEPT_BYTES", 3 * 1024)
    kv = MemoryKeyValue()
    operator, serving = await _replicas(kv)
    values = {f"ns/s{i}": bytes([65 + i]) * 1000 for i in range(5)}
    for name, value in values.items():
        await operator.put(name, value)
        assert await serving.get(name) == value
    kept = serving._kept._blobs
    assert serving._kept._size == sum(len(blob) for blob, _ in kept.values()) <= 3 * 1024
    assert list(kept) == ["ns/s3", "ns/s4"]  # the oldest went first
    assert all(value not in blob for value in values.values() for blob, _ in kept.values())
    assert "ns/s" not in repr(serving) and "AAAA" not in repr(serving)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.tuples(
            st.integers(0, 1),
            st.sampled_from(["a", "b/c"]),
            st.binary(min_size=1, max_size=16) | st.none(),
        ),
        max_size=20,
    )
)
async def test_every_replica_reads_what_the_last_change_left(
    ops: list[tuple[int, str, bytes | None]],
) -> None:
    """Changes made through either of two replicas; after each, both read exactly the
    stored state (a dict kept beside them), warm as they are."""
    kv = MemoryKeyValue()
    replicas = await _replicas(kv)
    model: dict[str, bytes] = {}
    for which, name, value in ops:
        if value is None:
            if name not in model:
                continue
            await replicas[which].delete(name)
            del model[name]
        else:
            await replicas[which].put(name, value)
            model[name] = value
        for replica in replicas:
            for probe in ("a", "b/c"):
                if probe in model:
                    assert await replica.get(probe) == model[probe]
                else:
                    with pytest.raises(SealingError, match="secret_not_found"):
                        await replica.get(probe)
