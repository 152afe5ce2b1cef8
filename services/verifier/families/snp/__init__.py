"""AMD SEV-SNP: parse (report + certificate table) -> verify (VEK chain, signature) -> appraise.

parse.py      ATTESTATION_REPORT v2/v3/v4/v5 <-> AttestationReport (decoder and encoder)
fields.py     TCB_VERSION (Milan/Genoa vs Turin), POLICY and PLATFORM_INFO bit fields
certtable.py  the extended-report certificate table (GUID-keyed VCEK/VLEK/ASK/ARK)
coco.py       Confidential Containers' JSON form, re-encoded to the exact report bytes
evidence.py   either form, told apart by content
certs.py      VCEK/VLEK extensions, the VEK -> ASK/ASVK -> ARK link checks, caches
crl.py        AMD's CRL (optional ``crl.der`` collateral): revoked ASK/ASVK
verify.py     signature, chain, VEK/report consistency, REPORT_DATA binding
policy.py     SnpPolicy: one knob per field, all violations reported
appraise.py   claims, EAR trust vector, SnpVerifier (never raises for bad input)
"""

from services.verifier.families.snp.appraise import SnpVerifier, claims
from services.verifier.families.snp.certtable import CertTable, encode_cert_table, parse_cert_table
from services.verifier.families.snp.parse import (
    AttestationReport,
    Product,
    SigningKey,
    SnpEvidence,
    TcbVersion,
    encode_report,
    encode_signature,
    parse_evidence,
    parse_report,
)
from services.verifier.families.snp.policy import SnpPolicy
from services.verifier.families.snp.verify import SnpVerification, verify

__all__ = [
    "AttestationReport",
    "CertTable",
    "Product",
    "SigningKey",
    "SnpEvidence",
    "SnpPolicy",
    "SnpVerification",
    "SnpVerifier",
    "TcbVersion",
    "claims",
    "encode_cert_table",
    "encode_report",
    "encode_signature",
    "parse_cert_table",
    "parse_evidence",
    "parse_report",
    "verify",
]
