"""TPM 2.0 marshalling (TPM 2.0 Library, Part 2: Structures) for quotes, by hand and bounded.

Only what a quote verifier needs: TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE (with TPMS_CLOCK_INFO
and TPMS_QUOTE_INFO) and TPMT_SIGNATURE (RSASSA, RSAPSS, ECDSA). TPM structures are big-endian;
every TPM2B is checked against the largest size the spec allows for it, and a structure must be
consumed exactly, so trailing or truncated bytes are a :class:`ParseError` (``tpm.truncated``,
``tpm.trailing_bytes``, ``tpm.size_exceeded``...), never an IndexError deep inside verification.

Everything the parsers accept, the encoders write back bit for bit: the test PKI builds quotes
with :func:`encode_attest` and :func:`encode_signature`, so both sides share one layout.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

from services.mesh.errors import ParseError

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018

MAX_ATTEST_SIZE = 1024
MAX_SIGNATURE_SIZE = 1024
MAX_HA_SIZE = 66
"""sizeof(TPMT_HA) with SHA-512: TPM2B_DATA (extraData) and TPM2B_NAME hold at most this."""
MAX_DIGEST_SIZE = 64
MAX_RSA_SIGNATURE = 512
MAX_ECC_PARAMETER = 66
MAX_PCR_BANKS = 16
MAX_SELECT_BYTES = 4
"""Up to 32 PCRs; every PC-Client TPM has 24 (three select bytes)."""


class HashAlg(enum.IntEnum):
    """TPM_ALG_ID values of the hash algorithms a quote may use."""

    SHA1 = 0x0004
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def digest_size(self) -> int:
        return _HASHES[self].digest_size

    def algorithm(self) -> hashes.HashAlgorithm:
        """The ``cryptography`` algorithm (a stateless descriptor, safe to share)."""
        return _HASHES[self]


_HASHES: dict[HashAlg, hashes.HashAlgorithm] = {
    HashAlg.SHA1: hashes.SHA1(),  # noqa: S303 - the TPM's SHA-1 PCR bank is measured, not trusted
    HashAlg.SHA256: hashes.SHA256(),
    HashAlg.SHA384: hashes.SHA384(),
    HashAlg.SHA512: hashes.SHA512(),
}


class SigAlg(enum.IntEnum):
    """TPM_ALG_ID values of the signature schemes accepted for quotes."""

    RSASSA = 0x0014
    RSAPSS = 0x0016
    ECDSA = 0x0018


class Reader:
    """A bounded big-endian cursor: every read checks the bytes are there."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = bytes(data)
        self.pos = 0
        self.what = what

    def take(self, size: int, field: str) -> bytes:
        end = self.pos + size
        if size < 0 or end > len(self.data):
            raise ParseError(
                "tpm.truncated", f"{self.what}: {field} needs {size} bytes at offset {self.pos}"
            )
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        value: int = struct.unpack(">H", self.take(2, field))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = struct.unpack(">I", self.take(4, field))[0]
        return value

    def u64(self, field: str) -> int:
        value: int = struct.unpack(">Q", self.take(8, field))[0]
        return value

    def tpm2b(self, field: str, limit: int) -> bytes:
        """A TPM2B: UINT16 size then that many bytes, at most ``limit``."""
        size = self.u16(f"{field}.size")
        if size > limit:
            raise ParseError(
                "tpm.size_exceeded", f"{self.what}: {field} is {size} bytes, at most {limit}"
            )
        return self.take(size, field)

    def done(self) -> None:
        if self.pos != len(self.data):
            raise ParseError(
                "tpm.trailing_bytes",
                f"{self.what}: {len(self.data) - self.pos} bytes after the structure",
            )


def hash_alg(value: int, field: str) -> HashAlg:
    """The :class:`HashAlg` for a TPM_ALG_ID, or ``tpm.unsupported_hash``."""
    try:
        return HashAlg(value)
    except ValueError:
        raise ParseError("tpm.unsupported_hash", f"{field} algorithm 0x{value:04x}") from None


@dataclass(frozen=True)
class PcrSelection:
    """One TPMS_PCR_SELECTION: a bank and the PCR indices selected in it (ascending)."""

    hash: HashAlg
    indices: tuple[int, ...]
    size_of_select: int = 3


