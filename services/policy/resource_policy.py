"""The resource policy's input: who asks, for what, with which signed appraisal.

The broker evaluates the operator's resource policy (package ``attestmesh.resource``, KV key
``resources``) for every secret request of a node holding an allow decision, over::

    input.node                  the requesting node (its subject and signed decision agree)
    input.resource.path         the resource name as requested
    input.resource.repository   its parts, as Confidential Containers' key broker names
    input.resource.type         resources: <repository>/<type>/<tag>; the older
    input.resource.tag          <namespace>/<name> form has repository and tag, type ""
    input.appraisal.family      from the policy service's signed decision, never from the
    input.appraisal.status      node: the family and EAR status of the appraisal behind it,
    input.appraisal.hwid        the hardware identity the evidence proved ("" if none),
    input.appraisal.claims      the bounded claims (see :mod:`services.policy.summary`) and
    input.appraisal.claims_omitted  the names of the claims left out of them

A name that is not two or three non-empty parts has every part empty, which matches no
repository. The claims are the bulk of the input and cost most of an evaluation (measured:
0.2 ms for a small input, 0.75 to 1 ms with an SEV-SNP report's 31 claims), so a policy gets
only the claims it names (:func:`claims_read`).
"""

from __future__ import annotations

import re
from typing import Any

from services.policy.summary import AppraisalSummary

ALL_CLAIMS = None
"""What :func:`claims_read` answers for a policy that may read any claim."""
_INPUT = re.compile(r"\binput\b")
_NO_CLAIM = re.compile(
    r"\.(?:node|resource)\b|\.appraisal\.(?:family|status|hwid|claims_omitted)\b"
)
_ONE_CLAIM = re.compile(r"\.appraisal\.claims\.([A-Za-z_][A-Za-z0-9_]*)\b")


def claims_read(source: str) -> frozenset[str] | None:
    """The claims the policy ``source`` can read, or :data:`ALL_CLAIMS`.

    Rego reaches the input only through the word ``input``. A policy that only ever writes
    ``input.node``, ``input.resource...``, ``input.appraisal.family|status|hwid|
    claims_omitted`` and ``input.appraisal.claims.<name>...`` can read no other claim than
    those names. Any other use (``input.appraisal`` or its claims whole, ``claims[x]``,
    ``input[x]``, ``walk(input, ...)``, ``import input.appraisal``, even the word in a
    comment or a string) may read any claim: the analysis only ever errs towards passing
    more of them."""
    names: set[str] = set()
    for found in _INPUT.finditer(source):
        if _NO_CLAIM.match(source, found.end()):
            continue
        claim = _ONE_CLAIM.match(source, found.end())
        if claim is None:
            return ALL_CLAIMS
        names.add(claim.group(1))
    return frozenset(names)


def split(resource: str) -> dict[str, str]:
    """``input.resource`` for the name ``resource``."""
    parts = resource.split("/")
    if all(parts) and len(parts) == 3:
        repository, kind, tag = parts
    elif all(parts) and len(parts) == 2:
        repository, kind, tag = parts[0], "", parts[1]
    else:
        repository = kind = tag = ""
    return {"path": resource, "repository": repository, "type": kind, "tag": tag}


def request_input(
    node: str,
    resource: str,
    appraisal: AppraisalSummary,
    *,
    claims: frozenset[str] | None = ALL_CLAIMS,
) -> dict[str, Any]:
    """The whole input of one evaluation, with the ``claims`` the policy reads."""
    return {
        "node": node,
        "resource": split(resource),
        "appraisal": appraisal.as_input(claims),
    }
