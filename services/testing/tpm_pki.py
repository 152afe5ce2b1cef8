"""A test TPM: an AK CA chain, real-format quotes, event logs and the agent's evidence JSON.

:class:`TpmTestPki` is a root -> intermediate -> AK-certificate chain shaped like GCE's (the AK
certificate has an empty subject and a critical TCG subjectAltName), with one override knob per
certificate. :class:`TestTpm` holds an AK (RSA-2048 or ECC P-256) and PCR values, and signs
TPMS_ATTEST quotes laid out by the verifier's own encoder, with override knobs for everything a
negative test needs (wrong signer, wrong digest, other bank, tampered bytes...).
:class:`EventLogBuilder` writes crypto-agile PC Client event logs and the PCR values they replay
to. Test anchors are trusted only through :meth:`TpmTestPki.trust_store` or
:meth:`TpmTestPki.write_trust_dir` plus the trust store's explicit test-anchor loader.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from services.testing.amd_pki import rsa_key
from services.verifier.families.tpm.evidence import encode_evidence
from services.verifier.families.tpm.structures import (
    Attest,
    ClockInfo,
    HashAlg,
    PcrSelection,
    SigAlg,
    Signature,
    encode_attest,
    encode_signature,
)
from services.verifier.trust import Anchor, TrustStore, fingerprint

DAY = timedelta(days=1)
TCG_SAN = x509.SubjectAlternativeName(
    [
        x509.DirectoryName(
            x509.Name(
                [
                    x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.1"), "id:41544D53"),
                    x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.2"), "vTPM"),
                    x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.3"), "id:20240101"),
                ]
            )
        )
    ]
)


@functools.cache
def p256_key(label: str) -> ec.EllipticCurvePrivateKey:
    """A process-wide P-256 key per ``label``."""
    return ec.generate_private_key(ec.SECP256R1())


def spki(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class CertOverride:
    """One way to make a certificate wrong; the default makes it right."""

    wrong_issuer: bool = False
    """Signed by an unrelated key under the right issuer name."""
    wrong_key: bool = False
    """Certifies another key than the AK (or the next CA)."""
    expired: bool = False
    not_yet_valid: bool = False
    ca: bool | None = None
    """Override basicConstraints.cA (``True`` on an AK certificate is refused)."""
    digital_signature: bool = True
    """keyUsage.digitalSignature on an AK certificate."""


OK = CertOverride()


class TpmTestPki:
    """A test AK CA: root -> intermediate -> AK certificates; ``now`` is when all are valid."""

    def __init__(
        self,
        *,
        now: datetime | None = None,
        root: CertOverride = OK,
        intermediate: CertOverride = OK,
    ) -> None:
        self.now = (now or datetime.now(UTC)).replace(microsecond=0)
        self.root_key = rsa_key("tpm:root")
        self.ca_key = rsa_key("tpm:intermediate")
        root_name = _name("attestmesh test TPM Root CA")
        self.root = self._cert(root_name, root_name, self.root_key.public_key(), self.root_key,
                               root, ca=True, serial=1)  # fmt: skip
        self.intermediate = self._cert(_name("attestmesh test TPM AK CA"), root_name,
                                       self.ca_key.public_key(), self.root_key, intermediate,
                                       ca=True, serial=2)  # fmt: skip

    def issue_ak_cert(
        self, ak: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, override: CertOverride = OK
    ) -> bytes:
        """An AK certificate (DER) for ``ak``, issued by the intermediate."""
        serial = int.from_bytes(hashlib.sha256(spki(ak)).digest()[:8])
        cert = self._cert(x509.Name([]), self.intermediate.subject, ak, self.ca_key, override,
                          ca=False, serial=serial)  # fmt: skip
        return cert.public_bytes(serialization.Encoding.DER)

    def anchors(self) -> list[Anchor]:
        certs = (("tpm:test_root", self.root), ("tpm:test_intermediate", self.intermediate))
        return [Anchor(name, cert, "test", fingerprint(cert)) for name, cert in certs]

    def trust_store(self) -> TrustStore:
        """A trust store holding this PKI's root and intermediate as test anchors."""
        return TrustStore(self.anchors())

    def write_trust_dir(self, root: Path) -> Path:
        """Write ``root/tpm/test_{root,intermediate}.pem`` for the test-anchor loader."""
        folder = root / "tpm"
        folder.mkdir(parents=True, exist_ok=True)
        for name, cert in (("test_root", self.root), ("test_intermediate", self.intermediate)):
            (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return root

    def _cert(
        self,
        subject: x509.Name,
        issuer: x509.Name,
        public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
        signer: rsa.RSAPrivateKey,
        override: CertOverride,
        *,
        ca: bool,
        serial: int,
    ) -> x509.Certificate:
        start, end = self.now - 30 * DAY, self.now + 3650 * DAY
        if override.expired:
            start, end = self.now - 400 * DAY, self.now - DAY
        if override.not_yet_valid:
            start, end = self.now + DAY, self.now + 400 * DAY
        if override.wrong_key:
            public = rsa_key("tpm:rogue-subject").public_key()
        if override.wrong_issuer:
            signer = rsa_key("tpm:rogue-issuer")
        is_ca = ca if override.ca is None else override.ca
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public)
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .add_extension(_usage(ca=ca, signing=override.digital_signature), critical=True)
        )
        if not ca:
            builder = builder.add_extension(TCG_SAN, critical=True)
        return builder.sign(signer, hashes.SHA256())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "attestmesh test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # fmt: skip


