"""What a reference value for a claim must look like, per family.

The release policy compares a node's claim with the reference values by equality, so a value
written in another spelling (upper-case hex, a ``0x`` prefix, a truncated digest) never
matches anything: the node is denied and nobody learns why. Checking each value against the
format the verifier emits the claim in, when the operator adds it, turns that silent deny
into an error at the command line. Hex values are normalised to the verifier's lower case.

Claims not listed here are accepted as bounded printable text or integers: a family's
verifier may emit claims this table does not know yet, and a value that cannot match only
ever denies.
"""

from __future__ import annotations

import re

from services.mesh.errors import PolicyError

MAX_TEXT = 512
_HEX = re.compile(r"[0-9a-f]*")

_SNP = {
    "measurement": 48,
    "host_data": 32,
    "id_key_digest": 48,
    "author_key_digest": 48,
    "family_id": 16,
    "image_id": 16,
    "report_data": 64,
    "chip_id": 64,
}
_TDX = {
    "mrtd": 48,
    "mrconfigid": 48,
    "mrowner": 48,
    "mrownerconfig": 48,
    "mrseam": 48,
    "mrsignerseam": 48,
    "mrservicetd": 48,
    "report_data": 64,
    "rtmr0": 48,
    "rtmr1": 48,
    "rtmr2": 48,
    "rtmr3": 48,
}
_SGX = {"mrenclave": 32, "mrsigner": 32, "configid": 64, "report_data": 64}
_NITRO = {f"pcr{i}": 48 for i in range(32)}

HEX_BYTES: dict[str, dict[str, int]] = {
    "snp": _SNP,
    "az-snp-vtpm": _SNP,
    "tdx": _TDX,
    "az-tdx-vtpm": _TDX,
    "sgx": _SGX,
    "nitro": _NITRO,
    "cca": {"realm_personalization_value": 64},
}
"""Per family, claims that are fixed-size binary values and their size in bytes."""

INTEGER: dict[str, frozenset[str]] = {
    "snp": frozenset({"guest_svn", "vmpl", "version"}),
    "az-snp-vtpm": frozenset({"guest_svn", "vmpl", "version"}),
    "sgx": frozenset({"isvprodid", "isvsvn", "configsvn"}),
}
"""Per family, claims the verifier emits as integers."""

_HEX_ANY_DIGEST = frozenset({20, 32, 48, 64})
"""Digest sizes accepted where the hash algorithm varies (TPM PCRs, CCA measurements)."""
_VARIABLE_DIGESTS: dict[str, re.Pattern[str]] = {
    "tpm": re.compile(r"pcr([0-9]|1[0-9]|2[0-3])"),
    "cca": re.compile(r"realm_initial_measurement|realm_extensible_measurements_[0-3]"),
}


def normalise(family: str, claim: str, value: str) -> str | int:
    """``value`` as the verifier of ``family`` emits ``claim``, or ``refvalues.bad_value``."""
    if not 0 < len(claim) <= 64 or not claim.isidentifier():
        raise PolicyError("refvalues.bad_claim", f"claim name {claim[:64]!r}")
    if claim in INTEGER.get(family, ()):
        try:
            number = int(value, 10)
        except ValueError:
            raise PolicyError("refvalues.bad_value", f"{family} {claim} is an integer") from None
        if not 0 <= number < 2**64:
            raise PolicyError("refvalues.bad_value", f"{family} {claim} is out of range")
        return number
    size = HEX_BYTES.get(family, {}).get(claim)
    pattern = _VARIABLE_DIGESTS.get(family)
    if size is not None or (pattern is not None and pattern.fullmatch(claim)):
        text = value.lower()
        sizes = {size} if size is not None else _HEX_ANY_DIGEST
        if _HEX.fullmatch(text) is None or len(text) // 2 not in sizes or len(text) % 2:
            wanted = " or ".join(str(n) for n in sorted(sizes))
            raise PolicyError(
                "refvalues.bad_value", f"{family} {claim} is {wanted} bytes of hex (lower case)"
            )
        return text
    if not 0 < len(value) <= MAX_TEXT or not value.isprintable():
        raise PolicyError("refvalues.bad_value", f"{claim}: 1..{MAX_TEXT} printable characters")
    return value
