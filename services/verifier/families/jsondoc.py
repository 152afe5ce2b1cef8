"""Bounded reading of the JSON evidence documents attestation agents emit.

Evidence arrives either in a vendor's binary format or wrapped in a JSON document (Confidential
Containers' agents wrap SNP reports and TDX quotes so), and the two are told apart by content:
a binary report or quote starts with a little-endian version number, never with ``{``.

A document is untrusted input, so its size and nesting depth are checked before anything
parses it: the depth with :mod:`services.mesh.boundedjson`'s linear scan, the one every JSON
parser of the mesh uses, because ``json.loads`` on a few thousand nested brackets raises
``RecursionError`` instead of a clean refusal. Duplicate
keys, non-finite numbers and floats are refused too: a document must mean one thing to every
reader, and none of these formats has a fractional number in it.
"""

from __future__ import annotations

import binascii
import json
from typing import Any, NoReturn

from services.mesh import boundedjson
from services.mesh.errors import ParseError

_WHITESPACE = b" \t\r\n"


def is_json_document(data: bytes) -> bool:
    """True when ``data`` is meant as a JSON object: its first non-space byte is ``{``."""
    return data.lstrip(_WHITESPACE)[:1] == b"{"


def load_document(data: bytes, *, reason: str, max_bytes: int, max_depth: int) -> dict[str, Any]:
    """Decode one JSON object of at most ``max_bytes`` bytes and ``max_depth`` nesting levels.

    Every refusal is a :class:`ParseError` with ``reason``.
    """
    if len(data) > max_bytes:
        raise ParseError(reason, f"JSON document of {len(data)} bytes exceeds {max_bytes}")
    boundedjson.check_depth(data, reason, limit=max_depth)
    try:
        document = json.loads(
            data,
            object_pairs_hook=_unique_keys,
            parse_float=_no_float,
            parse_constant=_no_constant,
        )
    except _Refused as exc:
        raise ParseError(reason, str(exc)) from None
    except json.JSONDecodeError as exc:
        raise ParseError(reason, f"not JSON: {exc.msg} at byte {exc.pos}") from None
    except (ValueError, RecursionError) as exc:
        raise ParseError(reason, f"not JSON: {type(exc).__name__}") from None
    if not isinstance(document, dict):
        raise ParseError(reason, "the document is not a JSON object")
    return document


def b64decode(text: str, *, reason: str, what: str) -> bytes:
    """Strict standard base64 (padding required, no stray characters)."""
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ParseError(reason, f"{what} is not standard base64") from None


class _Refused(ValueError):
    """Raised from inside the decoder's hooks, turned into a ParseError by the caller."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {key[:64]!r}")
        out[key] = value
    return out


def _no_float(text: str) -> NoReturn:
    raise _Refused(f"a fractional or exponent number ({text[:32]})")


def _no_constant(text: str) -> NoReturn:
    raise _Refused(f"a non-finite number ({text})")
