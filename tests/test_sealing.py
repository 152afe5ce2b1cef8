"""Sealed envelopes, the key file, and Shamir recovery of the data key."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from services.broker.recovery import (
    Share,
    combine_shares,
    decrypt_share,
    make_recovery_shares,
    split_key,
)
from services.broker.sealing import (
    HEADER_SIZE,
    KEY_FILE_NAME,
    MAX_PLAINTEXT,
    AeadKey,
    KeyFileSource,
    Opened,
    StaticKeySource,
    open_sealed,
    seal,
)
from services.mesh.errors import SealingError

KEY = AeadKey(bytes(range(32)))


def sealed(plaintext: bytes = b"secret value", version: int = 3) -> bytes:
    return seal(KEY, plaintext, purpose="secret", name="default/a", version=version)


def reason(exc: pytest.ExceptionInfo[SealingError]) -> str:
    return exc.value.reason


# --- envelope ---


def test_round_trip_returns_version() -> None:
    opened = open_sealed(KEY, sealed(), purpose="secret", name="default/a")
    assert opened.plaintext == b"secret value"
    assert opened.version == 3


def test_envelope_layout() -> None:
    blob = sealed(b"")
    assert blob[:4] == b"AMSL"
    assert blob[4] == 1
    assert blob[5:13] == KEY.key_id
    assert int.from_bytes(blob[13:21], "big") == 3
    assert len(blob) == HEADER_SIZE + 16


def test_nonces_are_fresh() -> None:
    assert sealed() != sealed()


def test_every_byte_flip_fails() -> None:
    blob = sealed()
    for i in range(len(blob)):
        for bit in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= bit
            with pytest.raises(SealingError):
                open_sealed(KEY, bytes(bad), purpose="secret", name="default/a")


def test_truncation_and_extension_fail() -> None:
    blob = sealed()
    for bad in (b"", blob[:HEADER_SIZE], blob[:-1], blob + b"\0"):
        with pytest.raises(SealingError):
            open_sealed(KEY, bad, purpose="secret", name="default/a")


def test_tamper_reasons() -> None:
    blob = bytearray(sealed())
    blob[-1] ^= 1
    with pytest.raises(SealingError) as err:
        open_sealed(KEY, bytes(blob), purpose="secret", name="default/a")
    assert reason(err) == "broker.seal_tampered"
    with pytest.raises(SealingError) as err:
        open_sealed(KEY, b"XXXX" + sealed()[4:], purpose="secret", name="default/a")
    assert reason(err) == "broker.seal_malformed"
    with pytest.raises(SealingError) as err:
        open_sealed(KEY, sealed()[:4] + b"\x02" + sealed()[5:], purpose="secret", name="default/a")
    assert reason(err) == "broker.seal_unsupported_version"


def test_wrong_key() -> None:
    with pytest.raises(SealingError) as err:
        open_sealed(AeadKey.generate(), sealed(), purpose="secret", name="default/a")
    assert reason(err) == "broker.wrong_key"


def test_blob_moved_to_other_record_or_purpose_fails() -> None:
    for purpose, name in (("secret", "default/b"), ("index", "default/a"), ("audit", "x")):
        with pytest.raises(SealingError) as err:
            open_sealed(KEY, sealed(), purpose=purpose, name=name)
        assert reason(err) == "broker.seal_tampered"


def test_older_version_is_rollback() -> None:
    blob = sealed(version=3)
    assert open_sealed(KEY, blob, purpose="secret", name="default/a", min_version=3).version == 3
    with pytest.raises(SealingError) as err:
        open_sealed(KEY, blob, purpose="secret", name="default/a", min_version=4)
    assert reason(err) == "broker.rollback_detected"


def test_version_cannot_be_edited_in_header() -> None:
    blob = bytearray(sealed(version=3))
    blob[20] = 9
    with pytest.raises(SealingError) as err:
        open_sealed(KEY, bytes(blob), purpose="secret", name="default/a")
    assert reason(err) == "broker.seal_tampered"


def test_size_bounds() -> None:
    with pytest.raises(SealingError, match="too_large"):
        seal(KEY, b"a" * (MAX_PLAINTEXT + 1), purpose="p", name="n", version=1)
    with pytest.raises(SealingError, match="version_invalid"):
        seal(KEY, b"a", purpose="p", name="n", version=-1)
    with pytest.raises(SealingError, match="invalid_name"):
        seal(KEY, b"a", purpose="p", name="", version=1)


def test_reprs_redact_secrets() -> None:
    material = b"\xaa" * 32
    key = AeadKey(material)
    for text in (repr(key), repr(StaticKeySource(material)), repr(Opened(b"hunter2", 1))):
        assert "aa" * 8 not in text.replace(key.key_id.hex(), "")
        assert "hunter2" not in text


def test_key_size_exact() -> None:
    for size in (0, 16, 31, 33):
        with pytest.raises(SealingError, match="sealing_key_invalid"):
            AeadKey(b"k" * size)


@settings(max_examples=50, deadline=None)
@given(
    plaintext=st.binary(max_size=4096),
    name=st.text(min_size=1, max_size=40),
    version=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_round_trip_property(plaintext: bytes, name: str, version: int) -> None:
    blob = seal(KEY, plaintext, purpose="secret", name=name, version=version)
    opened = open_sealed(KEY, blob, purpose="secret", name=name, min_version=version)
    assert (opened.plaintext, opened.version) == (plaintext, version)


@settings(max_examples=100, deadline=None)
@given(garbage=st.binary(max_size=200))
def test_garbage_never_opens(garbage: bytes) -> None:
    with pytest.raises(SealingError):
        open_sealed(KEY, garbage, purpose="secret", name="default/a")


# --- key file ---


def test_key_file_created_0600_and_stable(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    source = KeyFileSource.in_data_dir(data_dir)
    first = source.sealing_key()
    path = data_dir / KEY_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert path.stat().st_size == 32
    assert [p.name for p in data_dir.iterdir()] == [KEY_FILE_NAME]
    again = KeyFileSource(path).sealing_key()
    assert again.key_id == first.key_id


def test_key_file_created_under_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        KeyFileSource.in_data_dir(tmp_path / "d").sealing_key()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d" / KEY_FILE_NAME).stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o610, 0o601])
def test_key_file_group_or_world_bits_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / KEY_FILE_NAME
    KeyFileSource(path).sealing_key()
    path.chmod(mode)
    with pytest.raises(SealingError) as err:
        KeyFileSource(path).sealing_key()
    assert reason(err) == "broker.sealing_key_insecure"


def test_key_file_owner_only_modes_accepted(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    key = KeyFileSource(path).sealing_key()
    for mode in (0o400, 0o600, 0o700):
        path.chmod(mode)
        assert KeyFileSource(path).sealing_key().key_id == key.key_id


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_file_wrong_size_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / KEY_FILE_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"k" * size)
    os.close(fd)
    with pytest.raises(SealingError) as err:
        KeyFileSource(path).sealing_key()
    assert reason(err) == "broker.sealing_key_invalid"
    assert path.read_bytes() == b"k" * size  # never silently replaced


def test_key_file_symlink_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    KeyFileSource(real).sealing_key()
    link = tmp_path / KEY_FILE_NAME
    link.symlink_to(real)
    with pytest.raises(SealingError) as err:
        KeyFileSource(link).sealing_key()
    assert reason(err) == "broker.sealing_key_insecure"


def test_key_file_directory_refused(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE_NAME).mkdir(mode=0o700)
    with pytest.raises(SealingError) as err:
        KeyFileSource.in_data_dir(tmp_path).sealing_key()
    assert reason(err) == "broker.sealing_key_insecure"


def test_key_file_fifo_refused_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / KEY_FILE_NAME, 0o600)
    with pytest.raises(SealingError) as err:
        KeyFileSource.in_data_dir(tmp_path).sealing_key()
    assert reason(err) == "broker.sealing_key_insecure"


def test_key_file_in_world_writable_directory_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "open"
    data_dir.mkdir()
    data_dir.chmod(0o777)
    with pytest.raises(SealingError) as err:
        KeyFileSource.in_data_dir(data_dir).sealing_key()
    assert reason(err) == "broker.sealing_key_insecure"
    assert not (data_dir / KEY_FILE_NAME).exists()


def test_key_file_error_never_contains_key(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    key = KeyFileSource(path).sealing_key()
    path.chmod(0o644)
    with pytest.raises(SealingError) as err:
        KeyFileSource(path).sealing_key()
    assert key.export().hex() not in str(err.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_key_file_owned_by_someone_else_refused(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    KeyFileSource(path).sealing_key()
    os.chown(path, 65534, -1)
    with pytest.raises(SealingError) as err:
        KeyFileSource(path).sealing_key()
    assert reason(err) == "broker.sealing_key_insecure"


def test_losing_a_creation_race_keeps_the_winners_key(tmp_path: Path) -> None:
    source = KeyFileSource.in_data_dir(tmp_path)
    winner = source.sealing_key()
    source._create()  # a second creator arriving late must not clobber the file
    assert source.sealing_key().key_id == winner.key_id
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE_NAME]


# --- Shamir recovery ---


def officers(n: int) -> tuple[list[X25519PrivateKey], list[bytes]]:
    private = [X25519PrivateKey.generate() for _ in range(n)]
    public = [k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) for k in private]
    return private, public


@pytest.mark.parametrize(("threshold", "count"), [(1, 1), (1, 3), (2, 3), (3, 5), (5, 5)])
def test_any_threshold_subset_recovers(threshold: int, count: int) -> None:
    key = AeadKey.generate()
    shares = split_key(key, threshold, count)
    for start in range(count - threshold + 1):
        subset = shares[start : start + threshold]
        assert combine_shares(subset, key.key_id).export() == key.export()
    assert combine_shares(shares, key.key_id).export() == key.export()


def test_fewer_than_threshold_fails() -> None:
    key = AeadKey.generate()
    shares = split_key(key, 3, 5)
    with pytest.raises(SealingError) as err:
        combine_shares(shares[:2], key.key_id)
    assert reason(err) == "broker.recovery_failed"


def test_duplicate_or_foreign_shares_fail() -> None:
    key = AeadKey.generate()
    shares = split_key(key, 2, 3)
    with pytest.raises(SealingError, match="recovery_failed"):
        combine_shares([shares[0], shares[0]], key.key_id)
    foreign = split_key(AeadKey.generate(), 2, 3)
    with pytest.raises(SealingError, match="recovery_failed"):
        combine_shares([shares[0], foreign[1]], key.key_id)
    with pytest.raises(SealingError, match="recovery_failed"):
        combine_shares([], key.key_id)


def test_single_share_reveals_nothing_obvious() -> None:
    key = AeadKey.generate()
    shares = split_key(key, 2, 3)
    assert all(share.y != key.export() for share in shares)
    assert repr(shares[0]) == "Share(x=1)"


def test_split_parameters_bounded() -> None:
    for threshold, count in ((0, 3), (4, 3), (2, 256)):
        with pytest.raises(SealingError, match="recovery_params_invalid"):
            split_key(KEY, threshold, count)
    with pytest.raises(SealingError, match="recovery_share_invalid"):
        Share(0, bytes(32))


def test_encrypted_shares_round_trip() -> None:
    private, public = officers(3)
    key = AeadKey.generate()
    shares = make_recovery_shares(key, public, threshold=2)
    assert [s.x for s in shares] == [1, 2, 3]
    opened = [decrypt_share(shares[i], private[i]) for i in (0, 2)]
    assert combine_shares(opened, shares[0].key_id).export() == key.export()


def test_share_opens_only_for_its_officer_and_label() -> None:
    private, public = officers(2)
    shares = make_recovery_shares(AeadKey.generate(), public, threshold=2)
    with pytest.raises(SealingError, match="recovery_share_invalid"):
        decrypt_share(shares[0], private[1])
    relabelled = type(shares[0])(
        key_id=shares[0].key_id,
        threshold=shares[0].threshold,
        x=2,
        enc=shares[0].enc,
        ciphertext=shares[0].ciphertext,
    )
    with pytest.raises(SealingError, match="recovery_share_invalid"):
        decrypt_share(relabelled, private[0])


def test_bad_officer_key_refused() -> None:
    with pytest.raises(SealingError, match="recovery_params_invalid"):
        make_recovery_shares(AeadKey.generate(), [b"short"], threshold=1)


@settings(max_examples=20, deadline=None)
@given(
    material=st.binary(min_size=32, max_size=32),
    threshold=st.integers(min_value=1, max_value=6),
    extra=st.integers(min_value=0, max_value=4),
    data=st.data(),
)
def test_shamir_property(material: bytes, threshold: int, extra: int, data: st.DataObject) -> None:
    key = AeadKey(material)
    shares = split_key(key, threshold, threshold + extra)
    subset = data.draw(st.permutations(shares))[:threshold]
    assert combine_shares(subset, key.key_id).export() == material