def _usage(*, ca: bool, signing: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signing and not ca, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


class EventLogBuilder:
    """A crypto-agile event log (SHA-1 and SHA-256 banks) and the PCR values it replays to."""

    def __init__(self, *, locality: int = 0) -> None:
        self.events: list[tuple[int, int, bytes, dict[int, bytes] | None]] = []
        if locality:
            self.events.append((0, 0x3, b"StartupLocality\x00" + bytes([locality]), None))
        self.locality = locality

    def measure(self, pcr: int, event_type: int, data: bytes) -> EventLogBuilder:
        """Add an event whose digests are the hashes of ``data``."""
        digests: dict[int, bytes] = {HashAlg.SHA1: hashlib.sha1(data).digest(),  # noqa: S324 - TCG's SHA-1 bank
                   HashAlg.SHA256: hashlib.sha256(data).digest()}  # fmt: skip
        self.events.append((pcr, event_type, data, digests))
        return self

    def encode(self) -> bytes:
        spec = (b"Spec ID Event03\x00" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 2)
                + struct.pack("<HHHH", HashAlg.SHA1, 20, HashAlg.SHA256, 32) + b"\x00")  # fmt: skip
        out = struct.pack("<II", 0, 0x3) + bytes(20) + struct.pack("<I", len(spec)) + spec
        for pcr, kind, data, digests in self.events:
            values = digests or {HashAlg.SHA1: bytes(20), HashAlg.SHA256: bytes(32)}
            out += struct.pack("<III", pcr, kind, len(values))
            out += b"".join(struct.pack("<H", alg) + value for alg, value in values.items())
            out += struct.pack("<I", len(data)) + data
        return out

    def pcrs(self, bank: HashAlg = HashAlg.SHA256) -> list[bytes]:
        """All 24 PCRs of ``bank`` after replaying the measured events from their reset values."""
        size = bank.digest_size
        values = [b"\xff" * size if 17 <= i <= 22 else bytes(size) for i in range(24)]
        if self.locality:
            values[0] = bytes(size - 1) + bytes([self.locality])
        for pcr, _kind, _data, digests in self.events:
            if digests is not None:
                values[pcr] = hashlib.new(bank.label, values[pcr] + digests[bank]).digest()
        return values


CLOCK = ClockInfo(clock=123_456_789, reset_count=3, restart_count=1, safe=True)


@dataclass(frozen=True)
class QuoteKnobs:
    """Overrides for one quote; the defaults make a correct SHA-256 quote of PCRs 0-23."""

    bank: HashAlg = HashAlg.SHA256
    indices: tuple[int, ...] = tuple(range(24))
    sig_hash: HashAlg = HashAlg.SHA256
    pss: bool = False
    digest: bytes | None = None
    """A pcrDigest to sign instead of the correct one."""
    signer: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None
    """Sign with another key than the AK."""
    firmware_version: int = 0x2024010100010002
    clock: ClockInfo = CLOCK


