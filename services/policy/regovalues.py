"""Which Python values regopy's ``Input`` carries to the interpreter exactly.

regopy 1.5 passes strings to the interpreter unescaped and integers as signed 64 bits: a
``"`` or ``\\`` breaks the value, non-ASCII text compares unequal to itself and 2**64 - 1
reads as -1. Arrays it builds compare and iterate correctly but are not well-formed terms:
``json.marshal`` of one (or of an object holding one) is undefined, so a rule written on it
would silently not fire. :func:`plain` tells the values that avoid all of that; anything
else goes to the interpreter as JSON text (:mod:`services.policy.engine`).
"""

from __future__ import annotations

import math
import re
from typing import Any

_PLAIN_TEXT = re.compile(r"[\x20-\x21\x23-\x5b\x5d-\x7e]*")
"""Printable ASCII but ``"`` and ``\\``: what regopy's ``Input`` carries intact."""
_INT64 = range(-(2**63), 2**63)


def plain_text(value: str) -> bool:
    """Whether the string ``value`` reaches the interpreter intact by either path."""
    return _PLAIN_TEXT.fullmatch(value) is not None


def plain(value: Any) -> bool:
    """Whether regopy's ``Input`` reproduces ``value`` exactly (see the module docstring)."""
    if value is None or value is True or value is False:
        return True
    if isinstance(value, str):
        return plain_text(value)
    if isinstance(value, int):
        return value in _INT64
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain_text(k) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return not value  # see the module docstring: a non-empty array is not exact
    return False
