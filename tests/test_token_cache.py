"""Reading signed tokens: one signature check per token, everything else on every use.

A verified token's signature is remembered (``TrustedKeys`` keeps a bounded cache); these
tests pin what that must never change: a tampered twin, an expired token, a signer outside
its role and another consumer's keys are refused exactly as without the cache.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import jwt
import pytest

from services.mesh import jws, keys
from services.mesh.errors import VerificationError
from services.mesh.keys import SigningKey, TrustedKeys

NOW = datetime(2026, 1, 1, tzinfo=UTC)
POLICY_ONLY = {"accept": lambda name: name == "policy"}


def _claims(ttl: int = 60, **extra: object) -> dict[str, object]:
    iat = int(NOW.timestamp())
    return {"iat": iat, "exp": iat + ttl, "node": "n1", "allow": True, **extra}


def _segment(data: dict[str, object]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _tampered(token: str) -> str:
    """The same header and signature over a payload that says ``allow: false``."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return ".".join([header, _segment({**claims, "allow": False}), signature])


@pytest.fixture
def policy() -> SigningKey:
    return SigningKey.generate("policy")


def test_a_tampered_twin_of_a_cached_token_is_refused(policy: SigningKey) -> None:
    trusted = TrustedKeys({"policy": policy.public_key()})
    token = policy.sign(_claims())
    assert trusted.verify(token, now=NOW, **POLICY_ONLY)["allow"] is True
    assert len(trusted._verified) == 1
    with pytest.raises(VerificationError) as err:
        trusted.verify(_tampered(token), now=NOW, **POLICY_ONLY)
    assert err.value.reason == "token.invalid"
    assert len(trusted._verified) == 1  # a token that failed is never remembered
    assert trusted.verify(token, now=NOW, **POLICY_ONLY)["allow"] is True


def test_a_cached_token_expires_like_any_other(policy: SigningKey) -> None:
    trusted = TrustedKeys({"policy": policy.public_key()})
    token = policy.sign(_claims(ttl=60))
    trusted.verify(token, now=NOW, **POLICY_ONLY)
    assert token in trusted._verified._entries
    with pytest.raises(VerificationError, match="token.expired"):
        trusted.verify(token, now=NOW + timedelta(seconds=61), **POLICY_ONLY)


def test_a_cached_token_is_still_held_to_its_signers_role(policy: SigningKey) -> None:
    trusted = TrustedKeys({"policy": policy.public_key()})
    token = policy.sign(_claims())
    trusted.verify(token, now=NOW, **POLICY_ONLY)
    with pytest.raises(VerificationError, match="token.wrong_signer"):
        trusted.verify(token, now=NOW, accept=lambda name: name.startswith("verifier-"))


def test_another_consumers_cache_does_not_vouch_for_a_key_it_does_not_trust(
    policy: SigningKey,
) -> None:
    token = policy.sign(_claims())
    TrustedKeys({"policy": policy.public_key()}).verify(token, now=NOW, **POLICY_ONLY)
    stranger = TrustedKeys({"policy": SigningKey.generate("policy").public_key()})
    with pytest.raises(VerificationError, match="token.unknown_signer"):
        stranger.verify(token, now=NOW, **POLICY_ONLY)


def test_claims_are_read_afresh_on_every_use(policy: SigningKey) -> None:
    trusted = TrustedKeys({"policy": policy.public_key()})
    token = policy.sign(_claims(reasons=["a"]))
    first = trusted.verify(token, now=NOW, **POLICY_ONLY)
    first["allow"] = False
    first["reasons"].append("changed")
    again = trusted.verify(token, now=NOW, **POLICY_ONLY)
    assert again["allow"] is True and again["reasons"] == ["a"]