DEFAULT_KNOBS = QuoteKnobs()


class TestTpm:
    """A software TPM stand-in: an AK and PCR values, producing signed quotes."""

    __test__ = False

    def __init__(
        self, *, ecc: bool = False, label: str = "default", pcrs: Sequence[bytes] | None = None
    ) -> None:
        self.ak: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
            p256_key(f"tpm:ak:{label}") if ecc else rsa_key(f"tpm:ak:{label}")
        )
        self.pcrs = list(pcrs) if pcrs is not None else [bytes([i]) * 32 for i in range(24)]

    @property
    def ak_public(self) -> bytes:
        return spki(self.ak.public_key())

    def quote(self, extra_data: bytes, knobs: QuoteKnobs = DEFAULT_KNOBS) -> tuple[bytes, bytes]:
        """(TPMS_ATTEST, TPMT_SIGNATURE) of a quote over ``self.pcrs`` binding ``extra_data``."""
        values = self.pcrs if knobs.bank is HashAlg.SHA256 else [
            hashlib.new(knobs.bank.label, v).digest() for v in self.pcrs]  # fmt: skip
        digest = knobs.digest
        if digest is None:
            chosen = b"".join(values[i] for i in sorted(knobs.indices))
            digest = hashlib.new(knobs.sig_hash.label, chosen).digest()
        name = struct.pack(">H", HashAlg.SHA256) + hashlib.sha256(self.ak_public).digest()
        attest = encode_attest(
            Attest(name, extra_data, knobs.clock, knobs.firmware_version,
                   (PcrSelection(knobs.bank, tuple(sorted(knobs.indices))),), digest)
        )  # fmt: skip
        return attest, self.sign(attest, knobs)

    def sign(self, attest: bytes, knobs: QuoteKnobs = DEFAULT_KNOBS) -> bytes:
        key = knobs.signer or self.ak
        algorithm = knobs.sig_hash.algorithm()
        if isinstance(key, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(key.sign(attest, ec.ECDSA(algorithm)))
            size = (key.curve.key_size + 7) // 8
            signature = Signature(SigAlg.ECDSA, knobs.sig_hash, ecdsa_r=r, ecdsa_s=s)
            return encode_signature(signature, ecc_size=size)
        scheme: padding.AsymmetricPadding = padding.PKCS1v15()
        if knobs.pss:
            scheme = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
        raw = key.sign(attest, scheme, algorithm)
        sig_alg = SigAlg.RSAPSS if knobs.pss else SigAlg.RSASSA
        return encode_signature(Signature(sig_alg, knobs.sig_hash, rsa=raw))

    def evidence(
        self,
        extra_data: bytes,
        knobs: QuoteKnobs = DEFAULT_KNOBS,
        *,
        ak_cert: bytes | None = None,
        event_log: bytes | None = None,
        pcrs: Sequence[bytes] | None = None,
    ) -> bytes:
        """The agent's evidence JSON; ``pcrs`` replaces the PCR values sent with the quote."""
        attest, signature = self.quote(extra_data, knobs)
        values = list(pcrs) if pcrs is not None else self.pcrs
        if pcrs is None and knobs.bank is not HashAlg.SHA256:
            values = [hashlib.new(knobs.bank.label, v).digest() for v in self.pcrs]
        return encode_evidence(
            self.ak_public, attest, signature, values, ak_cert=ak_cert, event_log=event_log
        )


def with_pcrs(tpm: TestTpm, log: EventLogBuilder) -> TestTpm:
    """``tpm`` with the SHA-256 PCR values that ``log`` replays to."""
    tpm.pcrs = log.pcrs()
    return tpm


__all__ = [
    "DEFAULT_KNOBS",
    "OK",
    "CertOverride",
    "EventLogBuilder",
    "QuoteKnobs",
    "TestTpm",
    "TpmTestPki",
    "spki",
    "with_pcrs",
]
