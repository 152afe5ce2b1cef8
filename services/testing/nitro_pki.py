"""A test PKI shaped like AWS's Nitro Attestation PKI, and real-format NSM documents signed by it.

The chain mirrors the production one: a self-signed root (``CN=<partition>.nitro-enclaves``, 30
years) -> regional CA (about 20 days, path length 2) -> zonal CA (about 5 days, path length 1)
-> instance CA (a day, path length 0) -> the enclave's document certificate (three hours, not a
CA, ``digitalSignature``), every certificate ECDSA P-384 signed with SHA-384. Each certificate
has a :class:`CertOverride` knob (expired, wrong issuer, not a CA...) so tests can break one
link at a time, and documents are real untagged COSE_Sign1 ES384 structures with the NSM's
payload map, so they travel the verifier's production path unchanged.

Keys come from the process-wide cache of :mod:`services.testing.amd_pki` (so a deployment's
``save_keys``/``load_keys`` shares them across processes). The root's validity is fixed, and the
verifier accepts a root copy with the same subject and key, so two processes of one deployment
that each rebuild the chain still agree. A test root is only ever trusted through the trust
store's explicit test-anchor paths, labelled ``test:aws:nitro_root_g1``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.testing.amd_pki import ec_key
from services.verifier.families import cose
from services.verifier.trust import Anchor, TrustStore, fingerprint

PARTITION = "attestmesh-test"
ROOT_VALIDITY = (datetime(2019, 10, 28, tzinfo=UTC), datetime(2049, 10, 28, tzinfo=UTC))
LIFETIMES = {
    "regional": timedelta(days=20),
    "zonal": timedelta(days=5),
    "instance": timedelta(days=1),
    "leaf": timedelta(hours=3),
}
PATH_LENGTHS = {"root": None, "regional": 2, "zonal": 1, "instance": 0}


@dataclass(frozen=True)
class CertOverride:
    """One way to make a certificate wrong; the default makes it right."""

    expired: bool = False
    """Validity ended a minute before the PKI's ``now``."""
    not_yet_valid: bool = False
    """Validity starts a minute after the PKI's ``now``."""
    wrong_issuer: bool = False
    """Signed by an unrelated key under the right issuer name."""
    wrong_key: bool = False
    """Certifies a key other than the one that signs the next link (or the document)."""
    issuer_name: str | None = None
    """Names this CN as issuer instead of the real parent's subject."""
    not_ca: bool = False
    """A CA certificate whose basicConstraints say it is not a CA (or a leaf that says it is)."""
    no_cert_sign: bool = False
    """Key usage without keyCertSign (CAs) or without digitalSignature (the leaf)."""
    path_length: int | None = -1
    """A basicConstraints path length other than AWS's for that level (-1: AWS's)."""
    sha256: bool = False
    """Signed with ECDSA-SHA256 instead of ECDSA-SHA384."""
    p256: bool = False
    """Certifies a P-256 key instead of a P-384 one."""


OK = CertOverride()


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Amazon"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "AWS"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _usage(*, ca: bool, broken: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not (broken and not ca),
        content_commitment=not ca,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca and not broken,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def default_pcrs(image: bytes = b"attestmesh simulated enclave image") -> dict[int, bytes]:
    """PCR0-15 as an NSM reports them for a production enclave built from ``image``."""
    pcrs = {index: bytes(48) for index in range(16)}
    for index, part in ((0, b"image"), (1, b"kernel"), (2, b"application")):
        pcrs[index] = hashlib.sha384(part + b":" + image).digest()
    pcrs[3] = hashlib.sha384(b"arn:aws:iam::123456789012:role/attestmesh-test").digest()
    pcrs[4] = hashlib.sha384(b"i-0123456789abcdef0").digest()
    return pcrs


