"""Recovery officers' key files and share files, offline: the formats (interoperable with
openssl), and every malformed, insecure or hostile file refused with a reason."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.broker import officers
from services.broker.recovery import combine_shares, decrypt_share, make_recovery_shares
from services.broker.sealing import AeadKey
from services.mesh.errors import ConfigError, SealingError


def test_generated_key_pair_is_pem_x25519(tmp_path: Path) -> None:
    private, public, officer = officers.generate(tmp_path / "keys", "ada")
    assert (private.name, public.name) == ("ada.key", "ada.pub")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    key = officers.load_private_key(private)
    assert officers.raw_public(key.public_key()) == officer.public_key
    assert officers.load_officers(tmp_path / "keys") == [officer]
    assert officer.fingerprint.startswith("sha256:") and len(officer.fingerprint) == 71


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_an_officer_key_made_with_openssl_works(tmp_path: Path) -> None:
    private = tmp_path / "bo.key"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "X25519", "-out", str(private)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    private.chmod(0o600)
    public_dir = tmp_path / "officers"
    public_dir.mkdir()
    subprocess.run(
        ["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public_dir / "bo.pub")],
        check=True,
        capture_output=True,
        timeout=30,
    )
    (officer,) = officers.load_officers(public_dir)
    data_key = AeadKey.generate()
    (share,) = make_recovery_shares(data_key, [officer.public_key], 1)
    opened = decrypt_share(share, officers.load_private_key(private))
    assert combine_shares([opened], data_key.key_id).key_id == data_key.key_id


def test_a_private_key_others_can_read_is_refused(tmp_path: Path) -> None:
    private, _, _ = officers.generate(tmp_path, "ada")
    for mode in (0o640, 0o604, 0o660):
        private.chmod(mode)
        with pytest.raises(ConfigError) as caught:
            officers.load_private_key(private)
        assert caught.value.reason == "recovery.officer_key_insecure"


def test_keys_that_are_not_x25519_are_refused(tmp_path: Path) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pub").write_bytes(
        other.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(ConfigError, match="officer_key_invalid"):
        officers.load_officers(tmp_path)
    private = tmp_path / "ec.key"
    private.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    with pytest.raises(ConfigError, match="officer_key_invalid"):
        officers.load_private_key(private)
    private.write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="officer_key_invalid"):
        officers.load_private_key(private)


def test_officer_lists_refuse_duplicates_bad_names_and_big_files(tmp_path: Path) -> None:
    _, public, _ = officers.generate(tmp_path / "a", "ada")
    (tmp_path / "a" / "twin.pub").write_bytes(public.read_bytes())
    with pytest.raises(ConfigError, match="duplicate_officer_key"):
        officers.load_officers(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "-bad.pub").write_bytes(public.read_bytes())
    with pytest.raises(ConfigError, match="bad_officer_name"):
        officers.load_officers(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "big.pub").write_bytes(b"x" * (officers.MAX_KEY_FILE + 1))
    with pytest.raises(ConfigError, match="too_large"):
        officers.load_officers(tmp_path / "c")
    with pytest.raises(ConfigError, match="bad_officer_name"):
        officers.generate(tmp_path / "d", "../escape")
    with pytest.raises(ConfigError, match="unreadable"):
        officers.load_officers(tmp_path / "absent")


def _share_document(tmp_path: Path) -> dict[str, object]:
    _, _, officer = officers.generate(tmp_path / "keys", "ada")
    _, _, other = officers.generate(tmp_path / "keys", "bo")
    shares = make_recovery_shares(AeadKey.generate(), [officer.public_key, other.public_key], 2)
    document = officers.ShareFile(
        format=officers.SHARE_FORMAT,
        officer="ada",
        officer_key=officer.fingerprint,
        shares=2,
        share=shares[0],
    )
    path = tmp_path / "ada.share"
    officers.write_new(path, officers.encode_share(document), 0o600)
    assert officers.read_share(path) == document
    with pytest.raises(ConfigError, match="file_exists"):
        officers.write_new(path, b"again", 0o600)
    loaded: dict[str, object] = json.loads(path.read_text())
    return loaded


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format="attestmesh-recovery-share/v2"),
        lambda d: d.update(extra=1),
        lambda d: d.update(officer="../x"),
        lambda d: d.update(shares=1),
        lambda d: d["share"].update(x=0),
        lambda d: d["share"].update(x=3),
        lambda d: d["share"].update(threshold=1),
        lambda d: d["share"].update(key_id="AAAA"),
        lambda d: d["share"].update(enc=[[[[[]]]]]),
        lambda d: d["share"].pop("ciphertext"),
    ],
)
def test_malformed_share_files_are_refused(tmp_path: Path, mutate: object) -> None:
    document = _share_document(tmp_path)
    mutate(document)  # type: ignore[operator]
    path = tmp_path / "bad.share"
    path.write_text(json.dumps(document))
    with pytest.raises(SealingError) as caught:
        officers.read_share(path)
    assert caught.value.reason == "recovery.share_file_invalid"


def test_hostile_share_files_are_bounded(tmp_path: Path) -> None:
    deep = tmp_path / "deep.share"
    deep.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(SealingError, match="share_file_invalid"):
        officers.read_share(deep)
    big = tmp_path / "big.share"
    big.write_bytes(b" " * (officers.MAX_SHARE_FILE + 1))
    with pytest.raises(ConfigError, match="too_large"):
        officers.read_share(big)
