"""Simulated Azure confidential VMs: HCL reports around test-PKI SNP reports or TD reports.

:class:`AzureSnpCvm` builds what an Azure SEV-SNP CVM's attestation agent sends: runtime data
carrying the vTPM AK as a JWK, an SNP report (VMPL 0, signed by a test VCEK from
:mod:`services.testing.amd_pki`) whose REPORT_DATA starts with SHA-256 of that runtime data,
the HCL report around both, and a vTPM quote (raw RSASSA/SHA-256 signature, as Azure's AK makes
them) binding the caller's report data in extraData. :class:`AzureTdxCvm` does the same around
a TDREPORT and a test-PKI TD quote from :mod:`services.testing.intel_pki`. Each step has an
override knob (tampered runtime data, other AK, VMPL...) for negative tests; the evidence can be
written in any of the agent's JSON versions (0, 1, 2).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import replace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from services.collector.simulator.snp import SnpSimulator
from services.testing.amd_pki import AmdTestPki, rsa_key
from services.testing.intel_pki import IntelTestPki, Platform, TdFields, td_quote
from services.testing.tpm_pki import DEFAULT_KNOBS, QuoteKnobs, TestTpm
from services.verifier.families.azure.hcl import ReportType, encode_hcl_report
from services.verifier.families.snp import certs

VM_CONFIGURATION = {
    "console-enabled": False,
    "secure-boot": True,
    "tpm-enabled": True,
    "vmUniqueId": "00000000-0000-4000-8000-000000000001",
}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk(key: rsa.RSAPublicKey, kid: str = "HCLAkPub") -> dict[str, Any]:
    numbers = key.public_numbers()
    return {
        "kid": kid,
        "key_ops": ["sign"],
        "kty": "RSA",
        "e": _b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
        "n": _b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
    }


def runtime_data(ak: rsa.RSAPublicKey, *, user_data: bytes = bytes(64)) -> bytes:
    """Runtime-data JSON as the HCL writes it: AK and EK as JWKs, VM configuration, user data."""
    ek = rsa_key("azure:ek").public_key()
    doc = {
        "keys": [jwk(ak), {**jwk(ek, "HCLEkPub"), "key_ops": ["encrypt"]}],
        "vm-configuration": VM_CONFIGURATION,
        "user-data": user_data.hex(),
    }
    return json.dumps(doc, separators=(",", ":")).encode()


class _VtpmCvm:
    """What both CVM kinds share: the vTPM and the evidence JSON."""

    def __init__(self, label: str) -> None:
        self.tpm = TestTpm(label=f"azure:{label}")
        ak = self.tpm.ak
        assert isinstance(ak, rsa.RSAPrivateKey)
        self.ak = ak

    def runtime(self, user_data: bytes = bytes(64)) -> bytes:
        return runtime_data(self.ak.public_key(), user_data=user_data)

    def vtpm_quote(self, report_data: bytes, knobs: QuoteKnobs = DEFAULT_KNOBS) -> dict[str, Any]:
        """The quote as Azure's vTPM makes it: raw RSASSA-SHA256 signature, SHA-256 PCRs."""
        attest, _ = self.tpm.quote(report_data, knobs)
        signer = knobs.signer if isinstance(knobs.signer, rsa.RSAPrivateKey) else self.ak
        signature = signer.sign(attest, padding.PKCS1v15(), knobs.sig_hash.algorithm())
        return {"message": attest, "signature": signature, "pcrs": list(self.tpm.pcrs)}

    @staticmethod
    def _document(quote: dict[str, Any], hcl: bytes, key: str, value: bytes, version: int) -> bytes:
        if version == 0:
            legacy = {k: list(v) if isinstance(v, bytes) else [list(p) for p in v]
                      for k, v in quote.items()}  # fmt: skip
            if key == "vcek":
                pem = _pem(value)
                return json.dumps({"quote": legacy, "report": list(hcl), "vcek": pem}).encode()
            return json.dumps({"tpm_quote": legacy, "hcl_report": list(hcl),
                               key: list(value)}).encode()  # fmt: skip
        hexed = {"signature": quote["signature"].hex(), "message": quote["message"].hex(),
                 "pcrs": [p.hex() for p in quote["pcrs"]]}  # fmt: skip
        doc = {"version": version, "tpm_quote": hexed,
               "hcl_report": base64.urlsafe_b64encode(hcl).decode(),
               key: base64.urlsafe_b64encode(value).decode()}  # fmt: skip
        return json.dumps(doc).encode()


