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
The file access lives in :mod:`.pseudofs`, the checks on what the device returned (shared with
the ioctl sources) in :mod:`.checks`.

TDX evidence also carries the firmware's event log when the guest exposes the ACPI CCEL table's
log area (:func:`read_ccel`), so the verifier can replay it against the quote's RTMRs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from services.collector.sources.checks import (
    check_dcap_quote,
    require_report_data,
    snp_evidence,
)
from services.collector.sources.pseudofs import (
    MAX_TEXT,
    OS_FILES,
    SAFE_FLAGS,
    AttributeDir,
    FileOps,
    os_failure,
    parse_count,
    parse_name,
)
from services.mesh import events
from services.mesh.errors import AttestmeshError, ConfigError, ParseError
from services.verifier.families.dcap.ccel import MAX_AREA_SIZE, used_log
from services.verifier.families.snp.certtable import MAX_TABLE_SIZE

DEFAULT_ROOT = Path("/sys/kernel/config/tsm/report")
DEFAULT_CCEL = Path("/sys/firmware/acpi/tables/data/CCEL")
"""The CCEL table's log area as Linux exposes it (root-only; absent outside a TD)."""
PRIVLEVEL_MAX = 3
MAX_OUTBLOB = 32 * 1024
"""The kernel's TSM_OUTBLOB_MAX: an SNP report is 1184 bytes, a TDX quote a few KiB."""
MAX_AUXBLOB = MAX_TABLE_SIZE
PROVIDERS = {"sev_guest": "snp", "tdx_guest": "tdx"}


def provider_family(provider: str) -> str:
    """The evidence family of a TSM provider's outblob."""
    family = PROVIDERS.get(provider)
    if family is None:
        raise ConfigError(
            "collector.unknown_provider",
            f"configfs-tsm provider {provider!r} is not supported (known: {sorted(PROVIDERS)})",
        )
    return family


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
                    name, os.O_RDONLY | os.O_DIRECTORY | SAFE_FLAGS, dir_fd=root_fd
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
