"""The PCK certificate: Intel's per-platform key that signs the quoting enclave's report.

Its SGX extension (OID 1.2.840.113741.1.13.1) states the platform TCB the certificate was
issued for (16 CPU SVN components and the PCESVN), the PCE ID, the FMSPC that selects the TCB
info, and the SGX type. TCB matching compares those against Intel's TCB levels, so they must be
read from the verified leaf only, never from collateral.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from services.mesh.errors import ParseError
from services.verifier.families.dcap import der
from services.verifier.families.dcap.certs import (
    CertInfo,
    ChainCheck,
    Lru,
    check_links,
    common_name,
    load_pem_chain,
    public_key_der,
)
from services.verifier.trust import Anchor

SGX_EXTENSIONS_OID = "1.2.840.113741.1.13.1"
_PPID = f"{SGX_EXTENSIONS_OID}.1"
_TCB = f"{SGX_EXTENSIONS_OID}.2"
_PCESVN = f"{_TCB}.17"
_CPUSVN = f"{_TCB}.18"
_PCEID = f"{SGX_EXTENSIONS_OID}.3"
_FMSPC = f"{SGX_EXTENSIONS_OID}.4"
_SGX_TYPE = f"{SGX_EXTENSIONS_OID}.5"
_PLATFORM_INSTANCE_ID = f"{SGX_EXTENSIONS_OID}.6"
_CONFIGURATION = f"{SGX_EXTENSIONS_OID}.7"
_CONFIG_FLAGS = {
    f"{_CONFIGURATION}.1": "dynamic_platform",
    f"{_CONFIGURATION}.2": "cached_keys",
    f"{_CONFIGURATION}.3": "smt_enabled",
}

PCK_LEAF_CN = "SGX PCK Certificate"
PCK_CA_CNS = {
    "Intel SGX PCK Platform CA": "platform",
    "Intel SGX PCK Processor CA": "processor",
}
SGX_TYPES = {0: "Standard", 1: "Scalable", 2: "ScalableWithIntegrity"}


@dataclass(frozen=True)
class SgxExtensions:
    """The platform facts Intel certified in the PCK certificate."""

    ppid: bytes
    cpu_svn: bytes
    tcb_components: tuple[int, ...]
    pce_svn: int
    pce_id: bytes
    fmspc: bytes
    sgx_type: int
    platform_instance_id: bytes | None = None
    configuration: tuple[tuple[str, bool], ...] = ()


def parse_sgx_extensions(cert: x509.Certificate) -> SgxExtensions:
    """Decode the SGX extension of a PCK certificate; ParseError when absent or malformed."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSIONS_OID))
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError) as exc:
        raise ParseError("dcap.pck_extensions_malformed", "PCK has no SGX extension") from exc
    value = ext.value
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    top = der.oid_pairs(der.read_one(raw, der.TAG_SEQUENCE).value)
    for required in (_PPID, _TCB, _PCEID, _FMSPC, _SGX_TYPE):
        if required not in top:
            raise ParseError("dcap.pck_extensions_malformed", f"SGX extension lacks {required}")
    tcb_item = top[_TCB]
    if tcb_item.tag != der.TAG_SEQUENCE:
        raise ParseError("dcap.pck_extensions_malformed", "TCB is not a SEQUENCE")
    tcb = der.oid_pairs(tcb_item.value)
    components = []
    for index in range(1, 17):
        key = f"{_TCB}.{index}"
        if key not in tcb:
            raise ParseError("dcap.pck_extensions_malformed", f"TCB lacks component {index}")
        components.append(der.unsigned(tcb[key]))
    if _PCESVN not in tcb or _CPUSVN not in tcb:
        raise ParseError("dcap.pck_extensions_malformed", "TCB lacks PCESVN or CPUSVN")
    configuration: list[tuple[str, bool]] = []
    if _CONFIGURATION in top and top[_CONFIGURATION].tag == der.TAG_SEQUENCE:
        for key, item in der.oid_pairs(top[_CONFIGURATION].value).items():
            if key in _CONFIG_FLAGS:
                configuration.append((_CONFIG_FLAGS[key], der.boolean(item)))
    instance = top.get(_PLATFORM_INSTANCE_ID)
    return SgxExtensions(
        ppid=der.octets(top[_PPID], 16),
        cpu_svn=der.octets(tcb[_CPUSVN], 16),
        tcb_components=tuple(components),
        pce_svn=der.unsigned(tcb[_PCESVN]),
        pce_id=der.octets(top[_PCEID], 2),
        fmspc=der.octets(top[_FMSPC], 6),
        sgx_type=der.unsigned(top[_SGX_TYPE]),
        platform_instance_id=der.octets(instance, 16) if instance is not None else None,
        configuration=tuple(configuration),
    )


@dataclass(frozen=True)
class PckChain:
    """A quote's PCK chain after the clock-independent checks (see :func:`load_pck_chain`)."""

    certs: tuple[x509.Certificate, ...]
    infos: tuple[CertInfo, ...]
    links: ChainCheck
    problem: str | None
    """A structural problem (wrong names, key type, extensions), or None."""
    extensions: SgxExtensions | None
    leaf_key_der: bytes | None
    ca_kind: str | None

    @property
    def leaf(self) -> x509.Certificate:
        return self.certs[0]

    @property
    def intermediate(self) -> x509.Certificate:
        return self.certs[1]


_CHAINS: Lru[tuple[bytes, str], PckChain] = Lru()


def load_pck_chain(pem: bytes, anchor: Anchor) -> PckChain:
    """Parse and link-check the PCK chain carried in a quote.

    Raises ParseError when the PEM is unreadable; everything else is reported in the result so
    the caller can list every problem. Cached: a platform sends the same chain in every quote.
    """
    return _CHAINS.get((pem, anchor.fingerprint), lambda: _load_pck_chain(pem, anchor.cert))


def _load_pck_chain(pem: bytes, anchor: x509.Certificate) -> PckChain:
    certs = load_pem_chain(pem, "PCK certificate chain")
    infos = tuple(CertInfo.of(c) for c in certs)
    if len(certs) != 3:
        count = f"{len(certs)} certificates, 3 expected (PCK, PCK CA, root)"
        return PckChain(certs, infos, ChainCheck(count), count, None, None, None)
    links = check_links(certs, anchor)
    leaf, ca = certs[0], certs[1]
    ca_kind = PCK_CA_CNS.get(common_name(ca.subject))
    problem: str | None = None
    if PCK_LEAF_CN not in common_name(leaf.subject):
        problem = f"leaf CN '{common_name(leaf.subject)}' lacks '{PCK_LEAF_CN}'"
    elif ca_kind is None:
        problem = f"'{common_name(ca.subject)}' is neither PCK Platform CA nor Processor CA"
    key = leaf.public_key()
    leaf_key_der: bytes | None = None
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        leaf_key_der = public_key_der(leaf)
    else:
        problem = problem or "PCK key is not ECDSA P-256"
    extensions: SgxExtensions | None = None
    try:
        extensions = parse_sgx_extensions(leaf)
    except ParseError as exc:
        problem = problem or exc.detail
    return PckChain(certs, infos, links, problem, extensions, leaf_key_der, ca_kind)
