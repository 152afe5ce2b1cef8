"""Where Intel publishes a quote's collateral (PCS API v4, or a PCCS with the same paths).

The quote's own PCK certificate says which platform it is (FMSPC) and which PCK CA issued it;
from those follow the TCB info, QE identity and PCK CRL URLs. The issuer chains come back as
URL-encoded PEM in response headers. Intel reissues these documents regularly, so cached copies
are refreshed after :data:`REFRESH_SECONDS`, well inside the usual month before nextUpdate.
"""

from __future__ import annotations

from collections.abc import Mapping

from cryptography import x509

from services.mesh.errors import ParseError
from services.verifier.collateral import CollateralRequest
from services.verifier.families import jsondoc
from services.verifier.families.dcap import collateral as files
from services.verifier.families.dcap.certs import DECODE_ERRORS, common_name
from services.verifier.families.dcap.coco import parse_tdx_document
from services.verifier.families.dcap.pck import PCK_CA_CNS, parse_sgx_extensions
from services.verifier.families.dcap.pcs import parse_tcb_info_body
from services.verifier.families.dcap.quote import parse_quote

DEFAULT_PCS = "https://api.trustedservices.intel.com"
DEFAULT_ROOT_CRL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
REFRESH_SECONDS = 12 * 3600.0
TEE_TDX = 0x81
MAX_DOCUMENT = 256 * 1024


def tcb_info_url(base: str, tee: str, fmspc: bytes) -> str:
    return f"{base.rstrip('/')}/{tee}/certification/v4/tcb?fmspc={fmspc.hex()}"


def qe_identity_url(base: str, tee: str) -> str:
    return f"{base.rstrip('/')}/{tee}/certification/v4/qe/identity"


def pck_crl_url(base: str, ca: str) -> str:
    return f"{base.rstrip('/')}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der"


def requests_for_platform(
    tee: str, fmspc: bytes, ca: str, *, base: str, root_crl_url: str
) -> list[CollateralRequest]:
    """Every collateral file of one platform, keyed as the cache and the importer key them."""
    tcb = tcb_info_url(base, tee, fmspc)
    qe = qe_identity_url(base, tee)
    crl = pck_crl_url(base, ca)
    age = REFRESH_SECONDS
    return [
        CollateralRequest(files.TCB_INFO, tcb, MAX_DOCUMENT, max_age=age),
        CollateralRequest(
            files.TCB_INFO_CHAIN, tcb, MAX_DOCUMENT, header="TCB-Info-Issuer-Chain", max_age=age
        ),
        CollateralRequest(files.QE_IDENTITY, qe, MAX_DOCUMENT, max_age=age),
        CollateralRequest(
            files.QE_IDENTITY_CHAIN,
            qe,
            MAX_DOCUMENT,
            header="SGX-Enclave-Identity-Issuer-Chain",
            max_age=age,
        ),
        CollateralRequest(files.PCK_CRL, crl, MAX_DOCUMENT, max_age=age),
        CollateralRequest(
            files.PCK_CRL_CHAIN, crl, MAX_DOCUMENT, header="SGX-PCK-CRL-Issuer-Chain", max_age=age
        ),
        CollateralRequest(files.ROOT_CRL, root_crl_url, MAX_DOCUMENT, max_age=age),
    ]


def requests_for(
    evidence: bytes,
    have: Mapping[str, bytes],
    *,
    base: str = DEFAULT_PCS,
    root_crl_url: str = DEFAULT_ROOT_CRL,
) -> list[CollateralRequest]:
    """The collateral files ``evidence`` (a raw quote or a CoCo TDX document) needs that
    ``have`` lacks; none for unreadable quotes."""
    if all(name in have for name in files.FILES):
        return []
    try:
        if jsondoc.is_json_document(evidence):
            evidence = parse_tdx_document(evidence).quote
        quote = parse_quote(evidence)
        certs = x509.load_pem_x509_certificates(quote.certification.pck_chain_pem)
        if len(certs) < 2:
            return []
        fmspc = parse_sgx_extensions(certs[0]).fmspc
        ca = PCK_CA_CNS.get(common_name(certs[1].subject))
    except ParseError:
        return []
    except DECODE_ERRORS:
        return []
    if ca is None:
        return []
    tee = "tdx" if quote.header.tee_type == TEE_TDX else "sgx"
    plan = requests_for_platform(tee, fmspc, ca, base=base, root_crl_url=root_crl_url)
    return [r for r in plan if r.name not in have]


def import_plan(
    directory: Mapping[str, bytes], *, base: str = DEFAULT_PCS, root_crl_url: str = DEFAULT_ROOT_CRL
) -> list[tuple[CollateralRequest, bytes]]:
    """Pair each file of a PCS-layout directory with the cache key a verifier will look up.

    The platform (TEE, FMSPC) comes from the TCB info and the PCK CA from the PCK CRL's issuer,
    so importing one directory serves exactly the quotes whose collateral it is.
    """
    missing = [name for name in files.FILES if name not in directory]
    if missing:
        raise ParseError("dcap.collateral_missing", f"the directory lacks {', '.join(missing)}")
    info = parse_tcb_info_body(directory[files.TCB_INFO]).document
    try:
        crl = x509.load_der_x509_crl(directory[files.PCK_CRL])
        ca = PCK_CA_CNS.get(common_name(crl.issuer))
    except DECODE_ERRORS:
        raise ParseError("dcap.pck_crl_invalid", "pck_crl.der is not a DER CRL") from None
    if ca is None:
        raise ParseError("dcap.pck_crl_invalid", "pck_crl.der is not issued by a PCK CA")
    plan = requests_for_platform(
        info.id.lower(), info.fmspc, ca, base=base, root_crl_url=root_crl_url
    )
    return [(request, directory[request.name]) for request in plan]
