"""The real Nitro source: an attestation document from the Nitro Secure Module at ``/dev/nsm``.

Inside an enclave the NSM is a virtio device driven by the ``nsm`` kernel driver (upstream
since Linux 6.8, ``drivers/misc/nsm.c``; before that AWS's out-of-tree driver with the same ABI).
One ioctl carries one CBOR request and returns one CBOR response::

    struct nsm_message {             /* upstream: struct nsm_raw of two struct nsm_iovec */
        struct iovec request;        /* { void *iov_base; size_t iov_len; }  16 bytes    */
        struct iovec response;       /* the driver rewrites iov_len to the reply length  */
    };                               /* 32 bytes on every 64-bit Linux                    */

    NSM_IOCTL_REQUEST = _IOWR(0x0A, 0, struct nsm_message)

``_IOWR(type, nr, size)`` packs direction (read|write = 3) into bits 31-30, the argument size
into bits 29-16, the type ("magic") into bits 15-8 and the number into bits 7-0::

    (3 << 30) | (32 << 16) | (0x0A << 8) | 0  =  0xC0200A00

The request is the NSM API's serde encoding of ``Request::Attestation``:
``{"Attestation": {"user_data": bstr/null, "nonce": bstr/null, "public_key": bstr/null}}``; the
answer is ``{"Attestation": {"document": bstr}}`` or ``{"Error": "<ErrorCode>"}``. Requests are
at most 0x1000 bytes and responses 0x3000, as the driver enforces.

The device is a seam: :class:`NsmSource` takes any :class:`NsmDevice`, and
:class:`IoctlNsmDevice` takes its ``open``/``ioctl``/``close`` functions as arguments, so tests
run the exact struct packing against a fake kernel without an enclave.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import cbor2

from services.mesh import events
from services.mesh.errors import AttestmeshError, ParseError
from services.verifier.families import cose

DEVICE = "/dev/nsm"
NSM_MAGIC = 0x0A
NSM_REQUEST_MAX_SIZE = 0x1000
NSM_RESPONSE_MAX_SIZE = 0x3000
MAX_FIELD = 1024
"""Largest user_data, nonce or public_key the attestation document can carry."""

_IOC_NRSHIFT, _IOC_TYPESHIFT, _IOC_SIZESHIFT, _IOC_DIRSHIFT = 0, 8, 16, 30
_IOC_WRITE, _IOC_READ = 1, 2


class Iovec(ctypes.Structure):
    """``struct iovec``: a user-space buffer address and its length."""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class NsmMessage(ctypes.Structure):
    """``struct nsm_message``: the request and response buffers of one NSM exchange."""

    _fields_ = [("request", Iovec), ("response", Iovec)]


def iowr(kind: int, number: int, size: int) -> int:
    """Linux's ``_IOWR``: a read-write ioctl number for an argument of ``size`` bytes."""
    direction = _IOC_READ | _IOC_WRITE
    return (
        direction << _IOC_DIRSHIFT
        | size << _IOC_SIZESHIFT
        | kind << _IOC_TYPESHIFT
        | number << _IOC_NRSHIFT
    )


NSM_IOCTL_REQUEST = iowr(NSM_MAGIC, 0, ctypes.sizeof(NsmMessage))
"""0xC0200A00 on 64-bit Linux."""


class NsmError(AttestmeshError):
    """The NSM could not produce a document: ``nsm.unavailable``, ``nsm.request_failed``,
    ``nsm.error_response`` (the NSM answered with an error code) or ``nsm.response_malformed``."""


class NsmDevice(Protocol):
    """Anything that exchanges one CBOR request for one CBOR response with an NSM."""

    def request(self, message: bytes) -> bytes: ...


Ioctl = Callable[[int, int, Any, bool], Any]


class IoctlNsmDevice:
    """``/dev/nsm`` through the driver's ioctl; the OS calls are injectable for tests."""

    def __init__(
        self,
        path: str = DEVICE,
        *,
        opener: Callable[[str, int], int] = os.open,
        ioctl: Ioctl = fcntl.ioctl,
        closer: Callable[[int], None] = os.close,
    ) -> None:
        self.path, self._open, self._ioctl, self._close = path, opener, ioctl, closer

    def request(self, message: bytes) -> bytes:
        if len(message) > NSM_REQUEST_MAX_SIZE:
            raise NsmError("nsm.request_failed", f"request of {len(message)} bytes exceeds 0x1000")
        request = ctypes.create_string_buffer(message, len(message))
        response = ctypes.create_string_buffer(NSM_RESPONSE_MAX_SIZE)
        exchange = NsmMessage(
            Iovec(ctypes.addressof(request), len(message)),
            Iovec(ctypes.addressof(response), NSM_RESPONSE_MAX_SIZE),
        )
        try:
            fd = self._open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NsmError("nsm.unavailable", f"{self.path}: {exc.strerror}") from exc
        try:
            self._ioctl(fd, NSM_IOCTL_REQUEST, exchange, True)
        except OSError as exc:
            raise NsmError("nsm.request_failed", f"NSM ioctl failed: {exc.strerror}") from exc
        finally:
            self._close(fd)
        size = exchange.response.iov_len
        if not 0 < size <= NSM_RESPONSE_MAX_SIZE:
            raise NsmError("nsm.response_malformed", f"NSM reported a {size}-byte response")
        return response.raw[:size]


def attestation_request(
    *, user_data: bytes | None, nonce: bytes | None, public_key: bytes | None
) -> bytes:
    """The CBOR ``Request::Attestation`` message (absent fields as CBOR null, as serde does)."""
    fields = {"user_data": user_data, "nonce": nonce, "public_key": public_key}
    for name, value in fields.items():
        if value is not None and len(value) > MAX_FIELD:
            raise NsmError("nsm.request_failed", f"{name} is longer than {MAX_FIELD} bytes")
    return cbor2.dumps({"Attestation": fields})


def parse_response(data: bytes) -> bytes:
    """The document from an NSM response; :class:`NsmError` for errors and malformed replies."""
    try:
        value = cose.decode_cbor(
            data, what="NSM response", code="nsm.response_malformed", max_size=NSM_RESPONSE_MAX_SIZE
        )
    except ParseError as exc:
        raise NsmError(exc.reason, exc.detail) from exc
    if isinstance(value, Mapping) and set(value) == {"Error"}:
        raise NsmError("nsm.error_response", f"NSM error {str(value['Error'])[:64]}")
    body = value.get("Attestation") if isinstance(value, Mapping) and len(value) == 1 else None
    document = body.get("document") if isinstance(body, Mapping) else None
    if not isinstance(document, bytes) or not document:
        raise NsmError("nsm.response_malformed", "response is not an Attestation with a document")
    return document


class NsmSource:
    """The Nitro evidence source inside a real enclave (``family="nitro"``)."""

    family = "nitro"
    simulated = False

    def __init__(self, device: NsmDevice | None = None) -> None:
        self.device = device if device is not None else IoctlNsmDevice()

    def document(
        self, report_data: bytes, *, nonce: bytes | None = None, public_key: bytes | None = None
    ) -> bytes:
        """An attestation document with ``user_data = report_data``."""
        message = attestation_request(user_data=report_data, nonce=nonce, public_key=public_key)
        return parse_response(self.device.request(message))

    def collect(
        self, report_data: bytes, *, nonce: bytes | None = None, public_key: bytes | None = None
    ) -> events.Evidence:
        """Evidence binding ``report_data`` (the EvidenceSource contract)."""
        document = self.document(report_data, nonce=nonce, public_key=public_key)
        return events.NitroEvidence(document=document)
