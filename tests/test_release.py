"""HPKE release: round trips and every way a wrapped secret must fail to open."""

from __future__ import annotations

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from services.broker.release import (
    MAX_SECRET_SIZE,
    Wrapped,
    release_info,
    unwrap,
    wrap,
)
from services.mesh.errors import ReleaseError

INFO = release_info("node-1", "default/node-key")
AAD = b"decision-42"


def raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@pytest.fixture(scope="module")
def node_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def test_round_trip(node_key: X25519PrivateKey) -> None:
    wrapped = wrap(b"top secret", raw_public(node_key), info=INFO, aad=AAD)
    assert len(wrapped.enc) == 32
    assert b"top secret" not in wrapped.ciphertext
    assert unwrap(wrapped, node_key, info=INFO, aad=AAD) == b"top secret"


def test_wrapping_is_randomised(node_key: X25519PrivateKey) -> None:
    first = wrap(b"x", raw_public(node_key), info=INFO, aad=AAD)
    second = wrap(b"x", raw_public(node_key), info=INFO, aad=AAD)
    assert first.enc != second.enc
    assert first.ciphertext != second.ciphertext


def test_survives_msgspec_wire_encoding(node_key: X25519PrivateKey) -> None:
    wrapped = wrap(b"s", raw_public(node_key), info=INFO, aad=AAD)
    decoded = msgspec.json.decode(msgspec.json.encode(wrapped), type=Wrapped)
    assert unwrap(decoded, node_key, info=INFO, aad=AAD) == b"s"


def test_wrong_private_key_fails(node_key: X25519PrivateKey) -> None:
    wrapped = wrap(b"s", raw_public(node_key), info=INFO, aad=AAD)
    with pytest.raises(ReleaseError) as err:
        unwrap(wrapped, X25519PrivateKey.generate(), info=INFO, aad=AAD)
    assert err.value.reason == "broker.unwrap_failed"


@pytest.mark.parametrize(
    "info",
    [
        release_info("node-2", "default/node-key"),
        release_info("node-1", "default/other-key"),
        release_info("node-1d", "efault/node-key"),
    ],
)
def test_replay_to_other_node_or_resource_fails(node_key: X25519PrivateKey, info: bytes) -> None:
    wrapped = wrap(b"s", raw_public(node_key), info=INFO, aad=AAD)
    with pytest.raises(ReleaseError) as err:
        unwrap(wrapped, node_key, info=info, aad=AAD)
    assert err.value.reason == "broker.unwrap_failed"


def test_wrong_aad_fails(node_key: X25519PrivateKey) -> None:
    wrapped = wrap(b"s", raw_public(node_key), info=INFO, aad=AAD)
    with pytest.raises(ReleaseError, match="unwrap_failed"):
        unwrap(wrapped, node_key, info=INFO, aad=b"decision-43")


def test_every_byte_flip_fails(node_key: X25519PrivateKey) -> None:
    wrapped = wrap(b"secret", raw_public(node_key), info=INFO, aad=AAD)
    for field in ("enc", "ciphertext"):
        original = getattr(wrapped, field)
        for i in range(len(original)):
            flipped = bytearray(original)
            flipped[i] ^= 0x01
            bad = msgspec.structs.replace(wrapped, **{field: bytes(flipped)})
            with pytest.raises(ReleaseError):
                unwrap(bad, node_key, info=INFO, aad=AAD)


def test_truncated_or_padded_fails(node_key: X25519PrivateKey) -> None:
    wrapped = wrap(b"secret", raw_public(node_key), info=INFO, aad=AAD)
    for bad in (
        Wrapped(enc=wrapped.enc[:-1], ciphertext=wrapped.ciphertext),
        Wrapped(enc=wrapped.enc, ciphertext=wrapped.ciphertext[:-1]),
        Wrapped(enc=wrapped.enc, ciphertext=wrapped.ciphertext + b"\0"),
        Wrapped(enc=wrapped.enc, ciphertext=b""),
    ):
        with pytest.raises(ReleaseError, match="unwrap_failed"):
            unwrap(bad, node_key, info=INFO, aad=AAD)


@pytest.mark.parametrize("size", [0, 31, 33, 65, 91])
def test_public_key_size_is_exact(size: int) -> None:
    with pytest.raises(ReleaseError) as err:
        wrap(b"s", b"\x09" * size, info=INFO, aad=AAD)
    assert err.value.reason == "broker.public_key_invalid"
    assert "\\x09" not in str(err.value)


@pytest.mark.parametrize("point", [bytes(32), (1).to_bytes(32, "little")])
def test_low_order_public_key_refused(point: bytes) -> None:
    with pytest.raises(ReleaseError) as err:
        wrap(b"s", point, info=INFO, aad=AAD)
    assert err.value.reason == "broker.public_key_invalid"


def test_secret_size_bounded(node_key: X25519PrivateKey) -> None:
    public = raw_public(node_key)
    wrapped = wrap(b"a" * MAX_SECRET_SIZE, public, info=INFO, aad=AAD)
    assert unwrap(wrapped, node_key, info=INFO, aad=AAD) == b"a" * MAX_SECRET_SIZE
    for bad in (b"", b"a" * (MAX_SECRET_SIZE + 1)):
        with pytest.raises(ReleaseError) as err:
            wrap(bad, public, info=INFO, aad=AAD)
        assert err.value.reason == "broker.secret_too_large"


def test_context_bounds(node_key: X25519PrivateKey) -> None:
    public = raw_public(node_key)
    for info, aad in ((b"", AAD), (b"i" * 1025, AAD), (INFO, b"a" * 1025)):
        with pytest.raises(ReleaseError) as err:
            wrap(b"s", public, info=info, aad=aad)
        assert err.value.reason == "broker.release_context_invalid"
    for node, resource in (("", "r"), ("n", ""), ("n" * 254, "r")):
        with pytest.raises(ReleaseError, match="release_context_invalid"):
            release_info(node, resource)


def test_release_info_is_injective() -> None:
    assert release_info("ab", "c") != release_info("a", "bc")
    assert release_info("node-1", "r").startswith(b"attestmesh/secret-release/v1")


def test_secret_never_in_error_messages(node_key: X25519PrivateKey) -> None:
    secret = b"hunter2-hunter2"
    wrapped = wrap(secret, raw_public(node_key), info=INFO, aad=AAD)
    with pytest.raises(ReleaseError) as err:
        unwrap(wrapped, X25519PrivateKey.generate(), info=INFO, aad=AAD)
    assert "hunter2" not in str(err.value) and "hunter2" not in repr(err.value)


@settings(max_examples=25, deadline=None)
@given(secret=st.binary(min_size=1, max_size=2048), aad=st.binary(max_size=64))
def test_round_trip_property(secret: bytes, aad: bytes) -> None:
    key = X25519PrivateKey.generate()
    wrapped = wrap(secret, raw_public(key), info=INFO, aad=aad)
    assert unwrap(wrapped, key, info=INFO, aad=aad) == secret
