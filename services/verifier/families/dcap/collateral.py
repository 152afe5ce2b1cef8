"""Collateral appraisal: TCB info, QE identity and both CRLs, checked against the pinned root.

Collateral arrives as files in Intel's PCS layout (:data:`FILES`). What does not depend on the
clock (parsing, chain links, signatures) is computed once per exact set of bytes and anchor and
kept in an LRU cache, so a verifier serving many quotes from one platform family pays for it
once. What does depend on the clock (certificate validity, issueDate/nextUpdate, CRL windows,
revocation of the signers) is checked on every call against the injected time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from services.mesh.errors import ParseError
from services.verifier.families.dcap.certs import (
    CertInfo,
    Crl,
    Lru,
    chain_window,
    check_links,
    common_name,
    load_crl,
    load_pem_chain,
    validity_problem,
    verify_raw_ecdsa,
)
from services.verifier.families.dcap.findings import Findings
from services.verifier.families.dcap.pcs import (
    QeIdentity,
    Signed,
    TcbInfo,
    parse_qe_identity_body,
    parse_tcb_info_body,
)
from services.verifier.trust import Anchor

TCB_INFO = "tcb_info.json"
TCB_INFO_CHAIN = "tcb_info_issuer_chain.pem"
QE_IDENTITY = "qe_identity.json"
QE_IDENTITY_CHAIN = "qe_identity_issuer_chain.pem"
PCK_CRL = "pck_crl.der"
PCK_CRL_CHAIN = "pck_crl_issuer_chain.pem"
ROOT_CRL = "root_ca_crl.der"
FILES = (TCB_INFO, TCB_INFO_CHAIN, QE_IDENTITY, QE_IDENTITY_CHAIN, PCK_CRL, PCK_CRL_CHAIN, ROOT_CRL)

TCB_SIGNING_CN = "Intel SGX TCB Signing"
_CACHE_SIZE = 64

D = TypeVar("D", TcbInfo, QeIdentity)


@dataclass(frozen=True)
class Loaded(Generic[D]):
    """A signed document after the clock-independent checks; ``code`` is None when they hold."""

    document: D | None
    chain: tuple[CertInfo, ...]
    code: str | None = None
    message: str = ""


@dataclass(frozen=True)
class LoadedCrl:
    """A CRL after the clock-independent checks; ``code`` is None when they hold."""

    crl: Crl | None
    chain: tuple[CertInfo, ...]
    code: str | None = None
    message: str = ""


def _load_signed(
    kind: str,
    parse: Callable[[bytes], Signed[D]],
    body: bytes,
    chain_pem: bytes,
    anchor: x509.Certificate,
) -> Loaded[D]:
    try:
        signed = parse(body)
        chain = load_pem_chain(chain_pem, f"{kind} issuer chain")
    except ParseError as exc:
        return Loaded(None, (), exc.reason, exc.detail)
    infos = tuple(CertInfo.of(c) for c in chain)
    links = check_links(chain, anchor)
    if links.problem is not None:
        return Loaded(
            None, infos, f"dcap.{kind}_chain_invalid", f"{kind} issuer chain: {links.problem}"
        )
    signer = chain[0]
    if common_name(signer.subject) != TCB_SIGNING_CN:
        return Loaded(
            None,
            infos,
            f"dcap.{kind}_chain_invalid",
            f"{kind} signed by '{common_name(signer.subject)}', not '{TCB_SIGNING_CN}'",
        )
    key = signer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not verify_raw_ecdsa(
        key, signed.signature, signed.signed
    ):
        return Loaded(
            None,
            infos,
            f"dcap.{kind}_signature_invalid",
            f"{kind} signature does not verify with the TCB signing key",
        )
    return Loaded(signed.document, infos)


_TCB_INFOS: Lru[tuple[bytes, bytes, str], Loaded[TcbInfo]] = Lru(_CACHE_SIZE)
_QE_IDENTITIES: Lru[tuple[bytes, bytes, str], Loaded[QeIdentity]] = Lru(_CACHE_SIZE)
_CRLS: Lru[tuple[bytes, bytes, str], LoadedCrl] = Lru(_CACHE_SIZE)


def load_tcb_info(body: bytes, chain_pem: bytes, anchor: Anchor) -> Loaded[TcbInfo]:
    """Parse a PCS TCB info response and check its signing chain and signature (cached)."""
    return _TCB_INFOS.get(
        (body, chain_pem, anchor.fingerprint),
        lambda: _load_signed("tcb_info", parse_tcb_info_body, body, chain_pem, anchor.cert),
    )


def load_qe_identity(body: bytes, chain_pem: bytes, anchor: Anchor) -> Loaded[QeIdentity]:
    """Parse a PCS QE identity response and check its signing chain and signature (cached)."""
    return _QE_IDENTITIES.get(
        (body, chain_pem, anchor.fingerprint),
        lambda: _load_signed("qe_identity", parse_qe_identity_body, body, chain_pem, anchor.cert),
    )


def load_root_crl(der: bytes, anchor: Anchor) -> LoadedCrl:
    """The Intel root CA's CRL, which must be signed by the pinned root itself (cached)."""
    return _CRLS.get((der, b"", anchor.fingerprint), lambda: _load_root_crl(der, anchor.cert))


