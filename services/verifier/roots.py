"""``attestmesh roots fetch``: fill a trust directory from the vendors, checked against pins.

Downloaded roots are never trusted for what they say: each AMD ARK must match the fingerprint
pinned in :mod:`services.verifier.trust`, and the ASK/ASVK must be issued by it. The new files
are assembled in a temporary directory, loaded back through :meth:`TrustStore.load` (the same
checks every verifier runs at start), and only then moved into place, one file at a time with
an atomic rename, so a failed or tampered download leaves the existing directory untouched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.mesh.errors import TrustError
from services.verifier.families.snp.kds import DEFAULT_KDS, cert_chain_url
from services.verifier.families.snp.parse import Product, SigningKey
from services.verifier.fetch import http_get
from services.verifier.trust import TrustStore

MAX_CHAIN_BYTES = 32 * 1024


def _split_chain(pem: bytes, source: str) -> tuple[x509.Certificate, x509.Certificate]:
    """AMD's cert_chain answer: the intermediate and the self-signed ARK (in either order)."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise TrustError("roots.malformed", f"{source}: not PEM certificates") from None
    roots = [c for c in certs if c.subject == c.issuer]
    others = [c for c in certs if c.subject != c.issuer]
    if len(certs) != 2 or len(roots) != 1 or len(others) != 1:
        raise TrustError("roots.malformed", f"{source}: expected one intermediate and one ARK")
    return roots[0], others[0]


def amd_chain(product: Product, *, kds: str, fetcher: Callable[..., bytes]) -> bytes:
    """``amd/<product>.pem`` contents (ARK, ASK, ASVK) from the KDS, unverified."""
    ark, ask = _split_chain(
        fetcher(cert_chain_url(kds, product, SigningKey.VCEK), max_bytes=MAX_CHAIN_BYTES),
        f"{product} VCEK chain",
    )
    ark2, asvk = _split_chain(
        fetcher(cert_chain_url(kds, product, SigningKey.VLEK), max_bytes=MAX_CHAIN_BYTES),
        f"{product} VLEK chain",
    )
    if ark != ark2:
        raise TrustError("roots.inconsistent", f"{product}: the two chains name different ARKs")
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (ark, ask, asvk))


def fetch_amd_roots(
    roots_dir: Path,
    *,
    kds: str = DEFAULT_KDS,
    fetcher: Callable[..., bytes] = http_get,
    products: tuple[Product, ...] = tuple(Product),
) -> list[Path]:
    """Download, pin-check and install AMD's chains; return the files written."""
    chains = {product: amd_chain(product, kds=kds, fetcher=fetcher) for product in products}
    with tempfile.TemporaryDirectory(prefix="attestmesh-roots-") as tmp:
        staging = Path(tmp)
        (staging / "amd").mkdir()
        for product, pem in chains.items():
            (staging / "amd" / f"{product.value}.pem").write_bytes(pem)
        TrustStore.load(staging)  # the pins and issuance checks, before anything is replaced
        (roots_dir / "amd").mkdir(parents=True, exist_ok=True)
        written = []
        for product, pem in chains.items():
            target = roots_dir / "amd" / f"{product.value}.pem"
            partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            partial.write_bytes(pem)
            os.replace(partial, target)
            written.append(target)
    return written
