"""COSE_Sign1 and bounded CBOR: structure, Sig_structure, ES256/384/512, and fuzzing."""

from __future__ import annotations

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from services.mesh.errors import ParseError
from services.testing.amd_pki import ec_key
from services.verifier.families import cose

CURVES = {
    cose.Algorithm.ES256: ec.SECP256R1(),
    cose.Algorithm.ES384: ec.SECP384R1(),
    cose.Algorithm.ES512: ec.SECP521R1(),
}
_KEYS: dict[str, ec.EllipticCurvePrivateKey] = {}


def _key(alg: cose.Algorithm) -> ec.EllipticCurvePrivateKey:
    if alg is cose.Algorithm.ES384:
        return ec_key("test-cose")
    if alg.name not in _KEYS:
        _KEYS[alg.name] = ec.generate_private_key(CURVES[alg])
    return _KEYS[alg.name]


def _parse(data: bytes, **kwargs: object) -> cose.CoseSign1:
    return cose.parse_sign1(data, family="test", max_size=1 << 16, **kwargs)  # type: ignore[arg-type]


def test_sig_structure_is_the_rfc_9052_array() -> None:
    encoded = cose.sig_structure(b"\xa1\x01\x38\x22", b"payload")
    assert cbor2.loads(encoded) == ["Signature1", b"\xa1\x01\x38\x22", b"", b"payload"]
    assert encoded.startswith(b"\x84\x6aSignature1")


@pytest.mark.parametrize("alg", list(cose.Algorithm), ids=lambda a: a.name)
@pytest.mark.parametrize("tagged", [False, True], ids=["untagged", "tagged"])
def test_sign_parse_verify_roundtrip(alg: cose.Algorithm, tagged: bool) -> None:
    key = _key(alg)
    data = cose.sign_sign1(b"hello", key, tagged=tagged)
    sign1 = _parse(data)
    assert sign1.tagged is tagged
    assert sign1.alg == alg
    assert sign1.payload == b"hello"
    assert len(sign1.signature) == 2 * alg.component_size
    assert cose.verify_sign1(sign1, key.public_key())
    assert not cose.verify_sign1(sign1, key.public_key(), external_aad=b"x")
    other = ec.generate_private_key(CURVES[alg]).public_key()
    assert not cose.verify_sign1(sign1, other)


def test_alg_must_match_the_key_curve() -> None:
    key = _key(cose.Algorithm.ES384)
    mislabelled = _parse(cose.sign_sign1(b"x", key, protected={1: -7}, alg=cose.Algorithm.ES384))
    assert cose.algorithm(mislabelled) is cose.Algorithm.ES256
    assert not cose.verify_sign1(mislabelled, key.public_key())


@pytest.mark.parametrize(
    "signature",
    [b"", bytes(96), b"\xff" * 96, bytes(95), bytes(97)],
    ids=["empty", "zero", "out-of-range", "short", "long"],
)
def test_malformed_raw_signatures_do_not_verify(signature: bytes) -> None:
    key = _key(cose.Algorithm.ES384)
    good = _parse(cose.sign_sign1(b"x", key))
    bad = cose.CoseSign1(good.protected, good.protected_header, {}, good.payload, signature, False)
    assert not cose.verify_sign1(bad, key.public_key())


def _envelope(protected: bytes, unprotected: object = None, payload: object = b"p") -> bytes:
    return cbor2.dumps([protected, {} if unprotected is None else unprotected, payload, bytes(96)])


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (cbor2.dumps([b"", {}, b"p"]), "four-element"),
        (cbor2.dumps({"a": 1}), "four-element"),
        (cbor2.dumps(cbor2.CBORTag(98, [b"", {}, b"", b""])), "tag 98"),
        (_envelope(b""), "alg is not in the protected header"),
        (_envelope(cbor2.dumps({1: -35, 2: [1]})), "critical"),
        (_envelope(cbor2.dumps({1: -35}), {1: -7}), "both protected and unprotected"),
        (_envelope(cbor2.dumps([1])), "protected header is not a map"),
        (_envelope(cbor2.dumps({1: -35}), payload=None), "detached payload"),
        (_envelope(cbor2.dumps({1: -35}), payload="text"), "payload is not a byte string"),
        (cbor2.dumps(["x", {}, b"", b""]), "protected header is not a byte string"),
        (cbor2.dumps([b"", [], b"", b""]), "unprotected header is not a map"),
        (cbor2.dumps([b"\xa1\x01\x38\x22", {}, b"", "sig"]), "signature is not a byte string"),
    ],
)
def test_malformed_envelopes(data: bytes, fragment: str) -> None:
    with pytest.raises(ParseError, match=fragment) as info:
        _parse(data)
    assert info.value.reason == "test.cose_malformed"


def test_untagged_is_refused_when_a_tag_is_required() -> None:
    data = cose.sign_sign1(b"x", _key(cose.Algorithm.ES384))
    with pytest.raises(ParseError, match="tag 18"):
        _parse(data, require_tag=True)