class AzureSnpCvm(_VtpmCvm):
    """A simulated Azure SEV-SNP CVM on a test-PKI Milan chip."""

    def __init__(self, pki: AmdTestPki | None = None, *, label: str = "snp") -> None:
        super().__init__(label)
        self.snp = SnpSimulator(pki or AmdTestPki())

    def hcl_report(self, runtime: bytes, *, bound: bytes | None = None, **snp_fields: Any) -> bytes:
        """An HCL report; REPORT_DATA binds ``bound`` (default: ``runtime``)."""
        digest = hashlib.sha256(runtime if bound is None else bound).digest()
        snp_fields.setdefault("vmpl", 0)
        report = self.snp.report(digest + bytes(32), **snp_fields)
        return encode_hcl_report(report, runtime, report_type=ReportType.SNP)

    def evidence(
        self,
        report_data: bytes,
        *,
        version: int = 1,
        knobs: QuoteKnobs = DEFAULT_KNOBS,
        hcl: bytes | None = None,
        **snp_fields: Any,
    ) -> bytes:
        user = report_data if version >= 2 else bytes(64)
        hcl = hcl if hcl is not None else self.hcl_report(self.runtime(user), **snp_fields)
        quote = self.vtpm_quote(report_data, knobs)
        return self._document(quote, hcl, "vcek", self.snp.vek_der(), version)


def td_report(fields: TdFields, report_data: bytes) -> bytes:
    """A 1024-byte TDREPORT carrying the TD fields a quote made from it signs."""
    out = bytearray(1024)
    out[0] = 0x81
    out[128:192] = report_data
    out[256:264] = b"\xff" * 8
    out[264:280] = fields.tee_tcb_svn
    out[280:328] = b"\x33" * 48  # MRSEAM as intel_pki's quotes carry it
    out[328:376] = fields.mr_signer_seam
    out[512:520] = fields.td_attributes
    out[520:528] = bytes.fromhex("e702060000000000")
    out[528:576] = fields.mr_td
    out[720:912] = b"".join(fields.rtmrs)
    return bytes(out)


class AzureTdxCvm(_VtpmCvm):
    """A simulated Azure TDX CVM on a test-PKI Intel platform."""

    def __init__(self, intel: IntelTestPki, platform: Platform, *, label: str = "tdx") -> None:
        super().__init__(label)
        self.intel, self.platform = intel, platform

    def evidence(
        self,
        report_data: bytes,
        *,
        version: int = 1,
        knobs: QuoteKnobs = DEFAULT_KNOBS,
        fields: TdFields | None = None,
        quote_fields: TdFields | None = None,
        runtime: bytes | None = None,
        quote_version: int = 4,
    ) -> bytes:
        """Evidence whose TD quote is made from the TDREPORT (``quote_fields`` to differ).

        ``quote_version`` 5 with ``tee_tcb_svn2`` set in the fields makes a TD 1.5 quote.
        """
        user = report_data if version >= 2 else bytes(64)
        runtime = runtime if runtime is not None else self.runtime(user)
        bound = hashlib.sha256(runtime).digest() + bytes(32)
        fields = replace(fields or TdFields(), report_data=bound)
        hcl = encode_hcl_report(
            td_report(fields, bound), runtime, report_type=ReportType.TDX, version=2
        )
        quote = td_quote(self.platform, quote_fields or fields, version=quote_version)
        return self._document(self.vtpm_quote(report_data, knobs), hcl, "td_quote", quote, version)


def _pem(der: bytes) -> str:
    certs.quiet_serial_zero_warning()
    cert = x509.load_der_x509_certificate(der)
    return cert.public_bytes(serialization.Encoding.PEM).decode()