@dataclass(frozen=True)
class ClockInfo:
    """TPMS_CLOCK_INFO: milliseconds powered, resets/restarts since clear, and clock safety."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True)
class Attest:
    """A TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE; ``raw`` is the exact signed byte string."""

    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes
    raw: bytes = b""


@dataclass(frozen=True)
class Signature:
    """A TPMT_SIGNATURE: scheme, hash, and the RSA signature or ECDSA (r, s)."""

    sig_alg: SigAlg
    hash: HashAlg
    rsa: bytes = b""
    ecdsa_r: int = 0
    ecdsa_s: int = 0


def _selection(reader: Reader, index: int) -> PcrSelection:
    bank = hash_alg(reader.u16(f"pcrSelect[{index}].hash"), f"pcrSelect[{index}]")
    size = reader.u8(f"pcrSelect[{index}].sizeofSelect")
    if size > MAX_SELECT_BYTES:
        raise ParseError(
            "tpm.size_exceeded", f"pcrSelect[{index}].sizeofSelect {size} > {MAX_SELECT_BYTES}"
        )
    bitmap = reader.take(size, f"pcrSelect[{index}].pcrSelect")
    indices = tuple(
        byte * 8 + bit for byte, value in enumerate(bitmap) for bit in range(8) if value >> bit & 1
    )
    return PcrSelection(bank, indices, size)


def parse_attest(data: bytes) -> Attest:
    """Parse a TPMS_ATTEST that must be a quote; raises :class:`ParseError`."""
    if len(data) > MAX_ATTEST_SIZE:
        raise ParseError("tpm.size_exceeded", f"TPMS_ATTEST is {len(data)} bytes")
    reader = Reader(data, "TPMS_ATTEST")
    magic = reader.u32("magic")
    if magic != TPM_GENERATED_VALUE:
        raise ParseError("tpm.bad_magic", f"magic 0x{magic:08x} is not TPM_GENERATED_VALUE")
    kind = reader.u16("type")
    if kind != TPM_ST_ATTEST_QUOTE:
        raise ParseError("tpm.not_a_quote", f"type 0x{kind:04x} is not TPM_ST_ATTEST_QUOTE")
    signer = reader.tpm2b("qualifiedSigner", MAX_HA_SIZE)
    extra = reader.tpm2b("extraData", MAX_HA_SIZE)
    clock = ClockInfo(
        clock=reader.u64("clockInfo.clock"),
        reset_count=reader.u32("clockInfo.resetCount"),
        restart_count=reader.u32("clockInfo.restartCount"),
        safe=_yes_no(reader.u8("clockInfo.safe")),
    )
    firmware = reader.u64("firmwareVersion")
    count = reader.u32("pcrSelect.count")
    if count > MAX_PCR_BANKS:
        raise ParseError("tpm.size_exceeded", f"{count} PCR selections > {MAX_PCR_BANKS}")
    selections = tuple(_selection(reader, i) for i in range(count))
    digest = reader.tpm2b("pcrDigest", MAX_DIGEST_SIZE)
    reader.done()
    return Attest(signer, extra, clock, firmware, selections, digest, reader.data)


def _yes_no(value: int) -> bool:
    if value > 1:
        raise ParseError("tpm.bad_value", f"clockInfo.safe is {value}, not YES (1) or NO (0)")
    return value == 1


def parse_signature(data: bytes) -> Signature:
    """Parse a TPMT_SIGNATURE of scheme RSASSA, RSAPSS or ECDSA; raises :class:`ParseError`."""
    if len(data) > MAX_SIGNATURE_SIZE:
        raise ParseError("tpm.size_exceeded", f"TPMT_SIGNATURE is {len(data)} bytes")
    reader = Reader(data, "TPMT_SIGNATURE")
    raw_alg = reader.u16("sigAlg")
    try:
        sig_alg = SigAlg(raw_alg)
    except ValueError:
        raise ParseError(
            "tpm.unsupported_signature", f"sigAlg 0x{raw_alg:04x} is not RSASSA, RSAPSS or ECDSA"
        ) from None
    digest = hash_alg(reader.u16("signature.hash"), "signature hash")
    if sig_alg is SigAlg.ECDSA:
        r = reader.tpm2b("signatureR", MAX_ECC_PARAMETER)
        s = reader.tpm2b("signatureS", MAX_ECC_PARAMETER)
        reader.done()
        return Signature(
            sig_alg, digest, ecdsa_r=int.from_bytes(r, "big"), ecdsa_s=int.from_bytes(s, "big")
        )
    rsa = reader.tpm2b("sig", MAX_RSA_SIGNATURE)
    reader.done()
    return Signature(sig_alg, digest, rsa=rsa)


def encode_selection(selection: PcrSelection) -> bytes:
    bitmap = bytearray(selection.size_of_select)
    for index in selection.indices:
        bitmap[index // 8] |= 1 << (index % 8)
    return struct.pack(">HB", selection.hash, selection.size_of_select) + bytes(bitmap)


def encode_attest(attest: Attest) -> bytes:
    """The TPMS_ATTEST bytes of a quote (``raw`` is ignored)."""
    clock = attest.clock_info
    return b"".join(
        [
            struct.pack(">IH", TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE),
            _tpm2b(attest.qualified_signer),
            _tpm2b(attest.extra_data),
            struct.pack(
                ">QIIB", clock.clock, clock.reset_count, clock.restart_count, int(clock.safe)
            ),
            struct.pack(">QI", attest.firmware_version, len(attest.pcr_select)),
            *(encode_selection(s) for s in attest.pcr_select),
            _tpm2b(attest.pcr_digest),
        ]
    )


def encode_signature(signature: Signature, *, ecc_size: int = 32) -> bytes:
    """The TPMT_SIGNATURE bytes; ECDSA r and s are written as ``ecc_size``-byte integers."""
    head = struct.pack(">HH", signature.sig_alg, signature.hash)
    if signature.sig_alg is SigAlg.ECDSA:
        r = signature.ecdsa_r.to_bytes(ecc_size, "big")
        s = signature.ecdsa_s.to_bytes(ecc_size, "big")
        return head + _tpm2b(r) + _tpm2b(s)
    return head + _tpm2b(signature.rsa)


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data