def _decode(data: bytes, **kwargs: object) -> object:
    return cose.decode_cbor(data, what="t", code="t.bad", max_size=4096, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"\x9f\x01", "truncated"),
        (b"\xbf\x01\x02", "truncated"),
        (b"\xbf\x01\xff", "between a map key and its value"),
        (b"\xbf\x41a\x01\xff", "not an integer or a text string"),
        (b"\xbf\x01\x01\x01\x02\xff", "undecodable"),
        (b"\x5f\x61a\xff", "another major type"),
        (b"\x7f\x41a\xff", "another major type"),
        (b"\x5f\x5f\x41a\xff\xff", "is indefinite"),
        (b"\x5f\x01\xff", "another major type"),
        (b"\x5f\x5a\xff\xff\xff\xff\xff", "longer than the input"),
        (b"\x9f" * 12 + b"\xff" * 12, "nested deeper"),
        (b"\x3f", "reserved"),
        (b"\xdf\x00", "reserved"),
        (b"\x81\xff", "break outside"),
        (b"\x9f\x01\xff\xff", "trailing"),
        (b"\x01\x02", "trailing"),
        (b"\x9a\xff\xff\xff\xff", "longer than the input"),
        (b"\xbb" + b"\xff" * 8, "longer than the input"),
        (b"\x5b\x00\x00\x00\x01\x00\x00\x00\x00", "longer than the input"),
        (b"\x1c", "reserved"),
        (b"\xc1\x01", "tag 1"),
        (b"\xd8\x1c\x81\xd8\x1d\x00", "tag 28"),
        (b"\xa1\x41a\x01", "not an integer or a text string"),
        (b"\xa1\x81\x01\x01", "not an integer or a text string"),
        (b"\xf8\x14", "simple value"),
        (b"\xf0", "simple value"),
        (b"\xff", "break outside"),
        (b"\x81" * 12 + b"\x00", "nested deeper"),
        (b"\x62\xff\xfe", "undecodable"),
        (b"\xa2\x01\x01\x01\x02", "undecodable"),
        (b"\x19\x01", "truncated"),
    ],
)
def test_bounded_decoding_refuses_abuse(data: bytes, fragment: str) -> None:
    with pytest.raises(ParseError, match=fragment) as info:
        _decode(data)
    assert info.value.reason == "t.bad"


@pytest.mark.parametrize(
    ("data", "value"),
    [
        (b"\x9f\xff", []),
        (b"\x9f\x01\x9f\x02\xff\xff", [1, [2]]),
        (b"\xbf\xff", {}),
        (b"\xbf\x61a\x01\x02\x9f\xff\xff", {"a": 1, 2: []}),
        (b"\x5f\x41a\x40\x42bc\xff", b"abc"),
        (b"\x7f\x61a\x62bc\xff", "abc"),
        (b"\x82\x9f\xff\xbf\xff", [[], {}]),
    ],
)
def test_indefinite_length_items_decode(data: bytes, value: object) -> None:
    """RFC 8949 section 3.2 items, as current NSM firmware emits them, decode like definite ones."""
    assert _decode(data) == value


def test_bounded_decoding_limits() -> None:
    with pytest.raises(ParseError, match="more than the 4096"):
        _decode(cbor2.dumps(bytes(5000)))
    with pytest.raises(ParseError, match="more than 4096 CBOR data items"):
        cose.decode_cbor(cbor2.dumps([0] * 5000), what="t", code="t.bad", max_size=1 << 20)
    with pytest.raises(ParseError, match="more than 4096 CBOR data items"):
        empty_chunks = b"\x5f" + b"\x40" * 5000 + b"\xff"
        cose.decode_cbor(empty_chunks, what="t", code="t.bad", max_size=1 << 20)
    assert _decode(b"\xd2\x80", tags=frozenset({18})) == cbor2.CBORTag(18, ())
    assert _decode(cbor2.dumps([1.5, True, None, -3, "x"])) == [1.5, True, None, -3, "x"]


def test_cose_key_and_points() -> None:
    key = _key(cose.Algorithm.ES384).public_key()
    numbers = key.public_numbers()
    x, y = numbers.x.to_bytes(48, "big"), numbers.y.to_bytes(48, "big")
    assert cose.ec_from_cose_key({1: 2, -1: 2, -2: x, -3: y}, code="c") == key
    for bad, fragment in [
        ({1: 1, -1: 2, -2: x, -3: y}, "kty"),
        ({1: 2, -1: 9, -2: x, -3: y}, "crv"),
        ({1: 2, -1: 2, -2: x, -3: True}, "48-byte"),
        ({1: 2, -1: 2, -2: x, -3: y, -4: b"d"}, "private"),
        ({1: 2, -1: 2, -2: x, -3: bytes(48)}, "not on"),
    ]:
        with pytest.raises(ParseError, match=fragment):
            cose.ec_from_cose_key(bad, code="c")
    with pytest.raises(ParseError, match="uncompressed"):
        cose.ec_from_point(b"\x02" + x, ec.SECP384R1(), code="c")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_ever_raise_parse_error(data: bytes) -> None:
    try:
        cose.parse_sign1(data, family="fuzz", max_size=512)
    except ParseError as exc:
        assert exc.reason == "fuzz.cose_malformed"


_VALID = cose.sign_sign1(cbor2.dumps({"k": [1, b"v", {"n": -1}]}), ec_key("test-cose"))


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(_VALID) - 1), st.integers(1, 255), st.integers(0, 8))
def test_mutated_envelopes_only_ever_raise_parse_error(index: int, xor: int, cut: int) -> None:
    data = bytearray(_VALID)
    data[index] ^= xor
    mutated = bytes(data[: len(data) - cut])
    key = ec_key("test-cose").public_key()
    try:
        sign1 = cose.parse_sign1(mutated, family="fuzz", max_size=4096)
    except ParseError:
        return
    assert not cose.verify_sign1(sign1, key) or mutated == _VALID


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**64), 2**64 - 1)
        | st.binary(max_size=8)
        | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.integers(-5, 5) | st.text(max_size=3), inner, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_well_formed_cbor_roundtrips(value: object) -> None:
    encoded = cbor2.dumps(value)
    try:
        decoded = _decode(encoded)
    except ParseError as exc:
        assert "nested deeper" in exc.detail or "bignum" in exc.detail or "tag 2" in exc.detail
        return
    assert cbor2.dumps(decoded) == encoded