def build_document(
    signer: ec.EllipticCurvePrivateKey,
    *,
    module_id: str,
    certificate: bytes,
    cabundle: Iterable[bytes],
    timestamp_ms: int,
    pcrs: Mapping[int, bytes],
    public_key: bytes | None = None,
    user_data: bytes | None = None,
    nonce: bytes | None = None,
    digest: str = "SHA384",
    tagged: bool = False,
    alg: int | None = None,
    protected: Mapping[int | str, Any] | None = None,
    unprotected: Mapping[int | str, Any] | None = None,
    fields: Mapping[str, Any] | None = None,
    drop: Iterable[str] = (),
    indefinite: bool = False,
    tamper: Callable[[bytes], bytes] | None = None,
) -> bytes:
    """A signed NSM attestation document, field order and null optionals as the NSM emits.

    ``fields`` replaces or adds raw payload values (schema tests), ``drop`` removes fields,
    ``alg``/``protected``/``unprotected``/``tagged`` shape the COSE envelope. ``indefinite``
    encodes the payload map with an indefinite length, as NSM firmware has since late 2025;
    ``tamper`` rewrites the encoded payload *after* it is signed (a forged document).
    """
    payload: dict[str, Any] = {
        "module_id": module_id,
        "digest": digest,
        "timestamp": timestamp_ms,
        "pcrs": dict(pcrs),
        "certificate": certificate,
        "cabundle": list(cabundle),
        "public_key": public_key,
        "user_data": user_data,
        "nonce": nonce,
    }
    payload.update(fields or {})
    for name in drop:
        payload.pop(name, None)
    encoded = indefinite_map(payload) if indefinite else cbor2.dumps(payload)
    document = cose.sign_sign1(
        encoded,
        signer,
        alg=alg if alg is not None else cose.Algorithm.ES384,
        protected=protected,
        unprotected=unprotected,
        tagged=tagged,
    )
    if tamper is None:
        return document
    forged = tamper(encoded)
    if len(forged) != len(encoded):
        raise ValueError("tamper must keep the payload length (it is rewritten in place)")
    return document.replace(encoded, forged, 1)


def indefinite_map(value: Mapping[str, Any]) -> bytes:
    """``value`` as a CBOR map of indefinite length (``0xbf`` entries ``0xff``), in its order."""
    entries = b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in value.items())
    return b"\xbf" + entries + b"\xff"


@dataclass
class TestEnclave:
    """One enclave: its document certificate, signing key and chain, producing documents."""

    __test__ = False

    pki: NitroTestPki
    module_id: str
    signing_key: ec.EllipticCurvePrivateKey
    certificate: bytes
    cabundle: list[bytes]
    pcrs: dict[int, bytes] = field(default_factory=default_pcrs)

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.certificate)

    def document(
        self,
        *,
        timestamp: datetime | None = None,
        pcrs: Mapping[int, bytes] | None = None,
        **options: Any,
    ) -> bytes:
        """A document signed now (or at ``timestamp``); ``options`` go to :func:`build_document`."""
        when = timestamp or self.pki.now
        values: dict[str, Any] = {
            "module_id": self.module_id,
            "certificate": self.certificate,
            "cabundle": self.cabundle,
            "timestamp_ms": int(when.timestamp() * 1000),
            "pcrs": self.pcrs if pcrs is None else pcrs,
        }
        values.update(options)
        return build_document(self.signing_key, **values)


