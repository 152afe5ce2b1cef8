"""The appraisal policy's view of a verdict: its input cut to what it reads, and its
reference values arranged for lookups.

Both exist because of what the interpreter costs per verdict (regopy 1.5, measured with an
SEV-SNP appraisal): building and setting the input is about 2.5 µs per value it holds, so an
SEV-SNP report's 32 claims (160 values) cost 0.5 ms before any rule runs; and in the
interpreter, ``x in array``, a function called on a value, or a subtree of ``data`` taken as a
whole (bound to a variable, or tested by ``not``) cost time in proportion to its size, so the
packaged policy written over ``data.refvalues`` arrays cost 0.36 ms at 100 reference values
of a claim and 2.6 ms at 1,000. A path that ends at one value of ``data`` costs the same at
any size.

**The input** a policy is given holds only the fields it names (:func:`reads`). The fields of
the whole input::

    input.family, input.status, input.verified, input.simulated, input.node
    input.reasons      the EAR's reason codes
    input.claims       the EAR's claims
    input.refclaims    those of them that the family's reference values name

A policy that writes only ``input.<field>`` and ``input.claims.<name>`` can read nothing else,
so it gets those fields and, of the claims, those names. Any other use of the word ``input``
(``input.claims[x]``, ``input[x]``, ``walk(input, ...)``, an import of ``input`` or of
``input.claims``, even the word in a comment or a string) may read anything, and gets the
whole input: the analysis only ever errs towards passing more. A policy reads claims by
name from ``input.refclaims`` (``input.refclaims[name]``), as the packaged one does, without
being given the rest.

**The reference values** are also handed over, beside ``data.refvalues`` (unchanged), as
``data.refindex[family]``::

    claims     the claims with at least one value
    strings    per claim, its values that are plain strings, as the keys of an object
    others     per claim, its other values (numbers, placeholders, other strings), a list

A string key is looked up exactly; only strings that reach the interpreter intact by every
path (:func:`~services.policy.regovalues.plain_text`) are keys, and every other value is
compared with ``in`` as before, so a lookup decides exactly as ``x in data.refvalues[...]``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from services.policy.regovalues import plain_text

REFINDEX = "refindex"
"""The ``data`` key of the arranged reference values."""
FIELDS = frozenset(
    {"family", "status", "verified", "simulated", "node", "reasons", "claims", "refclaims"}
)
_INPUT = re.compile(r"\binput\b")
_CLAIM = re.compile(r"\.claims\.([A-Za-z_][A-Za-z0-9_]*)\b")
_FIELD = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)\b")


@dataclass(frozen=True)
class Reads:
    """What of the input a policy can read; ``None``: all of it."""

    fields: frozenset[str] | None
    claims: frozenset[str] | None
    """The claims it can read, if it reads ``input.claims`` at all."""


EVERYTHING = Reads(fields=None, claims=None)


def reads(source: str) -> Reads:
    """What the policy ``source`` can read of its input (see the module docstring)."""
    fields: set[str] = set()
    claims: set[str] = set()
    every_claim = False
    for found in _INPUT.finditer(source):
        claim = _CLAIM.match(source, found.end())
        if claim is not None:
            fields.add("claims")
            claims.add(claim.group(1))
            continue
        field = _FIELD.match(source, found.end())
        if field is None or field.group(1) not in FIELDS:
            return EVERYTHING
        fields.add(field.group(1))
        every_claim = every_claim or field.group(1) == "claims"
    return Reads(frozenset(fields), None if every_claim else frozenset(claims))


def restrict(document: Mapping[str, Any], read: Reads, compared: Collection[str]) -> dict[str, Any]:
    """The input for ``document`` (the whole input but ``refclaims``) that a policy reading
    ``read`` is given; ``compared`` are the claims the family's reference values name."""
    claims = document.get("claims")
    if not isinstance(claims, Mapping):
        claims = {}
    whole = {**document, "refclaims": {name: claims[name] for name in compared if name in claims}}
    if read.fields is None:
        return whole
    kept = {field: whole[field] for field in read.fields if field in whole}
    if read.claims is not None and "claims" in kept:
        kept["claims"] = {name: claims[name] for name in read.claims if name in claims}
    return kept


def compared_claims(refvalues: Any) -> dict[str, frozenset[str]]:
    """Per family, the claims its reference values name (with values or not)."""
    if not isinstance(refvalues, Mapping):
        return {}
    return {
        family: frozenset(claims)
        for family, claims in refvalues.items()
        if isinstance(claims, Mapping)
    }


def index(refvalues: Any) -> dict[str, Any]:
    """``data.refindex`` for ``data.refvalues`` (see the module docstring). A family whose
    values are not an object, and a claim whose values are not a list, are left out, as
    the packaged policy ignored them."""
    found: dict[str, Any] = {}
    if not isinstance(refvalues, Mapping):
        return found
    for family, claims in refvalues.items():
        if not isinstance(claims, Mapping):
            continue
        names: list[str] = []
        strings: dict[str, dict[str, bool]] = {}
        others: dict[str, list[Any]] = {}
        for name, allowed in claims.items():
            if not isinstance(allowed, list) or not allowed:
                continue
            names.append(name)
            strings[name] = {v: True for v in allowed if isinstance(v, str) and plain_text(v)}
            others[name] = [v for v in allowed if not (isinstance(v, str) and plain_text(v))]
        found[family] = {"claims": names, "strings": strings, "others": others}
    return found
