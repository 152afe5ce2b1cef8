"""A nesting-depth bound for untrusted JSON, checked before any recursive parser sees it.

Both ``json.loads`` and msgspec recurse once per ``[`` or ``{`` (msgspec even when it skips
a field the target type does not have), so a few kilobytes of brackets raise
``RecursionError``: not a ``ParseError``, so it escaped the families' error handling, printed
a traceback from ``attestmesh verify`` and made the bus redeliver the message until it was
dead-lettered. Every JSON document the mesh accepts from outside is shallow (evidence
documents nest three or four levels), so a small fixed bound costs nothing legitimate.

The check runs in the regular-expression engine, linear in the input: strings are cut out
first (possessive quantifiers, so no backtracking even on hostile runs of quotes and
backslashes; an unterminated string swallows the rest, which a parser would reject), then the
brackets left are summed as +1/-1 and the highest running total is the depth. A closing
bracket too many makes the document invalid at that point, before any parser goes deeper, so
taking the maximum over the whole input can only over-count, never under-count.
"""

from __future__ import annotations

import re
from itertools import accumulate

from services.mesh.errors import ParseError

MAX_DEPTH = 32

_STRINGS = re.compile(rb'"(?:[^"\\]*+(?:\\.[^"\\]*+)*+"|.*)', re.DOTALL)
_NOT_BRACKETS = re.compile(rb"[^\[\]{}]++")
_STEP = tuple(1 if c in b"[{" else -1 if c in b"]}" else 0 for c in range(256))


def depth(data: bytes) -> int:
    """The deepest bracket nesting of ``data`` outside JSON strings (0 for a scalar)."""
    brackets = _NOT_BRACKETS.sub(b"", _STRINGS.sub(b"", data))
    return max(accumulate(map(_STEP.__getitem__, brackets), initial=0))


def check_depth(data: bytes, reason: str, *, limit: int = MAX_DEPTH) -> None:
    """Raise ``ParseError(reason)`` if ``data`` nests JSON deeper than ``limit``."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return  # cannot nest deeper than it has openers: the common, shallow case
    if depth(data) > limit:
        raise ParseError(reason, f"JSON nested deeper than {limit} levels")
