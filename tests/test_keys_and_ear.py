"""Signed verdicts: only known verifier keys, unexpired, untampered tokens are accepted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.mesh.errors import ConfigError, VerificationError
from services.mesh.keys import SigningKey, TrustedKeys
from services.verifier import ear
from services.verifier.families.base import Appraisal, Reason, Status

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SUBJECT = ear.Subject(node="n1", evidence_id="e1", nonce=b"n" * 32, public_key=b"k" * 32)


def _appraisal() -> Appraisal:
    return Appraisal(
        family="snp",
        status=Status.WARNING,
        claims={"measurement": "ab"},
        trust_vector={"hardware": 2},
        reasons=[Reason("snp.x", "why", Status.WARNING)],
        verified=True,
    )


def test_ear_round_trip() -> None:
    key = SigningKey.generate("verifier-snp")
    token = ear.issue(key, _appraisal(), SUBJECT, now=NOW, ttl=60)
    result = ear.read(token, TrustedKeys({"verifier-snp": key._private.public_key()}), now=NOW)
    assert result.status is Status.WARNING
    assert result.subject == SUBJECT
    assert result.claims == {"measurement": "ab"}
    assert result.reasons == [{"code": "snp.x", "message": "why"}]
    assert result.verified is True and result.issuer == "verifier-snp"


def test_unknown_signer_is_refused() -> None:
    token = ear.issue(SigningKey.generate("verifier-snp"), _appraisal(), SUBJECT, now=NOW, ttl=60)
    other = SigningKey.generate("verifier-snp")
    with pytest.raises(VerificationError) as err:
        ear.read(token, TrustedKeys({"verifier-snp": other._private.public_key()}), now=NOW)
    assert err.value.reason == "token.unknown_signer"


def test_a_known_key_outside_its_role_is_refused() -> None:
    policy = SigningKey.generate("policy")
    token = ear.issue(policy, _appraisal(), SUBJECT, now=NOW, ttl=60)
    with pytest.raises(VerificationError, match="token.wrong_signer"):
        ear.read(token, TrustedKeys({"policy": policy._private.public_key()}), now=NOW)


def test_expired_and_tampered_tokens_are_refused() -> None:
    key = SigningKey.generate("verifier-snp")
    trusted = TrustedKeys({"verifier-snp": key._private.public_key()})
    token = ear.issue(key, _appraisal(), SUBJECT, now=NOW, ttl=60)
    with pytest.raises(VerificationError, match="token.expired"):
        ear.read(token, trusted, now=NOW + timedelta(seconds=61))
    header, payload, signature = token.split(".")
    flipped = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1]
    with pytest.raises(VerificationError, match="token.invalid"):
        ear.read(".".join([header, flipped, signature]), trusted, now=NOW)
    with pytest.raises(VerificationError, match="token.malformed"):
        ear.read("not-a-jwt", trusted, now=NOW)


def test_key_files_are_private_and_reloaded(tmp_path: Path) -> None:
    key = SigningKey.load_or_create("policy", tmp_path)
    assert (tmp_path / "policy.key").stat().st_mode & 0o777 == 0o600
    assert SigningKey.load_or_create("policy", tmp_path).kid == key.kid
    key.publish_to(tmp_path / "trusted")
    assert TrustedKeys.load(tmp_path / "trusted").names() == ["policy"]
    (tmp_path / "policy.key").chmod(0o644)
    with pytest.raises(ConfigError, match="keys.permissions"):
        SigningKey.load_or_create("policy", tmp_path)
