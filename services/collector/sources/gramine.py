"""Gramine's ``/dev/attestation``: SGX DCAP quotes for an application enclave.

Inside a Gramine enclave the LibOS serves a pseudo-filesystem: write the 64 bytes of REPORT_DATA
to ``user_report_data``, read ``quote`` and Gramine has the quoting enclave sign an SGX quote of
this enclave's report; ``attestation_type`` says which kind Gramine was configured for. Only
``dcap`` yields a quote our verifier checks (``none`` has no quote; EPID/IAS is retired), so the
type is checked before every round.

``user_report_data`` is one per enclave, shared by every thread, so a round holds a process-wide
lock from write to read; processes forked inside the same enclave could still interleave, which
is why the quote must echo our REPORT_DATA before it leaves. Files are handled with the
configfs source's :class:`~.pseudofs.AttributeDir` (bounded, no symlinks), through the same
:class:`~.pseudofs.FileOps` seam the tests fill with a fake.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from services.collector.sources.checks import check_dcap_quote, require_report_data
from services.collector.sources.pseudofs import (
    MAX_TEXT,
    OS_FILES,
    AttributeDir,
    FileOps,
    os_failure,
)
from services.mesh import events
from services.mesh.errors import ConfigError

DEFAULT_ROOT = Path("/dev/attestation")
MAX_QUOTE = 32 * 1024
"""An ECDSA quote with its PCK chain is about 5 KiB; Gramine's own buffer is 8 KiB."""

_ROUND = threading.Lock()


class GramineSource:
    """An :class:`~services.collector.sources.base.EvidenceSource` on Gramine's pseudo-files."""

    family = "sgx"
    simulated = False

    def __init__(self, root: Path | str = DEFAULT_ROOT, *, files: FileOps | None = None) -> None:
        self.root = Path(root)
        self.files: FileOps = files or OS_FILES

    def attestation_type(self) -> str:
        """What Gramine was configured for: ``dcap``, ``none``..."""
        with _ROUND, self._directory() as directory:
            return self._attestation_type(directory)

    def collect(self, report_data: bytes) -> events.Evidence:
        report_data = require_report_data(report_data)
        with _ROUND, self._directory() as directory:
            kind = self._attestation_type(directory)
            if kind != "dcap":
                raise ConfigError(
                    "collector.gramine_not_dcap",
                    f"Gramine attestation_type is {kind!r}; set sgx.remote_attestation = "
                    '"dcap" in the manifest',
                )
            directory.write("user_report_data", report_data)
            quote = directory.read("quote", MAX_QUOTE)
        return events.SgxEvidence(quote=check_dcap_quote(quote, report_data, tdx=False))

    @contextlib.contextmanager
    def _directory(self) -> Iterator[AttributeDir]:
        try:
            fd = self.files.open(str(self.root), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise ConfigError(
                "collector.gramine_unavailable", f"{self.root} does not exist (not in Gramine?)"
            ) from None
        except OSError as exc:
            raise os_failure(exc, f"open {self.root}") from None
        try:
            yield AttributeDir(self.files, fd, str(self.root))
        finally:
            self.files.close(fd)

    def _attestation_type(self, directory: AttributeDir) -> str:
        raw = directory.read("attestation_type", MAX_TEXT)
        return raw.decode("ascii", errors="replace").strip("\0\n ")