def load_pck_crl(der: bytes, chain_pem: bytes, anchor: Anchor) -> LoadedCrl:
    """A PCK CA's CRL, signed by the first certificate of its issuer chain (cached)."""
    return _CRLS.get(
        (der, chain_pem, anchor.fingerprint), lambda: _load_pck_crl(der, chain_pem, anchor.cert)
    )


def _load_root_crl(der: bytes, anchor: x509.Certificate) -> LoadedCrl:
    try:
        crl = load_crl(der, anchor, "root CA CRL")
    except ParseError as exc:
        return LoadedCrl(None, (), "dcap.root_crl_invalid", exc.detail)
    if not crl.signature_ok:
        return LoadedCrl(None, (), "dcap.root_crl_invalid", "root CA CRL not signed by the root")
    return LoadedCrl(crl, (CertInfo.of(anchor),))


def _load_pck_crl(der: bytes, chain_pem: bytes, anchor: x509.Certificate) -> LoadedCrl:
    try:
        chain = load_pem_chain(chain_pem, "PCK CRL issuer chain")
    except ParseError as exc:
        return LoadedCrl(None, (), "dcap.pck_crl_invalid", exc.detail)
    infos = tuple(CertInfo.of(c) for c in chain)
    links = check_links(chain, anchor)
    if links.problem is not None:
        return LoadedCrl(
            None, infos, "dcap.pck_crl_invalid", f"PCK CRL issuer chain: {links.problem}"
        )
    try:
        crl = load_crl(der, chain[0], "PCK CRL")
    except ParseError as exc:
        return LoadedCrl(None, infos, "dcap.pck_crl_invalid", exc.detail)
    if not crl.signature_ok:
        return LoadedCrl(
            None, infos, "dcap.pck_crl_invalid", f"PCK CRL not signed by '{infos[0].cn}'"
        )
    return LoadedCrl(crl, infos)


@dataclass(frozen=True)
class CollateralView:
    """The collateral items that held at the injected time (None for each that did not)."""

    tcb_info: TcbInfo | None
    qe_identity: QeIdentity | None
    pck_crl: Crl | None
    root_crl: Crl | None


def _window(
    kind: str, issue: datetime, following: datetime, now: datetime, findings: Findings
) -> bool:
    findings.window(issue, following)
    if now < issue:
        findings.failed(
            kind, f"dcap.{kind}_not_yet_valid", f"{kind} issueDate {issue} is after {now}"
        )
        return False
    if now > following:
        findings.failed(kind, f"dcap.{kind}_expired", f"{kind} nextUpdate {following} has passed")
        return False
    return True


