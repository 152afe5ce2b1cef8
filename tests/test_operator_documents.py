"""Operator-signed KV documents: what verifies, what is refused, and what stays in force."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import msgspec
import pytest

from services.mesh.errors import PolicyError
from services.mesh.keys import SigningKey, TrustedKeys
from services.policy import documents, refvalues
from services.policy.ledger import Ledger
from services.testing.memkv import MemoryKeyValue

NOW = datetime(2026, 1, 1, tzinfo=UTC)
OPERATOR = SigningKey.generate("operator")
POLICY = SigningKey.generate("policy")
TRUSTED = TrustedKeys(
    {"operator": OPERATOR._private.public_key(), "policy": POLICY._private.public_key()}
)


def _seal(
    payload: bytes = b'{"measurement": ["aa"]}',
    *,
    signer: SigningKey = OPERATOR,
    key: str = "snp",
    version: int = 1,
) -> bytes:
    return documents.seal(
        signer, bucket="refvalues", key=key, payload=payload, version=version, issued_at=NOW
    )


def _open(raw: bytes, key: str = "snp") -> documents.Document:
    return documents.open_signed(raw, TRUSTED, bucket="refvalues", key=key, kind="refvalues")


def _refused(raw: bytes, key: str = "snp") -> str:
    with pytest.raises(PolicyError) as err:
        _open(raw, key)
    return err.value.reason


def test_a_signed_document_round_trips() -> None:
    document = _open(_seal(version=7))
    assert document.payload == b'{"measurement": ["aa"]}'
    assert (document.version, document.signer, document.key) == (7, "operator", "snp")
    assert document.issued_at == NOW


def test_unsigned_foreign_and_non_operator_documents_are_refused() -> None:
    assert _refused(b'{"measurement": ["aa"]}') == "refvalues.unsigned"
    assert _refused(b"\xff" * 10) == "refvalues.unsigned"
    foreign = SigningKey.generate("operator")
    assert _refused(_seal(signer=foreign)) == "refvalues.unknown_signer"
    assert _refused(_seal(signer=POLICY)) == "refvalues.wrong_signer"


def test_a_tampered_body_or_signature_is_refused() -> None:
    envelope = msgspec.json.decode(_seal())
    body = base64.b64decode(envelope["body"])
    looser = body.replace(b'"version":1', b'"version":9')
    assert looser != body
    assert _refused(msgspec.json.encode({**envelope, "body": _b64(looser)})) == (
        "refvalues.bad_signature"
    )
    signature = bytearray(base64.b64decode(envelope["signature"]))
    signature[-1] ^= 1
    assert _refused(msgspec.json.encode({**envelope, "signature": _b64(bytes(signature))})) == (
        "refvalues.bad_signature"
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_signed_document_cannot_be_replayed_under_another_key() -> None:
    assert _refused(_seal(key="tdx"), key="snp") == "refvalues.wrong_key"
    with pytest.raises(PolicyError, match="policy.wrong_key"):
        documents.open_signed(_seal(), TRUSTED, bucket="policies", key="snp", kind="policy")


def test_oversized_documents_are_refused_before_parsing() -> None:
    assert _refused(b"x" * (documents.MAX_DOCUMENT_BYTES + 1)) == "refvalues.too_large"


def _ledger() -> Ledger:
    return Ledger("refvalues", "refvalues", TRUSTED, validate=refvalues.validate)


def test_the_ledger_keeps_the_last_good_version_against_rollback_and_deletion() -> None:
    ledger = _ledger()
    first = ledger.offer("snp", _seal(version=1))
    assert first is not None and first.version == 1
    ledger.commit(first)
    second = ledger.offer("snp", _seal(b'{"measurement": ["bb"]}', version=2))
    assert second is not None and second.version == 2
    ledger.commit(second)

    assert ledger.offer("snp", _seal(version=1)) is second  # an older signed version
    assert ledger.refusals["snp"] == "refvalues.rollback"
    assert ledger.offer("snp", _seal(b'{"measurement": []}', version=2)) is second
    assert ledger.refusals["snp"] == "refvalues.rollback"  # another body, same version
    assert ledger.offer("snp", None) is second
    assert ledger.refusals["snp"] == "refvalues.deleted"
    assert ledger.offer("snp", b"{}") is second
    assert ledger.refusals["snp"] == "refvalues.unsigned"
    assert ledger.offer("snp", _seal(b'{"measurement": "aa"}', version=3)) is second
    assert ledger.refusals["snp"] == "refvalues.invalid"  # signed, but not reference values

    assert ledger.offer("snp", _seal(b'{"measurement": ["bb"]}', version=2)) is second
    assert "snp" not in ledger.refusals  # the document in force, read again
    third = ledger.offer("snp", _seal(b"{}", version=3))
    assert third is not None and third.version == 3  # a signed, newer change


def test_a_version_between_the_one_in_force_and_a_newer_unusable_one_is_a_rollback() -> None:
    """The operator signed v3, which the service could not use (say it does not compile), so
    v1 stays in force; a writer putting back the signed v2 must not get it in behind v3."""
    ledger = _ledger()
    first = ledger.offer("snp", _seal(version=1))
    assert first is not None
    ledger.commit(first)
    newest = ledger.offer("snp", _seal(b'{"measurement": ["cc"]}', version=3))
    assert newest is not None and newest.version == 3  # offered, never committed
    assert ledger.offer("snp", _seal(b'{"measurement": ["bb"]}', version=2)) is first
    assert ledger.refusals["snp"] == "refvalues.rollback"
    assert ledger.offer("snp", _seal(b'{"measurement": ["dd"]}', version=3)) is first
    assert ledger.refusals["snp"] == "refvalues.rollback"  # another body under v3
    again = ledger.offer("snp", _seal(b'{"measurement": ["cc"]}', version=3))
    assert again is not None and again.version == 3  # v3 itself is still offered
    fourth = ledger.offer("snp", _seal(b'{"measurement": ["ee"]}', version=4))
    assert fourth is not None and fourth.version == 4


def test_nothing_is_in_force_until_a_good_document_arrives() -> None:
    ledger = _ledger()
    assert ledger.offer("tdx", None) is None
    assert ledger.offer("tdx", b'{"measurement": []}') is None
    assert ledger.refusals["tdx"] == "refvalues.unsigned"


async def test_writers_version_by_time_and_never_repeat_their_own() -> None:
    kv = MemoryKeyValue()
    first = await refvalues.store(kv, "snp", {"measurement": ["aa"]}, operator=OPERATOR)
    second = await refvalues.store(kv, "snp", {"measurement": ["bb"]}, operator=OPERATOR)
    assert 0 < first < second
    stored = await kv.get("snp")
    assert stored is not None
    document = _open(stored[0])
    assert document.version == second
    assert refvalues.validate(document.payload) == {"measurement": ["bb"]}
    # Its own version from a clock ahead of ours is followed, so versions never repeat...
    ahead = documents.MAX_VERSION - 10
    await kv.update("snp", _seal(version=ahead), stored[1])
    assert await refvalues.store(kv, "snp", {}, operator=OPERATOR) == ahead + 1
    # ...and so is another signer's from a clock somewhat ahead; one far ahead is not (it
    # could only exhaust the range).
    other = SigningKey.generate("operator-2")
    soon = int(datetime.now(UTC).timestamp() * 1_000_000) + 3600 * 1_000_000
    for claimed, expected in ((soon, soon + 1), (ahead, None)):
        stored = await kv.get("snp")
        assert stored is not None
        await kv.update("snp", _seal(signer=other, version=claimed), stored[1])
        version = await refvalues.store(kv, "snp", {}, operator=OPERATOR)
        assert version == expected if expected else version < soon


def test_versions_follow_the_clock_when_kv_holds_an_older_document() -> None:
    """A writer who puts back an older signed document does not make the next one look old."""
    later = datetime(2026, 6, 1, tzinfo=UTC)
    old = _seal(version=int(NOW.timestamp() * 1_000_000))
    version = documents.next_version(old, OPERATOR, later, bucket="refvalues", key="snp")
    assert version == int(later.timestamp() * 1_000_000)
