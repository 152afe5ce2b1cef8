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
repository. The claims are the bulk of the input and cost most of an evaluation, so a
policy that cannot read them does not get them (:func:`reads_claims`).
"""

from __future__ import annotations

import re
from typing import Any

from services.policy.summary import AppraisalSummary

_INPUT = re.compile(r"\binput\b")
_CLAIM_FREE = re.compile(r"\.(?:node|resource)\b|\.appraisal\.(?:family|status|hwid)\b")
"""What may follow ``input`` in a policy that cannot read the claims."""


def reads_claims(source: str) -> bool:
    """Whether the policy ``source`` could read ``input.appraisal.claims``.

    Rego reaches the input only through the word ``input``; a policy that only ever writes
    ``input.node``, ``input.resource...`` or ``input.appraisal.family|status|hwid`` cannot
    read the claims. Any other use (``input.appraisal`` whole, ``input[x]``, ``walk(input,
    ...)``, ``import input.appraisal``, even the word in a comment or a string) counts as reading
    them: the check may only err towards passing the claims."""
    return any(_CLAIM_FREE.match(source, found.end()) is None for found in _INPUT.finditer(source))


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
    node: str, resource: str, appraisal: AppraisalSummary, *, with_claims: bool
) -> dict[str, Any]:
    """The whole input of one evaluation."""
    return {
        "node": node,
        "resource": split(resource),
        "appraisal": appraisal.as_input(with_claims=with_claims),
    }