def _signer_current(
    kind: str,
    chain: tuple[CertInfo, ...],
    root_crl: Crl | None,
    now: datetime,
    findings: Findings,
) -> bool:
    """The signing chain's certificates are valid at ``now`` and not revoked by the root."""
    findings.window(*chain_window(chain))
    problem = validity_problem(chain, now)
    if problem is not None:
        findings.failed(kind, f"dcap.{kind}_chain_expired", f"{kind} issuer chain: {problem}")
        return False
    if root_crl is not None and any(root_crl.revokes(c) for c in chain[:-1]):
        findings.failed(kind, f"dcap.{kind}_signer_revoked", f"{kind} signer revoked by root CRL")
        return False
    return True


def _document(
    kind: str, loaded: Loaded[D], root_crl: Crl | None, now: datetime, findings: Findings
) -> D | None:
    if loaded.document is None or loaded.code is not None:
        findings.failed(kind, loaded.code or f"dcap.{kind}_malformed", loaded.message)
        return None
    if not _signer_current(kind, loaded.chain, root_crl, now, findings):
        return None
    doc = loaded.document
    if not _window(kind, doc.issue_date, doc.next_update, now, findings):
        return None
    findings.passed(
        kind,
        f"{doc.id} v{doc.version}, issued {doc.issue_date:%Y-%m-%d}, signed by '{TCB_SIGNING_CN}'",
    )
    return doc


def _crl(
    kind: str, loaded: LoadedCrl, root_crl: Crl | None, now: datetime, findings: Findings
) -> Crl | None:
    if loaded.crl is None or loaded.code is not None:
        findings.failed(kind, loaded.code or f"dcap.{kind}_invalid", loaded.message)
        return None
    if kind == "pck_crl" and not _signer_current(kind, loaded.chain, root_crl, now, findings):
        return None
    findings.window(loaded.crl.last_update, loaded.crl.next_update)
    problem = loaded.crl.window_problem(now)
    if problem is not None:
        findings.failed(kind, f"dcap.{kind}_expired", problem)
        return None
    findings.passed(kind, f"issued by '{loaded.crl.issuer_cn}', {len(loaded.crl.revoked)} revoked")
    return loaded.crl


def appraise_collateral(
    files: Mapping[str, bytes], anchor: Anchor, now: datetime, findings: Findings
) -> CollateralView:
    """Check every collateral item at ``now``; failures go to ``findings``, never raised."""
    missing = [name for name in FILES if name not in files]
    if missing:
        findings.failed(
            "collateral", "dcap.collateral_missing", f"missing collateral: {', '.join(missing)}"
        )
    root_crl: Crl | None = None
    if ROOT_CRL in files:
        root_crl = _crl(
            "root_crl", load_root_crl(bytes(files[ROOT_CRL]), anchor), None, now, findings
        )
    tcb_info = qe_identity = None
    if TCB_INFO in files and TCB_INFO_CHAIN in files:
        loaded_tcb = load_tcb_info(bytes(files[TCB_INFO]), bytes(files[TCB_INFO_CHAIN]), anchor)
        tcb_info = _document("tcb_info", loaded_tcb, root_crl, now, findings)
    if QE_IDENTITY in files and QE_IDENTITY_CHAIN in files:
        loaded_qe = load_qe_identity(
            bytes(files[QE_IDENTITY]), bytes(files[QE_IDENTITY_CHAIN]), anchor
        )
        qe_identity = _document("qe_identity", loaded_qe, root_crl, now, findings)
    pck_crl: Crl | None = None
    if PCK_CRL in files and PCK_CRL_CHAIN in files:
        loaded_crl = load_pck_crl(bytes(files[PCK_CRL]), bytes(files[PCK_CRL_CHAIN]), anchor)
        pck_crl = _crl("pck_crl", loaded_crl, root_crl, now, findings)
    return CollateralView(tcb_info, qe_identity, pck_crl, root_crl)
