"""Azure confidential VMs: an HCL report (SNP or TD report + runtime data) and a vTPM quote.

hcl.py        HCL report parser and encoder (exact offsets, bounded)
runtime.py    the runtime-data JSON and the vTPM AK (HCLAkPub) in it
evidence.py   the attestation agent's evidence JSON, v0/v1/v2, both families
common.py     runtime-data binding, vTPM quote (via the tpm family), trust vector
snp.py        AzSnpVtpmVerifier ("az-snp-vtpm"): the snp family's checks on the embedded report
tdx.py        AzTdxVtpmVerifier ("az-tdx-vtpm"): the tdx family's checks on the TD quote
"""

from services.verifier.families.azure.hcl import (
    HashType,
    HclReport,
    ReportType,
    encode_hcl_report,
    parse_hcl_report,
)
from services.verifier.families.azure.snp import AzSnpVtpmVerifier
from services.verifier.families.azure.tdx import AzTdxVtpmVerifier

__all__ = [
    "AzSnpVtpmVerifier",
    "AzTdxVtpmVerifier",
    "HashType",
    "HclReport",
    "ReportType",
    "encode_hcl_report",
    "parse_hcl_report",
]