def test_the_cache_is_bounded_in_entries_and_characters(
    policy: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keys, "MAX_CACHED_TOKENS", 3)
    trusted = TrustedKeys({"policy": policy.public_key()})
    tokens = [policy.sign(_claims(n=i)) for i in range(5)]
    for token in tokens:
        trusted.verify(token, now=NOW, **POLICY_ONLY)
    assert list(trusted._verified._entries) == tokens[2:]  # least recently used went first
    trusted.verify(tokens[2], now=NOW, **POLICY_ONLY)
    trusted.verify(tokens[0], now=NOW, **POLICY_ONLY)  # checked again, then remembered
    assert list(trusted._verified._entries) == [tokens[4], tokens[2], tokens[0]]

    monkeypatch.setattr(keys, "MAX_CACHED_CHARS", 2 * len(tokens[0]) + 10)
    trusted = TrustedKeys({"policy": policy.public_key()})
    for token in tokens:
        trusted.verify(token, now=NOW, **POLICY_ONLY)
    assert len(trusted._verified) == 2
    assert trusted._verified.chars == sum(len(t) for t in tokens[3:])

    monkeypatch.setattr(keys, "MAX_CACHED_TOKEN_CHARS", len(tokens[0]) - 1)
    trusted = TrustedKeys({"policy": policy.public_key()})
    assert trusted.verify(tokens[0], now=NOW, **POLICY_ONLY)["n"] == 0
    assert len(trusted._verified) == 0


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"alg": "none", "kid": "K"}, "token.invalid"),
        ({"alg": "HS256", "kid": "K"}, "token.invalid"),
        ({"kid": "K"}, "token.invalid"),
        ({"alg": "ES256"}, "token.unknown_signer"),
        ({"alg": "ES256", "kid": ["K"]}, "token.unknown_signer"),
        ({"alg": "ES256", "kid": "K", "crit": ["exp"]}, "token.invalid"),
    ],
)
def test_only_es256_headers_naming_a_trusted_key_are_read(
    policy: SigningKey, header: dict[str, object], reason: str
) -> None:
    trusted = TrustedKeys({"policy": policy.public_key()})
    _, payload, signature = policy.sign(_claims()).split(".")
    if header.get("kid") == "K":
        header["kid"] = policy.kid
    forged = ".".join([_segment(header), payload, signature])
    with pytest.raises(VerificationError) as err:
        trusted.verify(forged, now=NOW, **POLICY_ONLY)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t + "=",
        lambda t: t.replace(".", "..", 1),
        lambda t: t[:10] + "é" + t[11:],
        lambda t: t[:-1] + "+",
        lambda t: ".".join(t.split(".")[:2]),
    ],
)
def test_anything_but_the_compact_alphabet_is_malformed(policy: SigningKey, mangle: object) -> None:
    trusted = TrustedKeys({"policy": policy.public_key()})
    assert callable(mangle)
    with pytest.raises(VerificationError) as err:
        trusted.verify(mangle(policy.sign(_claims())), now=NOW, **POLICY_ONLY)
    assert err.value.reason == "token.malformed"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"iat": 1}, "token.invalid"),  # no exp
        ({"exp": 2**40}, "token.invalid"),  # no iat
        ({"iat": 1, "exp": 2**40, "aud": "x"}, "token.invalid"),
        ({"iat": 1, "exp": 2**40, "nbf": 2**40}, "token.invalid"),
        ({"iat": 1, "exp": "never"}, "token.expired"),
        ({"iat": 1, "exp": 2**40, "iss": "someone"}, "token.wrong_issuer"),
    ],
)
def test_claims_are_checked_after_the_signature(
    policy: SigningKey, claims: dict[str, object], reason: str
) -> None:
    trusted = TrustedKeys({"policy": policy.public_key()})
    token = jws.sign({"iss": "policy", **claims}, policy._private, policy.kid)
    with pytest.raises(VerificationError) as err:
        trusted.verify(token, now=NOW, **POLICY_ONLY)
    assert err.value.reason == reason


def test_tokens_are_standard_jws_both_ways(policy: SigningKey) -> None:
    """PyJWT, an independent implementation, reads ours, and we read its."""
    ours = policy.sign(_claims())
    read = jwt.decode(
        ours, policy.public_key(), algorithms=["ES256"], options={"verify_exp": False}
    )
    assert read["iss"] == "policy" and read["node"] == "n1"
    assert jwt.get_unverified_header(ours)["kid"] == policy.kid
    theirs = jwt.encode(
        {**_claims(), "iss": "policy"},
        policy._private,
        algorithm="ES256",
        headers={"kid": policy.kid},
    )
    trusted = TrustedKeys({"policy": policy.public_key()})
    assert trusted.verify(theirs, now=NOW, **POLICY_ONLY)["node"] == "n1"
