"""Trust anchors for every hardware vendor: pinned in code, loaded from a trust directory.

A verifier is only as good as its roots, so vendor roots are never taken on faith from disk: each
root read from the trust directory must match a SHA-256 fingerprint (of its DER) pinned in
:data:`PINNED_ROOTS`, otherwise loading fails closed with :class:`TrustError`. Missing files are
fine (that family simply has no anchors). The directory layout is::

    amd/{milan,genoa,turin}.pem   ARK, ASK, ASVK of that product, in that order
    intel/sgx_root_ca.pem         Intel SGX Root CA
    aws/nitro_root_g1.pem         AWS Nitro Enclaves Root G1
    tpm/*.pem                     TPM EK/AK roots (and the intermediates vendors ship with them)

AMD's intermediates (ASK signs VCEKs, ASVK signs VLEKs) are not pinned; they are accepted only if
directly issued by the pinned ARK, checked once here at load time.

A *test* PKI (simulated TEEs, chain-builder tests) has the same layout, but its anchors are
accepted only through the explicit ``test_dir=`` argument or :meth:`TrustStore.with_test_anchors`,
and every anchor remembers its origin so the claims can say ``amd:milan`` versus
``test:amd:milan``: a verdict never hides that it rests on a test root.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from services.mesh.errors import TrustError

Origin = Literal["vendor", "test"]
T = TypeVar("T")

AMD_PRODUCTS = ("milan", "genoa", "turin")

# SHA-256 of the DER encoding of every vendor root we accept, keyed by anchor name.
PINNED_ROOTS: Mapping[str, str] = {
    "amd:milan": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    "amd:genoa": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    "amd:turin": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
    "intel:sgx_root_ca": "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3",
    "aws:nitro_root_g1": "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b",
    "tpm:gce_tpm_ek_root_1": "9bd5285f8fb18502a7947e621ffd470266f49fcd3b73e19a190f690ad32a7caf",
    "tpm:gce_tpm_ek_intermediate_2": (
        "5d8dbcf8c8053dd8ffad711b6219355032b7122c34cac0f90ccb49def69ec504"
    ),
    "tpm:gce_tpm_ek_intermediate_3": (
        "7132b6ea71101f6c51bb58f98c3798c19b65be510eca0344318900510b593178"
    ),
    "tpm:gce_ek_ak_ca_root": "594759594b9b61524f6c8ef668f7177f7b9066bc0674f2f49fe9e052be78beb2",
    "tpm:gce_ek_ak_ca_intermediate_v3": (
        "c84de8116dfaf5a908f21e810487791f5437e206d00ad8025050cca6bd2ff627"
    ),
    "tpm:microsoft_tpm_root_ca_2014": (
        "870c7a35ceab3d59979f2c6a524042d404cb71518004350925fb2ced79a999da"
    ),
}

_SINGLE_ROOT_FILES = {
    "intel:sgx_root_ca": Path("intel") / "sgx_root_ca.pem",
    "aws:nitro_root_g1": Path("aws") / "nitro_root_g1.pem",
}


def fingerprint(cert: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the certificate's DER: the value pinned in :data:`PINNED_ROOTS`."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def default_roots_dir() -> Path:
    """``$ATTESTMESH_ROOTS``, else the user's data dir (``$XDG_DATA_HOME/attestmesh/roots``).

    A relative ``XDG_DATA_HOME`` is ignored, as the XDG base-directory spec requires.
    """
    explicit = os.environ.get("ATTESTMESH_ROOTS")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "attestmesh" / "roots"


@dataclass(frozen=True)
class Anchor:
    """One trusted certificate, with where it came from.

    ``name`` is the vendor-qualified anchor name (``amd:milan``, ``tpm:gce_ek_ak_ca_root``);
    ``label`` is what claims carry, prefixed ``test:`` for anchors of a test PKI.
    """

    name: str
    cert: x509.Certificate
    origin: Origin
    fingerprint: str

    @property
    def label(self) -> str:
        return self.name if self.origin == "vendor" else f"test:{self.name}"


@dataclass(frozen=True)
class AmdAnchors:
    """One AMD product's chain heads: the ARK and the intermediates it directly issued."""

    product: str
    ark: Anchor
    ask: x509.Certificate | None
    asvk: x509.Certificate | None

    @property
    def label(self) -> str:
        return self.ark.label

    @property
    def origin(self) -> Origin:
        return self.ark.origin


