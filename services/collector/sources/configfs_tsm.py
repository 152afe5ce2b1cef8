"""configfs-tsm (Linux 6.7+): SEV-SNP reports and TDX quotes from ``/sys/kernel/config/tsm/report``.

The kernel's cross-vendor report interface (``Documentation/ABI/testing/configfs-tsm``), one
round per fresh entry:

1. ``mkdir`` a uniquely named entry; the kernel populates its attributes (``ENXIO`` when no TSM
   provider is registered);
2. read ``provider`` (``sev_guest`` or ``tdx_guest``: the outblob's format) and ``generation``;
3. write ``privlevel`` (SNP VMPL, optional) and ``inblob`` (the 64 bytes of REPORT_DATA);
4. read ``outblob`` (the kernel asks the TSM for a report on first read) and, for SNP, ``auxblob``
   (the host's certificate table, empty when the host supplies none);
5. read ``generation`` again: it must have advanced by exactly our number of writes;
6. ``rmdir`` the entry, on every path.

Why the generation check is not optional: any process allowed into the directory can write to
our entry, and configfs commits a binary attribute (``inblob``) only when the file is closed,
discarding the store's result, so a failed or overtaken write is otherwise invisible. More
increments than writes means another writer raced us (``collector.configfs_race``); fewer, a
write the kernel dropped. The report itself is then parsed and must echo our REPORT_DATA.

Attributes are opened relative to the entry's directory descriptor with ``O_NOFOLLOW`` and must
be regular files, so nothing planted in the entry can redirect a read or write elsewhere; every
read is bounded. The syscalls go through :class:`FileOps`, a seam the tests fill with a fake
kernel (:mod:`services.testing.fakes`) on an ordinary directory; the Gramine source reuses it.
The evidence checks shared with the ioctl sources (:func:`snp_evidence`, :func:`check_dcap_quote`)
live here too because configfs-tsm is the one interface that yields both formats.

TDX evidence also carries the firmware's event log when the guest exposes the ACPI CCEL table's
log area (:func:`read_ccel`), so the verifier can replay it against the quote's RTMRs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from services.mesh import events
from services.mesh.errors import AttestmeshError, ConfigError, ParseError, VerificationError
from services.verifier.families.dcap.ccel import MAX_AREA_SIZE, used_log
from services.verifier.families.dcap.quote import parse_quote
from services.verifier.families.snp.certtable import MAX_TABLE_SIZE, parse_cert_table
from services.verifier.families.snp.parse import parse_report

DEFAULT_ROOT = Path("/sys/kernel/config/tsm/report")
DEFAULT_CCEL = Path("/sys/firmware/acpi/tables/data/CCEL")
"""The CCEL table's log area as Linux exposes it (root-only; absent outside a TD)."""
REPORT_DATA_SIZE = 64
PRIVLEVEL_MAX = 3
MAX_OUTBLOB = 32 * 1024
"""The kernel's TSM_OUTBLOB_MAX: an SNP report is 1184 bytes, a TDX quote a few KiB."""
MAX_AUXBLOB = MAX_TABLE_SIZE
MAX_TEXT = 64
PROVIDERS = {"sev_guest": "snp", "tdx_guest": "tdx"}

_SAFE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_COUNT = re.compile(rb"(\d{1,20})\n?")
_NAME = re.compile(rb"([a-z0-9_-]{1,32})\n?")


class FileOps(Protocol):
    """The syscalls the pseudo-filesystem sources make, so a test can stand in for the kernel."""

    def open(self, path: str, flags: int, *, dir_fd: int | None = None) -> int: ...

    def read(self, fd: int, size: int) -> bytes: ...

    def write(self, fd: int, data: bytes) -> int: ...

    def fstat(self, fd: int) -> os.stat_result: ...

    def close(self, fd: int) -> None: ...

    def mkdir(self, path: str, *, dir_fd: int) -> None: ...

    def rmdir(self, path: str, *, dir_fd: int) -> None: ...


class OsFileOps:
    """:class:`FileOps` on the real kernel."""

    def open(self, path: str, flags: int, *, dir_fd: int | None = None) -> int:
        return os.open(path, flags, 0o600, dir_fd=dir_fd)

    def read(self, fd: int, size: int) -> bytes:
        return os.read(fd, size)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def mkdir(self, path: str, *, dir_fd: int) -> None:
        os.mkdir(path, 0o700, dir_fd=dir_fd)

    def rmdir(self, path: str, *, dir_fd: int) -> None:
        os.rmdir(path, dir_fd=dir_fd)


