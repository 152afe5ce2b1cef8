"""The secret store over a KV bucket: sealing at rest, rollback, restart, CAS between replicas."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.broker.recovery import combine_shares, decrypt_share
from services.broker.sealing import AeadKey, KeyFileSource, StaticKeySource
from services.broker.store import (
    INDEX_KEY,
    KEYRING_KEY,
    MAX_SECRET_SIZE,
    SecretStore,
    load_keyring,
    record_key,
    rewrap_keyring,
)
from services.mesh.errors import BusError, SealingError
from services.mesh.kv import WriteConflictError
from services.testing.memkv import MemoryKeyValue

SOURCE = StaticKeySource(b"\x07" * 32)


@pytest.fixture
def kv() -> MemoryKeyValue:
    return MemoryKeyValue()


async def open_store(kv: MemoryKeyValue) -> SecretStore:
    return await SecretStore.open(kv, SOURCE)


# --- the KV seam itself ---


async def test_memory_kv_semantics(kv: MemoryKeyValue) -> None:
    first = await kv.create("a.b", b"1")
    with pytest.raises(WriteConflictError) as err:
        await kv.create("a.b", b"2")
    assert err.value.reason == "kv.key_exists"
    second = await kv.update("a.b", b"2", first)
    assert second > first
    with pytest.raises(WriteConflictError) as err:
        await kv.update("a.b", b"3", first)
    assert err.value.reason == "kv.revision_conflict"
    assert await kv.get("a.b") == (b"2", second)
    with pytest.raises(WriteConflictError):
        await kv.delete("a.b", last_revision=first)
    await kv.delete("a.b", last_revision=second)
    assert await kv.get("a.b") is None
    await kv.delete("a.b")
    assert await kv.keys() == []
    assert await kv.create("a.b", b"again") > second


@pytest.mark.parametrize("key", ["", "a b", "a/b", ".a", "a.", "a..b", "ä", "a*", "a>", "k" * 513])
async def test_kv_keys_are_nats_safe(kv: MemoryKeyValue, key: str) -> None:
    with pytest.raises(BusError) as err:
        await kv.create(key, b"v")
    assert err.value.reason == "kv.invalid_key"


# --- basic operations ---


async def test_put_get_list_delete(kv: MemoryKeyValue) -> None:
    store = await open_store(kv)
    assert await store.put("default/node-key", b"k1") == 1
    await store.put("prod/db/password", b"pw")
    assert await store.get("default/node-key") == b"k1"
    assert await store.list() == ["default/node-key", "prod/db/password"]
    assert await store.put("default/node-key", b"k2") == 2
    assert await store.get("default/node-key") == b"k2"
    await store.delete("default/node-key")
    assert await store.list() == ["prod/db/password"]
    with pytest.raises(SealingError) as err:
        await store.get("default/node-key")
    assert err.value.reason == "broker.secret_not_found"
    with pytest.raises(SealingError, match="secret_not_found"):
        await store.delete("default/node-key")


async def test_values_are_sealed_at_rest(kv: MemoryKeyValue) -> None:
    store = await open_store(kv)
    await store.put("default/node-key", b"plaintext-marker")
    for key, value in kv.snapshot().items():
        assert b"plaintext-marker" not in value, key
        assert b"default/node-key" not in value, key
    assert sorted(kv.snapshot()) == sorted([KEYRING_KEY, INDEX_KEY, record_key("default/node-key")])


def test_record_keys_are_injective_and_nats_safe() -> None:
    assert record_key("a.b/c") != record_key("a/b.c")
    assert record_key("default/node-key").startswith("secret.")
    assert "/" not in record_key("default/node-key")


@pytest.mark.parametrize(
    "name", ["", "/a", "a/", "a//b", "../a", "a/../b", ".a", "a b", "ä", "a/" * 8 + "a", "n" * 254]
)
async def test_invalid_names_refused(kv: MemoryKeyValue, name: str) -> None:
    store = await open_store(kv)
    with pytest.raises(SealingError) as err:
        await store.put(name, b"v")
    assert err.value.reason == "broker.invalid_name"


async def test_secret_size_bounds(kv: MemoryKeyValue) -> None:
    store = await open_store(kv)
    await store.put("big", b"x" * MAX_SECRET_SIZE)
    assert len(await store.get("big")) == MAX_SECRET_SIZE
    for bad in (b"", b"x" * (MAX_SECRET_SIZE + 1)):
        with pytest.raises(SealingError) as err:
            await store.put("big", bad)
        assert err.value.reason == "broker.secret_too_large"


async def test_repr_redacts(kv: MemoryKeyValue) -> None:
    store = await open_store(kv)
    assert "07" * 4 not in repr(store)


# --- tampering, moving, rollback ---


async def test_tampered_record_detected(kv: MemoryKeyValue) -> None:
    store = await open_store(kv)
    await store.put("a", b"value")
    blob = bytearray(kv.raw(record_key("a")))
    blob[-3] ^= 0x40
    kv.overwrite(record_key("a"), bytes(blob))
    with pytest.raises(SealingError) as err:
        await store.get("a")
    assert err.value.reason == "broker.seal_tampered"


async def test_blob_moved_to_another_record_detected(kv: MemoryKeyValue) -> None:
    store = await open_store(kv)
    await store.put("a", b"value-a")
    await store.put("b", b"value-b")
    kv.overwrite(record_key("b"), kv.raw(record_key("a")))
    with pytest.raises(SealingError) as err:
        await store.get("b")
    assert err.value.reason == "broker.seal_tampered"


async def test_rollback_of_a_record_detected(kv: MemoryKeyValue) -> None:
    store = await open_store(kv)
    await store.put("a", b"old")
    old_blob = kv.raw(record_key("a"))
    await store.put("a", b"new")
    kv.overwrite(record_key("a"), old_blob)
    with pytest.raises(SealingError) as err:
        await store.get("a")
    assert err.value.reason == "broker.rollback_detected"
    restarted = await open_store(kv)
    with pytest.raises(SealingError, match="rollback_detected"):
        await restarted.get("a")


async def test_deleted_secret_cannot_be_resurrected(kv: MemoryKeyValue) -> None:
    store = await open_store(kv)
    await store.put("a", b"revoked")
    old_blob = kv.raw(record_key("a"))
    await store.delete("a")
    kv.overwrite(record_key("a"), old_blob)
    with pytest.raises(SealingError, match="secret_not_found"):
        await store.get("a")
    version = await store.put("a", b"fresh")
    assert version > 1
    kv.overwrite(record_key("a"), old_blob)
    with pytest.raises(SealingError, match="rollback_detected"):
        await store.get("a")


async def test_whole_bucket_rollback_detected_while_running(kv: MemoryKeyValue) -> None:
    store = await open_store(kv)
    await store.put("a", b"v1")
    snapshot = kv.snapshot()
    await store.put("a", b"v2")
    kv.restore(snapshot)
    with pytest.raises(SealingError, match="rollback_detected"):
        await store.get("a")


async def test_deleted_blob_behind_the_index_detected(kv: MemoryKeyValue) -> None:
    store = await open_store(kv)
    await store.put("a", b"v")
    kv.remove(record_key("a"))
    with pytest.raises(SealingError) as err:
        await store.get("a")
    assert err.value.reason == "broker.record_missing"


async def test_tampered_or_missing_index_detected(kv: MemoryKeyValue) -> None:
    store = await open_store(kv)
    await store.put("a", b"v")
    blob = bytearray(kv.raw(INDEX_KEY))
    blob[-1] ^= 1
    kv.overwrite(INDEX_KEY, bytes(blob))
    with pytest.raises(SealingError, match="seal_tampered"):
        await store.list()
    kv.remove(INDEX_KEY)
    with pytest.raises(SealingError, match="index_missing"):
        await store.get("a")
    with pytest.raises(SealingError, match="index_missing"):
        await open_store(kv)


async def test_crash_between_record_and_index_keeps_new_value(kv: MemoryKeyValue) -> None:
    store = await open_store(kv)
    await store.put("a", b"v1")
    index_before = kv.raw(INDEX_KEY)
    await store.put("a", b"v2")
    kv.overwrite(INDEX_KEY, index_before)  # as if the index commit never happened
    restarted = await open_store(kv)
    assert await restarted.get("a") == b"v2"
    assert await restarted.put("a", b"v3") == 3


# --- keys and restart ---


async def test_restart_with_same_key_file_keeps_secrets(kv: MemoryKeyValue, tmp_path: Path) -> None:
    store = await SecretStore.open(kv, KeyFileSource.in_data_dir(tmp_path))
    await store.put("default/node-key", b"survives")
    again = await SecretStore.open(kv, KeyFileSource.in_data_dir(tmp_path))
    assert await again.get("default/node-key") == b"survives"
    assert await again.list() == ["default/node-key"]


async def test_wrong_sealing_key_refused(kv: MemoryKeyValue) -> None:
    await (await open_store(kv)).put("a", b"v")
    with pytest.raises(SealingError) as err:
        await SecretStore.open(kv, StaticKeySource(b"\x08" * 32))
    assert err.value.reason == "broker.wrong_key"


async def test_missing_keyring_with_state_fails_closed(kv: MemoryKeyValue) -> None:
    await (await open_store(kv)).put("a", b"v")
    kv.remove(KEYRING_KEY)
    with pytest.raises(SealingError) as err:
        await open_store(kv)
    assert err.value.reason == "broker.keyring_missing"
    assert KEYRING_KEY not in kv.snapshot()


async def test_sealing_key_rotation(kv: MemoryKeyValue) -> None:
    store = await open_store(kv)
    await store.put("a", b"v")
    new_source = StaticKeySource(b"\x09" * 32)
    await rewrap_keyring(kv, await load_keyring(kv, SOURCE), new_source)
    assert await (await SecretStore.open(kv, new_source)).get("a") == b"v"
    with pytest.raises(SealingError, match="wrong_key"):
        await open_store(kv)


async def test_recovery_after_losing_the_sealing_key(kv: MemoryKeyValue) -> None:
    private = [X25519PrivateKey.generate() for _ in range(3)]
    public = [k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) for k in private]
    store = await open_store(kv)
    await store.put("a", b"precious")
    shares = store.recovery_shares(public, threshold=2)

    opened = [decrypt_share(shares[i], private[i]) for i in (1, 2)]
    data_key = combine_shares(opened, shares[0].key_id)
    new_source = StaticKeySource(b"\x0a" * 32)
    await rewrap_keyring(kv, data_key, new_source)
    assert await (await SecretStore.open(kv, new_source)).get("a") == b"precious"


async def test_rewrap_refuses_a_wrong_data_key(kv: MemoryKeyValue) -> None:
    await (await open_store(kv)).put("a", b"v")
    keyring_before = kv.raw(KEYRING_KEY)
    with pytest.raises(SealingError, match="wrong_key"):
        await rewrap_keyring(kv, AeadKey.generate(), StaticKeySource(b"\x0b" * 32))
    assert kv.raw(KEYRING_KEY) == keyring_before


# --- replicas ---


async def test_two_replicas_initialising_share_one_keyring(kv: MemoryKeyValue) -> None:
    first, second = await asyncio.gather(open_store(kv), open_store(kv))
    await first.put("a", b"from-first")
    assert await second.get("a") == b"from-first"


async def test_concurrent_puts_from_replicas_lose_nothing(kv: MemoryKeyValue) -> None:
    replicas = [await open_store(kv) for _ in range(3)]
    names = [f"ns/secret-{i}" for i in range(12)]
    await asyncio.gather(
        *(replicas[i % 3].put(name, name.encode()) for i, name in enumerate(names))
    )
    assert await replicas[0].list() == sorted(names)
    for name in names:
        assert await replicas[1].get(name) == name.encode()


async def test_concurrent_writes_to_one_name_keep_versions_increasing(kv: MemoryKeyValue) -> None:
    first, second = await open_store(kv), await open_store(kv)
    versions = await asyncio.gather(
        *(store.put("shared", f"v{i}".encode()) for i, store in enumerate([first, second] * 4))
    )
    assert len(set(versions)) == len(versions)
    assert await first.get("shared") in {f"v{i}".encode() for i in range(8)}


async def test_concurrent_put_and_delete_stay_consistent(kv: MemoryKeyValue) -> None:
    first, second = await open_store(kv), await open_store(kv)
    await first.put("a", b"v1")
    await asyncio.gather(first.put("a", b"v2"), second.delete("a"))
    names = await first.list()
    if names:
        assert await first.get("a") == b"v2"
    else:
        with pytest.raises(SealingError, match="secret_not_found"):
            await first.get("a")


async def test_stale_index_write_conflicts(kv: MemoryKeyValue) -> None:
    store = await open_store(kv)
    found = await kv.get(INDEX_KEY)
    assert found is not None
    await store.put("a", b"v")
    with pytest.raises(WriteConflictError):
        await kv.update(INDEX_KEY, found[0], found[1])


async def test_write_conflict_exhaustion_reported(kv: MemoryKeyValue) -> None:
    store = await open_store(kv)

    async def always_conflict(key: str, value: bytes, last_revision: int) -> int:
        raise WriteConflictError("kv.revision_conflict", key)

    await store.put("a", b"v")
    kv.update = always_conflict  # type: ignore[method-assign]
    with pytest.raises(SealingError) as err:
        await store.put("a", b"w")
    assert err.value.reason == "broker.write_conflict"


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["a", "b/c", "d.e"]), st.binary(min_size=1, max_size=32) | st.none()
        ),
        max_size=15,
    )
)
async def test_store_matches_a_dict(ops: list[tuple[str, bytes | None]]) -> None:
    kv = MemoryKeyValue()
    store = await open_store(kv)
    model: dict[str, bytes] = {}
    for name, value in ops:
        if value is None:
            if name in model:
                await store.delete(name)
                del model[name]
        else:
            await store.put(name, value)
            model[name] = value
    restarted = await open_store(kv)
    assert await restarted.list() == sorted(model)
    for name, value in model.items():
        assert await restarted.get(name) == value


async def test_a_change_made_at_an_older_generation_is_refused(kv: MemoryKeyValue) -> None:
    """What makes an operator's signed request single-use: it names the generation."""
    store = await open_store(kv)
    start = await store.generation()
    await store.put("default/key/app", b"v1", at_generation=start)
    for stale in (
        store.put("default/key/app", b"replayed", at_generation=start),
        store.delete("default/key/app", at_generation=start),
    ):
        with pytest.raises(SealingError) as caught:
            await stale
        assert caught.value.reason == "broker.generation_moved"
    assert await store.get("default/key/app") == b"v1"
    await store.delete("default/key/app", at_generation=start + 1)
    assert await store.generation() == start + 2
