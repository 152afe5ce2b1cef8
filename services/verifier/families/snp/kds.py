"""AMD's Key Distribution Service: where a report's VCEK and a product's chain come from.

The URL scheme is AMD's (``/vcek/v1/<Product>/<hwid>?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..``,
plus ``fmcSPL`` on Turin, whose hardware ID is the first 8 bytes of CHIP_ID). A VCEK is a
pure function of product, chip and TCB, so a fetched one is cached forever under its URL.
VLEKs are never on the KDS (cloud providers load them into the firmware), so a VLEK-signed
report must carry its certificate. The product's CRL (signed by the ARK) lists revoked ASKs
and ASVKs; it is fetched alongside and refreshed twice a day.
"""

from __future__ import annotations

from collections.abc import Mapping

from services.mesh.errors import ParseError
from services.verifier.collateral import CollateralRequest
from services.verifier.families.snp.evidence import load_evidence
from services.verifier.families.snp.parse import Product, SigningKey

DEFAULT_KDS = "https://kdsintf.amd.com"
MAX_CERT_BYTES = 16 * 1024
MAX_CRL_BYTES = 64 * 1024
CRL_REFRESH_SECONDS = 12 * 3600.0


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
    """What to fetch so ``evidence`` can be verified: the VCEK unless it is at hand, and the
    product's CRL (refreshed every :data:`CRL_REFRESH_SECONDS`) unless one was supplied.

    Nothing is requested for evidence whose product is unknown (unparsable, or a version 2
    report, which does not name its product); no VCEK for VLEK-signed or chip-masked reports.
    """
    try:
        parsed = load_evidence(evidence)
    except ParseError:
        return []
    report = parsed.report
    product = report.product_hint
    if product is None:
        return []
    wanted = []
    table = parsed.cert_table
    has_vcek = (table is not None and table.vcek is not None) or "vcek.der" in have
    if report.signing_key is SigningKey.VCEK and not report.chip_id_masked and not has_vcek:
        url = vcek_url(base, product, report.chip_id, report.reported_tcb.as_dict())
        wanted.append(CollateralRequest("vcek.der", url, MAX_CERT_BYTES))
    if "crl.der" not in have:
        wanted.append(
            CollateralRequest(
                "crl.der", crl_url(base, product), MAX_CRL_BYTES, max_age=CRL_REFRESH_SECONDS
            )
        )
    return wanted