OS_FILES = OsFileOps()


def os_failure(exc: OSError, what: str, reason: str = "collector.device_error") -> AttestmeshError:
    """An ``OSError`` from the kernel as our error, naming the errno symbolically."""
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return AttestmeshError(reason, f"{what}: {code} ({exc.strerror})")


def require_report_data(report_data: bytes) -> bytes:
    """REPORT_DATA must be exactly 64 bytes: never padded or truncated behind the caller's back."""
    if not isinstance(report_data, bytes | bytearray) or len(report_data) != REPORT_DATA_SIZE:
        size = len(report_data) if isinstance(report_data, bytes | bytearray) else "non-bytes"
        raise ConfigError(
            "collector.report_data_size",
            f"REPORT_DATA must be {REPORT_DATA_SIZE} bytes, got {size}",
        )
    return bytes(report_data)


class AttributeDir:
    """An open directory of kernel attribute files, used without following links."""

    def __init__(self, files: FileOps, fd: int, label: str) -> None:
        self.files = files
        self.fd = fd
        self.label = label

    def read(self, name: str, limit: int) -> bytes:
        """The whole attribute (at most ``limit`` bytes); a missing one is a ``ConfigError``."""
        data = self.read_optional(name, limit)
        if data is None:
            raise self._missing(name)
        return data

    def read_optional(self, name: str, limit: int) -> bytes | None:
        """The attribute's content, or ``None`` when the kernel does not offer it."""
        fd = self._open(name, os.O_RDONLY)
        if fd is None:
            return None
        try:
            chunks: list[bytes] = []
            total = 0
            while chunk := self._read(fd, name, min(limit + 1 - total, 1 << 16)):
                total += len(chunk)
                if total > limit:
                    raise ParseError(
                        "collector.blob_too_large", f"{self.label}/{name} exceeds {limit} bytes"
                    )
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            self.files.close(fd)

    def write(self, name: str, data: bytes) -> None:
        """Write ``data`` in one call and close: configfs commits binary attributes on close."""
        fd = self._open(name, os.O_WRONLY)
        if fd is None:
            raise self._missing(name)
        try:
            written = self.files.write(fd, data)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.files.close(fd)
            raise os_failure(exc, f"write {self.label}/{name}") from None
        try:
            self.files.close(fd)
        except OSError as exc:
            raise os_failure(exc, f"close {self.label}/{name}") from None
        if written != len(data):
            raise AttestmeshError(
                "collector.device_error",
                f"short write to {self.label}/{name}: {written} of {len(data)} bytes",
            )

    def _read(self, fd: int, name: str, size: int) -> bytes:
        try:
            return self.files.read(fd, size)
        except OSError as exc:
            raise os_failure(exc, f"read {self.label}/{name}") from None

    def _open(self, name: str, flags: int) -> int | None:
        try:
            fd = self.files.open(name, flags | _SAFE_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise AttestmeshError(
                    "collector.unsafe_path",
                    f"{self.label}/{name} is a symbolic link; not following",
                ) from None
            raise os_failure(exc, f"open {self.label}/{name}") from None
        try:
            mode = self.files.fstat(fd).st_mode
        except OSError as exc:
            self.files.close(fd)
            raise os_failure(exc, f"stat {self.label}/{name}") from None
        if not stat.S_ISREG(mode):
            self.files.close(fd)
            raise AttestmeshError(
                "collector.unsafe_path", f"{self.label}/{name} is not a regular file"
            )
        return fd

    def _missing(self, name: str) -> ConfigError:
        return ConfigError(
            "collector.missing_attribute", f"{self.label}/{name} does not exist on this kernel"
        )


def parse_count(raw: bytes, what: str) -> int:
    """A decimal attribute such as ``generation`` ("17\\n"), strictly."""
    match = _COUNT.fullmatch(raw)
    if match is None:
        raise ParseError("collector.bad_attribute", f"{what} is not a decimal count: {raw[:32]!r}")
    return int(match.group(1))


def parse_name(raw: bytes, what: str) -> str:
    """A short identifier attribute such as ``provider`` ("sev_guest\\n"), strictly."""
    match = _NAME.fullmatch(raw)
    if match is None:
        raise ParseError("collector.bad_attribute", f"{what} is not an identifier: {raw[:32]!r}")
    return match.group(1).decode("ascii")


def provider_family(provider: str) -> str:
    """The evidence family of a TSM provider's outblob."""
    family = PROVIDERS.get(provider)
    if family is None:
        raise ConfigError(
            "collector.unknown_provider",
            f"configfs-tsm provider {provider!r} is not supported (known: {sorted(PROVIDERS)})",
        )
    return family


def snp_evidence(
    report: bytes, certificates: bytes | None, report_data: bytes, *, vmpl: int | None = None
) -> events.SnpEvidence:
    """Sanity-check what a device returned before it leaves the node; no signature checks here.

    The report must parse exactly and echo ``report_data`` (and ``vmpl`` when one was asked
    for); a non-empty certificate table must parse. Catching a wrong or stale report here gives
    the operator the device's fault, not a contraindicated verdict far away.
    """
    try:
        parsed = parse_report(report)
    except ParseError as exc:
        raise ParseError("collector.bad_report", f"SEV-SNP report from the device: {exc}") from exc
    if parsed.report_data != report_data:
        raise VerificationError(
            "collector.report_data_mismatch", "the SEV-SNP report binds other REPORT_DATA"
        )
    if vmpl is not None and parsed.vmpl != vmpl:
        raise VerificationError(
            "collector.vmpl_mismatch", f"asked for VMPL {vmpl}, the report says {parsed.vmpl}"
        )
    if certificates:
        try:
            parse_cert_table(certificates)
        except ParseError as exc:
            raise ParseError("collector.bad_cert_table", str(exc)) from exc
    return events.SnpEvidence(
        report=bytes(report), certificates=bytes(certificates) if certificates else None
    )


def check_dcap_quote(quote: bytes, report_data: bytes, *, tdx: bool) -> bytes:
    """The quote must parse exactly, be of the expected TEE and echo ``report_data``."""
    kind = "TDX" if tdx else "SGX"
    try:
        parsed = parse_quote(quote)
    except ParseError as exc:
        raise ParseError("collector.bad_report", f"{kind} quote from the device: {exc}") from exc
    if parsed.is_tdx != tdx:
        raise ParseError("collector.bad_report", f"expected a {kind} quote, got another TEE's")
    if parsed.body.report_data != report_data:
        raise VerificationError(
            "collector.report_data_mismatch", f"the {kind} quote binds other REPORT_DATA"
        )
    return bytes(quote)


class ConfigfsTsmSource:
    """An :class:`~services.collector.sources.base.EvidenceSource` on configfs-tsm.

    ``family`` is probed from the provider when not given; ``privlevel`` (SNP only) requests a
    report for that VMPL. Each :meth:`collect` uses its own entry, so concurrent rounds (and
    other agents on the node) never share one. ``ccel`` is where TDX evidence finds the event
    log (``None``: never attach one).
    """

    simulated = False

    def __init__(
        self,
        root: Path | str = DEFAULT_ROOT,
        *,
        family: str | None = None,
        privlevel: int | None = None,
        files: FileOps | None = None,
        ccel: Path | str | None = DEFAULT_CCEL,
    ) -> None:
        self.root = Path(root)
        self.ccel = Path(ccel) if ccel is not None else None
        self.files: FileOps = files or OS_FILES
        if privlevel is not None and not 0 <= privlevel <= PRIVLEVEL_MAX:
            raise ConfigError("collector.privlevel", f"privlevel {privlevel} is not in 0..3")
        if family is None:
            family = provider_family(read_provider(self.root, self.files))
        elif family not in PROVIDERS.values():
            raise ConfigError("collector.unknown_provider", f"configfs-tsm has no {family!r}")
        if privlevel is not None and family != "snp":
            raise ConfigError("collector.privlevel", "only SEV-SNP has privilege levels (VMPL)")
        self.family: str = family
        self.privlevel = privlevel

    def collect(self, report_data: bytes) -> events.Evidence:
        """One report binding ``report_data``, from a fresh entry removed afterwards."""
        report_data = require_report_data(report_data)
        with report_entry(self.root, self.files) as entry:
            outblob, auxblob = self._generate(entry, report_data)
        if self.family == "snp":
            return snp_evidence(outblob, auxblob, report_data, vmpl=self.privlevel)
        quote = check_dcap_quote(outblob, report_data, tdx=True)
        return events.TdxEvidence(quote=quote, event_log=read_ccel(self.ccel, self.files))

    def _generate(self, entry: AttributeDir, report_data: bytes) -> tuple[bytes, bytes | None]:
        provider = parse_name(entry.read("provider", MAX_TEXT), f"{entry.label}/provider")
        if PROVIDERS.get(provider) != self.family:
            raise ConfigError(
                "collector.provider_mismatch",
                f"provider is {provider!r} now, this source was set up for {self.family}",
            )
        before = _generation(entry)
        writes = 0
        if self.privlevel is not None:
            floor = parse_count(entry.read("privlevel_floor", MAX_TEXT), "privlevel_floor")
            if self.privlevel < floor:
                raise ConfigError(
                    "collector.privlevel",
                    f"privlevel {self.privlevel} is below this guest's floor {floor}",
                )
            entry.write("privlevel", b"%d\n" % self.privlevel)
            writes += 1
        entry.write("inblob", report_data)
        writes += 1
        outblob = entry.read("outblob", MAX_OUTBLOB)
        auxblob = entry.read_optional("auxblob", MAX_AUXBLOB) if self.family == "snp" else None
        advanced = _generation(entry) - before
        if advanced > writes:
            raise AttestmeshError(
                "collector.configfs_race",
                f"{entry.label}: generation advanced by {advanced} for our {writes} writes; "
                "another writer used this entry, the report may not be ours",
            )
        if advanced < writes:
            raise AttestmeshError(
                "collector.configfs_write_lost",
                f"{entry.label}: generation advanced by {advanced} for our {writes} writes",
            )
        return outblob, auxblob


def _generation(entry: AttributeDir) -> int:
    return parse_count(entry.read("generation", MAX_TEXT), f"{entry.label}/generation")


def read_ccel(path: Path | None, files: FileOps | None = None) -> bytes | None:
    """The CCEL event log at ``path`` without the log area's unused fill; ``None`` if unreadable.

    The log is optional evidence: no table (not a TD, old firmware) or no permission to read it
    leaves the quote to stand alone. A log the verifier could not take (over its bounds), or
    one planted as a link or special file, is an error like any other unexpected attribute.
    """
    if path is None:
        return None
    files = files or OS_FILES
    try:
        tables_fd = files.open(str(path.parent), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        area = AttributeDir(files, tables_fd, str(path.parent)).read_optional(
            path.name, MAX_AREA_SIZE
        )
    except AttestmeshError as exc:
        if exc.reason != "collector.device_error":
            raise
        return None
    finally:
        files.close(tables_fd)
    if area is None:
        return None
    try:
        return used_log(area) or None
    except ParseError as exc:
        raise ParseError("collector.bad_report", f"CCEL event log: {exc.detail}") from exc


def read_provider(root: Path, files: FileOps | None = None) -> str:
    """The registered TSM provider's name; creates and removes one entry to ask."""
    with report_entry(root, files or OS_FILES) as entry:
        return parse_name(entry.read("provider", MAX_TEXT), f"{entry.label}/provider")


@contextlib.contextmanager
def report_entry(root: Path, files: FileOps) -> Iterator[AttributeDir]:
    """A fresh report entry under ``root``, removed however the body ends.

    A failed removal surfaces as ``collector.configfs_cleanup``, or as a note on the error
    already propagating (which stays the one raised).
    """
    try:
        root_fd = files.open(str(root), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(
            "collector.configfs_unavailable", f"{root} does not exist (configfs-tsm needs 6.7+)"
        ) from None
    except OSError as exc:
        raise os_failure(exc, f"open {root}") from None
    try:
        name = f"attestmesh-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            files.mkdir(name, dir_fd=root_fd)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                raise ConfigError(
                    "collector.configfs_no_provider", f"{root}: no TSM provider is registered"
                ) from None
            raise os_failure(exc, f"mkdir {root}/{name}") from None
        try:
            try:
                entry_fd = files.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | _SAFE_FLAGS, dir_fd=root_fd
                )
            except OSError as exc:
                raise os_failure(exc, f"open {root}/{name}", "collector.unsafe_path") from None
            try:
                yield AttributeDir(files, entry_fd, f"{root}/{name}")
            finally:
                files.close(entry_fd)
        except BaseException as exc:
            _remove(files, root_fd, f"{root}/{name}", name, pending=exc)
            raise
        _remove(files, root_fd, f"{root}/{name}", name, pending=None)
    finally:
        files.close(root_fd)


def _remove(
    files: FileOps, root_fd: int, label: str, name: str, *, pending: BaseException | None
) -> None:
    try:
        files.rmdir(name, dir_fd=root_fd)
    except OSError as exc:
        failure = os_failure(exc, f"rmdir {label}", "collector.configfs_cleanup")
        if pending is None:
            raise failure from None
        pending.add_note(str(failure))