class TrustStore:
    """An immutable set of trust anchors for all vendors, vendor anchors before test anchors."""

    def __init__(self, anchors: Iterable[Anchor] = (), amd: Iterable[AmdAnchors] = ()) -> None:
        ordered = sorted(anchors, key=lambda a: a.origin != "vendor")
        self._anchors: tuple[Anchor, ...] = tuple(ordered)
        self._amd: tuple[AmdAnchors, ...] = tuple(sorted(amd, key=lambda a: a.origin != "vendor"))
        self._memo: dict[str, Any] = {}
        self._memo_lock = threading.Lock()

    @classmethod
    def load(
        cls, roots_dir: Path | str | None, *, test_dir: Path | str | None = None
    ) -> TrustStore:
        """Vendor anchors from ``roots_dir`` (pinned); test anchors only from ``test_dir``.

        Either directory may be ``None`` or missing. Raises :class:`TrustError` when a vendor
        root does not match its pin or any file is malformed.
        """
        anchors: list[Anchor] = []
        amd: list[AmdAnchors] = []
        if roots_dir is not None:
            _load_dir(Path(roots_dir), "vendor", anchors, amd)
        if test_dir is not None:
            _load_dir(Path(test_dir), "test", anchors, amd)
        return cls(anchors, amd)

    def with_test_anchors(self, test_dir: Path | str) -> TrustStore:
        """A new store with this store's anchors plus the test PKI anchors in ``test_dir``."""
        anchors = list(self._anchors)
        amd = list(self._amd)
        _load_dir(Path(test_dir), "test", anchors, amd)
        return TrustStore(anchors, amd)

    def amd(self, product: str | None = None) -> tuple[AmdAnchors, ...]:
        """AMD anchor sets, vendor first; all products unless ``product`` is given."""
        return tuple(a for a in self._amd if product is None or a.product == product)

    def anchors(self, vendor: str) -> tuple[Anchor, ...]:
        """Single-certificate anchors of ``vendor`` (``intel``, ``aws``, ``tpm``), vendor first."""
        prefix = f"{vendor}:"
        return tuple(a for a in self._anchors if a.name.startswith(prefix))

    def derived(self, key: str, build: Callable[[TrustStore], T]) -> T:
        """``build(self)``, computed once per store and key.

        Stores are immutable, so a family can index its anchors once (names, fingerprints,
        validity) instead of re-deriving them from the certificates on every verification.
        """
        with self._memo_lock:
            if key not in self._memo:
                self._memo[key] = build(self)
            value: T = self._memo[key]
            return value

    def labels(self) -> list[str]:
        """Every anchor's claim label, for diagnostics (``amd:milan``, ``test:amd:genoa``...)."""
        return [a.label for a in self._amd] + [a.label for a in self._anchors]

    def __bool__(self) -> bool:
        return bool(self._anchors or self._amd)

    def __repr__(self) -> str:
        return f"TrustStore({', '.join(self.labels()) or 'empty'})"


def _load_dir(root: Path, origin: Origin, anchors: list[Anchor], amd: list[AmdAnchors]) -> None:
    for product in AMD_PRODUCTS:
        path = root / "amd" / f"{product}.pem"
        if path.is_file():
            amd.append(_load_amd(path, product, origin))
    for name, rel in _SINGLE_ROOT_FILES.items():
        path = root / rel
        if path.is_file():
            certs = _read_pem(path)
            if len(certs) != 1:
                raise TrustError("trust.malformed", f"{rel} must hold exactly one certificate")
            anchors.append(_root_anchor(name, certs[0], origin, rel, self_signed=True))
    tpm_dir = root / "tpm"
    if tpm_dir.is_dir():
        for path in sorted(tpm_dir.glob("*.pem")):
            rel = path.relative_to(root)
            for cert in _read_pem(path):
                anchors.append(_tpm_anchor(cert, origin, rel))


def _load_amd(path: Path, product: str, origin: Origin) -> AmdAnchors:
    rel = Path("amd") / path.name
    certs = _read_pem(path)
    if not 1 <= len(certs) <= 3:
        raise TrustError("trust.malformed", f"{rel} must hold ARK, ASK, ASVK (got {len(certs)})")
    ark = _root_anchor(f"amd:{product}", certs[0], origin, rel, self_signed=True)
    _require_ca(ark.cert, f"{rel} ARK")
    issued: list[x509.Certificate | None] = [None, None]
    for index, (role, cert) in enumerate(zip(("ASK", "ASVK"), certs[1:], strict=False)):
        _require_issued_by(cert, ark.cert, f"{rel} {role}")
        _require_ca(cert, f"{rel} {role}")
        issued[index] = cert
    return AmdAnchors(product=product, ark=ark, ask=issued[0], asvk=issued[1])


def _root_anchor(
    name: str, cert: x509.Certificate, origin: Origin, rel: Path, *, self_signed: bool
) -> Anchor:
    digest = fingerprint(cert)
    if origin == "vendor" and digest != PINNED_ROOTS[name]:
        raise TrustError(
            "trust.pin_mismatch",
            f"{rel}: SHA-256 {digest} is not the pinned fingerprint of {name}",
        )
    if self_signed:
        _require_issued_by(cert, cert, f"{rel} root")
    return Anchor(name=name, cert=cert, origin=origin, fingerprint=digest)


def _tpm_anchor(cert: x509.Certificate, origin: Origin, rel: Path) -> Anchor:
    digest = fingerprint(cert)
    if origin == "test":
        return Anchor(name=f"tpm:{rel.stem}", cert=cert, origin=origin, fingerprint=digest)
    for name, pinned in PINNED_ROOTS.items():
        if name.startswith("tpm:") and pinned == digest:
            return Anchor(name=name, cert=cert, origin=origin, fingerprint=digest)
    raise TrustError("trust.pin_mismatch", f"{rel}: SHA-256 {digest} matches no pinned TPM root")


def _read_pem(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TrustError("trust.unreadable", f"{path.name}: {exc.strerror}") from exc
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TrustError("trust.malformed", f"{path.name}: not PEM certificates") from exc


def _require_issued_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise TrustError(
            "trust.chain_invalid", f"{what} is not directly issued by {_cn(issuer)}"
        ) from exc


def _require_ca(cert: x509.Certificate, what: str) -> None:
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except (x509.ExtensionNotFound, ValueError, x509.DuplicateExtension) as exc:
        raise TrustError("trust.not_ca", f"{what} lacks CA basic constraints/key usage") from exc
    if not (basic.ca and usage.key_cert_sign):
        raise TrustError("trust.not_ca", f"{what} is not a certificate-signing CA")


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    value = names[0].value if names else "?"
    return value if isinstance(value, str) else value.decode(errors="replace")
