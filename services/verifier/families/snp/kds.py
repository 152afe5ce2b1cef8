"""AMD's Key Distribution Service: where a report's VCEK and a product's chain come from.

The URL scheme is AMD's (``/vcek/v1/<Product>/<hwid>?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..``,
plus ``fmcSPL`` on Turin, whose hardware ID is the first 8 bytes of CHIP_ID). A VCEK is a
pure function of product, chip and TCB, so a fetched one is cached forever under its URL.
VLEKs are never on the KDS (cloud providers load them into the firmware), so a VLEK-signed
report must carry its certificate.
"""

from __future__ import annotations

from collections.abc import Mapping

from services.mesh.errors import ParseError
from services.verifier.collateral import CollateralRequest
from services.verifier.families.snp.parse import Product, SigningKey, parse_evidence

DEFAULT_KDS = "https://kdsintf.amd.com"
MAX_CERT_BYTES = 16 * 1024


def vcek_url(base: str, product: Product, chip_id: bytes, tcb: Mapping[str, int]) -> str:
    hwid = chip_id[:8] if product is Product.TURIN else chip_id
    query = (
        f"blSPL={tcb['bootloader']}&teeSPL={tcb['tee']}"
        f"&snpSPL={tcb['snp']}&ucodeSPL={tcb['microcode']}"
    )
    if product is Product.TURIN:
        query += f"&fmcSPL={tcb.get('fmc', 0)}"
    return f"{base.rstrip('/')}/vcek/v1/{product.value.capitalize()}/{hwid.hex()}?{query}"


def cert_chain_url(base: str, product: Product, kind: SigningKey = SigningKey.VCEK) -> str:
    """ASK+ARK (VCEK) or ASVK+ARK (VLEK) of ``product``, PEM."""
    return f"{base.rstrip('/')}/{kind.name.lower()}/v1/{product.value.capitalize()}/cert_chain"


def crl_url(base: str, product: Product) -> str:
    return f"{base.rstrip('/')}/vcek/v1/{product.value.capitalize()}/crl"


def requests_for(
    evidence: bytes, have: Mapping[str, bytes], *, base: str = DEFAULT_KDS
) -> list[CollateralRequest]:
    """What to fetch so ``evidence`` can be verified: the VCEK, unless it is at hand.

    Nothing is requested for evidence that will fail anyway (unparsable, VLEK-signed, chip ID
    masked, or a version 2 report that does not name its product).
    """
    try:
        parsed = parse_evidence(evidence)
    except ParseError:
        return []
    report = parsed.report
    table = parsed.cert_table
    if report.signing_key is not SigningKey.VCEK or report.chip_id_masked:
        return []
    if (table is not None and table.vcek is not None) or "vcek.der" in have:
        return []
    product = report.product_hint
    if product is None:
        return []
    tcb = report.reported_tcb.as_dict()
    url = vcek_url(base, product, report.chip_id, tcb)
    return [CollateralRequest("vcek.der", url, MAX_CERT_BYTES)]
