"""A simulated SEV-SNP platform emitting real-format, really signed attestation reports.

Reports are laid out by the verifier's own encoder (one layout for both sides) and signed with a
test VCEK/VLEK from :mod:`services.testing.amd_pki`, so they verify exactly like hardware
evidence once the test PKI's anchors are loaded explicitly into the trust store. The VEK can be
shipped as collateral (``vcek.der``) or attached to the evidence as an extended-report
certificate table, as ``SNP_GET_EXT_REPORT`` / configfs-tsm's ``auxblob`` would.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from services.testing.amd_pki import OK, AmdTestPki, CertOverride, IssuedVek
from services.verifier.families.snp.certtable import (
    ARK_GUID,
    ASK_GUID,
    VCEK_GUID,
    VLEK_GUID,
    encode_cert_table,
)
from services.verifier.families.snp.parse import (
    AttestationReport,
    Product,
    SigningKey,
    TcbVersion,
    encode_report,
    encode_signature,
)

DEFAULT_POLICY = 0x30000
"""SMT allowed, the must-be-one bit 17, ABI 0.0: a typical production guest policy."""

CPUID = {
    Product.MILAN: (0x19, 0x01, 0x01),
    Product.GENOA: (0x19, 0x11, 0x01),
    Product.TURIN: (0x1A, 0x02, 0x00),
}
DEFAULT_TCB = {
    Product.MILAN: TcbVersion(bootloader=4, tee=0, snp=24, microcode=219),
    Product.GENOA: TcbVersion(bootloader=9, tee=0, snp=23, microcode=72),
    Product.TURIN: TcbVersion(bootloader=1, tee=1, snp=3, microcode=68, fmc=1),
}


def build_report(
    signer: ec.EllipticCurvePrivateKey,
    *,
    report_data: bytes,
    product: Product | str = Product.MILAN,
    version: int = 3,
    **fields: Any,
) -> bytes:
    """A 1184-byte ATTESTATION_REPORT with ``fields`` (spec names), signed by ``signer``.

    CPUID family/model/stepping follow ``product`` for VERSION 3 and later; any other field
    (``measurement``, ``policy``, ``reported_tcb``, ``chip_id``, ``signing_key``...) can be given.
    """
    product = Product(product)
    family, model, stepping = CPUID[product] if version >= 3 else (None, None, None)
    tcb = fields.pop("tcb", DEFAULT_TCB[product])
    values: dict[str, Any] = {
        "version": version,
        "policy": DEFAULT_POLICY,
        "platform_info": 0x1,
        "report_data": report_data,
        "cpuid_fam_id": family,
        "cpuid_mod_id": model,
        "cpuid_step": stepping,
        "current_tcb": tcb,
        "reported_tcb": tcb,
        "committed_tcb": tcb,
        "launch_tcb": tcb,
        "current_major": 1,
        "current_minor": 55,
        "current_build": 21,
        "committed_major": 1,
        "committed_minor": 55,
        "committed_build": 21,
        "report_id": hashlib.sha256(report_data).digest(),
    }
    if version >= 5:
        values.update(launch_mit_vector=0, current_mit_vector=0)
    values.update(fields)
    report = AttestationReport(**values)
    unsigned = encode_report(report)
    der = signer.sign(unsigned[:0x2A0], ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der)
    return encode_report(replace(report, signature=encode_signature(r, s)))


def cert_table(vek: IssuedVek, pki: AmdTestPki | None = None) -> bytes:
    """The extended-report certificate table for ``vek`` (plus ASK and ARK when ``pki`` given)."""
    guid = VCEK_GUID if vek.kind is SigningKey.VCEK else VLEK_GUID
    entries = [(guid, vek.der)]
    if pki is not None:
        intermediate = pki.ask if vek.kind is SigningKey.VCEK else pki.asvk
        entries += [(ASK_GUID, _der(intermediate)), (ARK_GUID, _der(pki.ark))]
    return encode_cert_table(entries)


class SnpSimulator:
    """One simulated chip: product, CHIP_ID, TCB and a VCEK (or a cloud VLEK) for them."""

    def __init__(
        self,
        pki: AmdTestPki | None = None,
        *,
        signing_key: SigningKey = SigningKey.VCEK,
        chip_id: bytes | None = None,
        tcb: TcbVersion | None = None,
        version: int = 3,
        vek_override: CertOverride = OK,
    ) -> None:
        self.pki = pki or AmdTestPki()
        product = self.pki.product
        self.version = version
        self.tcb = tcb or DEFAULT_TCB[product]
        seed = hashlib.sha512(f"attestmesh-simulated-{product}".encode()).digest()
        if chip_id is None:
            chip_id = seed[:8] + bytes(56) if product is Product.TURIN else seed
        self.chip_id = chip_id
        if signing_key is SigningKey.VCEK:
            self.vek = self.pki.issue_vcek(tcb=self.tcb, chip_id=chip_id, override=vek_override)
        else:
            self.vek = self.pki.issue_vlek(tcb=self.tcb, override=vek_override)

    def report(self, report_data: bytes, **fields: Any) -> bytes:
        """A signed report binding ``report_data``; ``fields`` override any other field."""
        version = fields.pop("version", self.version)
        values: dict[str, Any] = {
            "chip_id": self.chip_id if self.vek.kind is SigningKey.VCEK else bytes(64),
            "signing_key": self.vek.kind,
            "tcb": self.tcb,
        }
        values.update(fields)
        return build_report(
            self.vek.signing_key,
            report_data=report_data,
            product=self.pki.product,
            version=version,
            **values,
        )

    def evidence(self, report_data: bytes, *, attach_certs: bool = True, **fields: Any) -> bytes:
        """Report followed by its certificate table (the ``auxblob``), or the bare report."""
        report = self.report(report_data, **fields)
        return report + self.cert_table() if attach_certs else report

    def cert_table(self) -> bytes:
        return cert_table(self.vek, self.pki)

    def collateral(self) -> dict[str, bytes]:
        """The VEK as collateral, named as in the vectors' layout (``vcek.der``/``vlek.der``)."""
        return {self.vek.collateral_name: self.vek.der}

    def vek_der(self) -> bytes:
        return self.vek.der


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)
