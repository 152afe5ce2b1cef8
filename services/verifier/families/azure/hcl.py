"""Azure's HCL report: the paravisor's wrapper around the SNP or TD report of a confidential VM.

On an Azure CVM the guest cannot ask the hardware for a report itself; the HCL (host
compatibility layer, the paravisor at VMPL0 / in the TD's L1) does, binding SHA-256 of its
*runtime data* (a JSON document that carries the vTPM's attestation key) into the report's
REPORT_DATA, and publishes the result in a vTPM NV index. Layout (little-endian)::

    0x000  header   signature "HCLA", version (1, 2), report_size, request_type,
                    status, 3 reserved words (zero)                               32 bytes
    0x020  hw report area: SNP ATTESTATION_REPORT (1184 bytes), or TDREPORT
           (1024 bytes, zero-padded to 1184)
    0x4C0  IGVM request data: data_size, version, report_type (2 SNP, 4 TDX),
           report_data_hash_type (1 SHA-256, 2 SHA-384, 3 SHA-512), variable_data_size  20 bytes
    0x4D4  variable data: the runtime-data JSON, variable_data_size bytes
    ...    zero padding up to the NV index size (2600 bytes on Azure)

``report_size`` covers header, hardware area and request data; ``data_size`` covers the request
data header and the variable data. Every size relation is checked, reserved words, the TD
report's padding and the trailing padding must be zero, and a non-zero ``status`` (the HCL
failed to obtain a report) is refused: a :class:`ParseError` with an ``az.`` code.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

from services.mesh.errors import ParseError

HCL_SIGNATURE = b"HCLA"
HEADER_SIZE = 0x20
HW_REPORT_SIZE = 1184
TD_REPORT_SIZE = 1024
REQUEST_HEADER_SIZE = 20
REQUEST_OFFSET = HEADER_SIZE + HW_REPORT_SIZE
VARIABLE_DATA_OFFSET = REQUEST_OFFSET + REQUEST_HEADER_SIZE
MAX_HCL_SIZE = 16 * 1024
HEADER_VERSIONS = (1, 2)
REQUEST_TYPE_GUEST_REPORT = 2


class ReportType(enum.IntEnum):
    """IGVM report type of the hardware report in the HCL report."""

    SNP = 2
    TDX = 4


class HashType(enum.IntEnum):
    """IGVM report-data hash type: how the runtime data is bound into REPORT_DATA."""

    SHA256 = 1
    SHA384 = 2
    SHA512 = 3

    def digest(self, data: bytes) -> bytes:
        return hashlib.new(self.name.lower(), data).digest()


@dataclass(frozen=True)
class HclReport:
    """A parsed HCL report; ``raw`` is the input, ``hw_report`` the 1184-byte hardware area."""

    version: int
    request_type: int
    report_type: ReportType
    hash_type: HashType
    request_version: int
    hw_report: bytes
    variable_data: bytes
    raw: bytes = b""

    @property
    def snp_report(self) -> bytes:
        """The embedded SEV-SNP ATTESTATION_REPORT (1184 bytes)."""
        return self.hw_report

    @property
    def td_report(self) -> bytes:
        """The embedded TDREPORT (1024 bytes)."""
        return self.hw_report[:TD_REPORT_SIZE]

    def runtime_data_digest(self) -> bytes:
        """The digest the hardware report's REPORT_DATA must start with."""
        return self.hash_type.digest(self.variable_data)


def parse_hcl_report(data: bytes) -> HclReport:
    """Parse an HCL report exactly; raises :class:`ParseError` (``az.hcl_*``)."""
    data = bytes(data)
    if len(data) > MAX_HCL_SIZE:
        raise ParseError("az.hcl_malformed", f"HCL report is {len(data)} bytes")
    if len(data) < VARIABLE_DATA_OFFSET:
        raise ParseError("az.hcl_malformed", f"HCL report is {len(data)} bytes, too short")
    if data[:4] != HCL_SIGNATURE:
        raise ParseError("az.hcl_malformed", "HCL report does not start with 'HCLA'")
    version, report_size, request_type, status, *reserved = struct.unpack_from("<7I", data, 4)
    if version not in HEADER_VERSIONS:
        raise ParseError("az.hcl_unsupported_version", f"HCL report version {version}")
    if request_type != REQUEST_TYPE_GUEST_REPORT:
        raise ParseError("az.hcl_malformed", f"request type {request_type} is not a report")
    if status != 0:
        raise ParseError("az.hcl_status", f"the HCL reports failure status 0x{status:x}")
    if any(reserved):
        raise ParseError("az.hcl_malformed", "reserved header words are not zero")
    data_size, request_version, raw_type, raw_hash, var_size = struct.unpack_from(
        "<5I", data, REQUEST_OFFSET
    )
    try:
        report_type = ReportType(raw_type)
    except ValueError:
        detail = f"report type {raw_type} is not SNP or TDX"
        raise ParseError("az.hcl_report_type", detail) from None
    try:
        hash_type = HashType(raw_hash)
    except ValueError:
        raise ParseError("az.hcl_malformed", f"report-data hash type {raw_hash}") from None
    end = VARIABLE_DATA_OFFSET + var_size
    if data_size != REQUEST_HEADER_SIZE + var_size or report_size != REQUEST_OFFSET + data_size:
        raise ParseError("az.hcl_malformed", "HCL report sizes are inconsistent")
    if end > len(data):
        raise ParseError("az.hcl_malformed", f"variable data ends at {end}, past the report")
    if any(data[end:]):
        raise ParseError("az.hcl_malformed", "non-zero bytes after the HCL report")
    hw_report = data[HEADER_SIZE:REQUEST_OFFSET]
    if report_type is ReportType.TDX and any(hw_report[TD_REPORT_SIZE:]):
        raise ParseError("az.hcl_malformed", "non-zero bytes after the TD report")
    return HclReport(
        version=version,
        request_type=request_type,
        report_type=report_type,
        hash_type=hash_type,
        request_version=request_version,
        hw_report=hw_report,
        variable_data=data[VARIABLE_DATA_OFFSET:end],
        raw=data,
    )


def encode_hcl_report(
    hw_report: bytes,
    variable_data: bytes,
    *,
    report_type: ReportType = ReportType.SNP,
    hash_type: HashType = HashType.SHA256,
    version: int = 1,
    request_version: int = 1,
    total_size: int = 2600,
) -> bytes:
    """An HCL report around ``hw_report`` (padded to 1184 bytes) and ``variable_data``."""
    area = hw_report + bytes(HW_REPORT_SIZE - len(hw_report))
    data_size = REQUEST_HEADER_SIZE + len(variable_data)
    header = HCL_SIGNATURE + struct.pack(
        "<7I", version, REQUEST_OFFSET + data_size, REQUEST_TYPE_GUEST_REPORT, 0, 0, 0, 0
    )
    request = struct.pack(
        "<5I", data_size, request_version, report_type, hash_type, len(variable_data)
    )
    body = header + area + request + variable_data
    return body + bytes(max(0, total_size - len(body)))