class NitroTestPki:
    """A root, regional, zonal and instance CA valid at ``now``, issuing enclave certificates."""

    def __init__(
        self,
        *,
        now: datetime | None = None,
        region: str = "us-east-1",
        instance_id: str = "i-0123456789abcdef0",
        root: CertOverride = OK,
        regional: CertOverride = OK,
        zonal: CertOverride = OK,
        instance: CertOverride = OK,
    ) -> None:
        self.now = (now or datetime.now(UTC)).replace(microsecond=0)
        self.region, self.instance_id = region, instance_id
        suffix = f"{region}.{PARTITION}.nitro-enclaves"
        tag = hashlib.sha256(f"{region}:{self.now.date()}".encode()).hexdigest()
        plan = (
            ("root", f"{PARTITION}.nitro-enclaves", root),
            ("regional", f"{tag[:16]}.{suffix}", regional),
            ("zonal", f"{tag[16:32]}.zonal.{suffix}", zonal),
            ("instance", f"{instance_id}.{suffix}", instance),
        )
        self.keys = {role: ec_key(f"nitro:{role}") for role, _cn, _o in plan}
        self.certs: dict[str, x509.Certificate] = {}
        parent: tuple[str, str] | None = None
        for role, cn, override in plan:
            self.certs[role] = self._issue(role, cn, parent, override)
            parent = (role, cn)

    @property
    def root(self) -> x509.Certificate:
        return self.certs["root"]

    @property
    def cabundle(self) -> list[bytes]:
        """Root first, then regional, zonal and instance CAs, as the NSM orders them."""
        return [der(self.certs[role]) for role in ("root", "regional", "zonal", "instance")]

    def anchor(self) -> Anchor:
        return Anchor("aws:nitro_root_g1", self.root, "test", fingerprint(self.root))

    def trust_store(self) -> TrustStore:
        """A store trusting only this test root (origin ``test``)."""
        return TrustStore([self.anchor()])

    def write_trust_dir(self, root: Path) -> Path:
        """Write ``root/aws/nitro_root_g1.pem`` for the trust store's test-anchor loader."""
        path = root / "aws" / "nitro_root_g1.pem"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.root.public_bytes(serialization.Encoding.PEM))
        return root

    def enclave(
        self, *, enclave_id: str = "enc0123456789abcdef", leaf: CertOverride = OK
    ) -> TestEnclave:
        """An enclave on this instance with a fresh three-hour document certificate."""
        module_id = f"{self.instance_id}-{enclave_id}"
        key = ec_key(f"nitro:enclave:{module_id}")
        cert = self._issue("leaf", f"{module_id}.{self.region}.aws", ("instance", ""), leaf, key)
        return TestEnclave(self, module_id, key, der(cert), self.cabundle)

    def _validity(self, role: str, override: CertOverride) -> tuple[datetime, datetime]:
        if role == "root":
            start, end = ROOT_VALIDITY
        else:
            lifetime = LIFETIMES[role]
            start = self.now - (timedelta(minutes=1) if role == "leaf" else lifetime / 4)
            end = start + lifetime
        if override.expired:
            end = self.now - timedelta(minutes=1)
            start = min(start, end - timedelta(hours=1))
        if override.not_yet_valid:
            start = self.now + timedelta(minutes=1)
            end = max(end, start + timedelta(hours=1))
        return start, end

    def _issue(
        self,
        role: str,
        cn: str,
        parent: tuple[str, str] | None,
        override: CertOverride,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> x509.Certificate:
        key = key or self.keys[role]
        public = key.public_key()
        if override.wrong_key:
            public = ec_key("nitro:rogue-subject").public_key()
        if override.p256:
            public = ec.generate_private_key(ec.SECP256R1()).public_key()
        parent_role = parent[0] if parent else role
        signer = self.keys[parent_role] if parent else key
        issuer_cn = self.certs[parent_role].subject if parent else _name(cn)
        if override.issuer_name is not None:
            issuer_cn = _name(override.issuer_name)
        if override.wrong_issuer:
            signer = ec_key("nitro:rogue-issuer")
        ca = role != "leaf"
        is_ca = ca != override.not_ca
        start, end = self._validity(role, override)
        path_length = PATH_LENGTHS.get(role) if override.path_length == -1 else override.path_length
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(issuer_cn)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(
                x509.BasicConstraints(ca=is_ca, path_length=path_length if is_ca else None),
                critical=True,
            )
            .add_extension(_usage(ca=ca, broken=override.no_cert_sign), critical=ca)
        )
        algorithm = hashes.SHA256() if override.sha256 else hashes.SHA384()
        return builder.sign(signer, algorithm)
