"""A real TPM 2.0 as an evidence source: ``/dev/tpmrm0`` (or any TCTI) through tpm2-pytss.

The source creates the AK as a *primary* restricted RSA-2048 signing key (RSASSA/SHA-256) in
the endorsement hierarchy: a primary key is derived from the hierarchy seed and its template,
so every run of the collector on one machine gets the same AK, which is what lets an operator
pin it (``TpmPolicy.trusted_ak_sha256``) or certify it once. For each attestation it reads the
SHA-256 PCRs, quotes them with ``report_data`` as qualifyingData, and emits the attestation
agent's JSON (see :mod:`services.verifier.families.tpm.evidence`), with the measured-boot event
log when the kernel exposes it. If a PCR changes between reading and quoting, the digest no
longer matches and the quote is taken again (a bounded number of times).

qualifyingData is a TPM2B_DATA, at most sizeof(TPMT_HA): 66 bytes on a TPM with SHA-512, 50 on
one whose largest hash is SHA-384. When the TPM refuses the 64-byte binding with a size error,
the source quotes SHA-256(report_data) instead, the *compact* binding the verifier accepts.

tpm2-pytss is optional and imported lazily: without it (or without a TPM) constructing
:class:`Tpm2Backend` raises :class:`ConfigError` (``collector.tpm_unavailable``). All TPM access
goes through the small :class:`TpmBackend` protocol, so the source is tested with a fake and,
where ``swtpm`` is installed, against a software TPM.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any, Protocol

from services.mesh import events
from services.mesh.errors import ConfigError
from services.verifier.families.tpm.evidence import encode_evidence
from services.verifier.families.tpm.quote import pcr_digest
from services.verifier.families.tpm.structures import HashAlg, parse_attest

DEFAULT_TCTI = "device:/dev/tpmrm0"
EVENT_LOG = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
PCRS = tuple(range(24))
AK_TEMPLATE = "rsa2048:rsassa-sha256:null"
AK_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign|noda"
RETRIES = 3
_TPM_RC_SIZE = 0x095


class TpmBackend(Protocol):
    """What the source needs from a TPM."""

    def ak_public(self) -> bytes:
        """The AK's SubjectPublicKeyInfo DER."""
        ...

    def read_pcrs(self, indices: tuple[int, ...]) -> list[bytes]:
        """The SHA-256 values of ``indices``."""
        ...

    def quote(self, qualifying_data: bytes, indices: tuple[int, ...]) -> tuple[bytes, bytes]:
        """(TPMS_ATTEST, TPMT_SIGNATURE) of a SHA-256-bank quote by the AK."""
        ...


class QualifyingDataTooLarge(Exception):
    """The TPM refused qualifyingData of this size (TPM_RC_SIZE)."""


class Tpm2Backend:
    """:class:`TpmBackend` over tpm2-pytss's ESAPI and a TCTI (``device:/dev/tpmrm0``...)."""

    def __init__(self, tcti: str = DEFAULT_TCTI) -> None:
        try:
            self._tss: Any = importlib.import_module("tpm2_pytss")
        except ImportError as exc:
            raise ConfigError(
                "collector.tpm_unavailable", "tpm2-pytss is not installed (pip install tpm2-pytss)"
            ) from exc
        name, _, conf = tcti.partition(":")
        try:
            self._esapi = self._tss.ESAPI(self._tss.TCTILdr(name, conf or None))
            template = self._tss.TPM2B_PUBLIC.parse(AK_TEMPLATE, objectAttributes=AK_ATTRIBUTES)
            handle, public, *_ = self._esapi.create_primary(
                None, template, self._tss.ESYS_TR.ENDORSEMENT
            )
        except self._tss.TSS2_Exception as exc:
            raise ConfigError("collector.tpm_unavailable", f"TPM at {tcti!r}: {exc}") from exc
        self._handle = handle
        self._public: bytes = public.to_der()

    def ak_public(self) -> bytes:
        return self._public

    def read_pcrs(self, indices: tuple[int, ...]) -> list[bytes]:
        values: list[bytes] = []
        for start in range(0, len(indices), 8):  # TPML_DIGEST holds at most 8 digests
            chunk = ",".join(str(i) for i in indices[start : start + 8])
            _, _, digests = self._esapi.pcr_read(f"sha256:{chunk}")
            values += [bytes(d) for d in digests]
        return values

    def quote(self, qualifying_data: bytes, indices: tuple[int, ...]) -> tuple[bytes, bytes]:
        selection = "sha256:" + ",".join(str(i) for i in indices)
        try:
            quoted, signature = self._esapi.quote(self._handle, selection, qualifying_data)
        except self._tss.TSS2_Exception as exc:
            if exc.error == _TPM_RC_SIZE:
                raise QualifyingDataTooLarge(str(exc)) from exc
            raise
        return bytes(quoted), bytes(signature.marshal())

    def close(self) -> None:
        self._esapi.flush_context(self._handle)
        self._esapi.close()


class TpmSource:
    """Evidence source for the ``tpm`` family on a real (or software) TPM."""

    family = "tpm"
    simulated = False

    def __init__(
        self,
        backend: TpmBackend | None = None,
        *,
        event_log: Path | None = EVENT_LOG,
        ak_cert: bytes | None = None,
    ) -> None:
        self.backend = backend if backend is not None else Tpm2Backend()
        self.event_log = event_log
        self.ak_cert = ak_cert

    def collect(self, report_data: bytes) -> events.Evidence:
        """Quote the SHA-256 PCRs with ``report_data`` (or its SHA-256) as qualifyingData."""
        try:
            attest, signature, values = self._consistent_quote(report_data)
        except QualifyingDataTooLarge:
            compact = hashlib.sha256(report_data).digest()
            attest, signature, values = self._consistent_quote(compact)
        document = encode_evidence(
            self.backend.ak_public(),
            attest,
            signature,
            values,
            ak_cert=self.ak_cert,
            event_log=self._event_log(),
        )
        return events.TpmEvidence(document=document)

    def _consistent_quote(self, data: bytes) -> tuple[bytes, bytes, list[bytes]]:
        for _ in range(RETRIES):
            values = self.backend.read_pcrs(PCRS)
            attest, signature = self.backend.quote(data, PCRS)
            if parse_attest(attest).pcr_digest == pcr_digest(HashAlg.SHA256, values):
                return attest, signature, values
        raise ConfigError("collector.tpm_unstable", f"PCRs kept changing over {RETRIES} quotes")

    def _event_log(self) -> bytes | None:
        if self.event_log is None:
            return None
        try:
            return self.event_log.read_bytes()
        except OSError:
            return None
