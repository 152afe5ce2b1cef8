"""Pick the evidence source this node actually has.

Order, best first: configfs-tsm (the kernel's cross-vendor interface: SNP reports with the host's
certificates, TDX quotes), then ``/dev/sev-guest`` (SNP on pre-6.7 kernels), ``/dev/tdx_guest``
(TDREPORTs only: refused with ``collector.tdx_quote_unavailable``, see :mod:`.tdx_guest`), then
Gramine's ``/dev/attestation`` (SGX enclaves), then ``/dev/nsm`` (AWS Nitro Enclaves); a TPM
(``/dev/tpmrm0``) only when ``family="tpm"`` is asked for, since most machines have one whether
or not they are confidential. A ``family`` restricts the search to sources of that family.
When nothing fits, ``collector.no_source`` lists every place looked at and what was found
there, so an operator can tell a missing driver from a permission problem.

Probing configfs-tsm creates and removes one report entry (the provider is only visible inside
one); the other probes only check that a path exists. Every path and both syscall seams are
injectable, which is how the tests run this against fake roots.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.collector.sources import configfs_tsm, gramine, nsm, sev_guest, tdx_guest, tpm
from services.collector.sources.base import EvidenceSource
from services.collector.sources.pseudofs import OS_FILES, FileOps
from services.collector.sources.sev_guest import DeviceOps
from services.mesh.errors import AttestmeshError, ConfigError

FAMILIES = ("snp", "tdx", "sgx", "nitro", "tpm")


@dataclass(frozen=True)
class Roots:
    """Where each interface lives; the defaults are the real ones."""

    configfs_tsm: Path = configfs_tsm.DEFAULT_ROOT
    sev_guest: Path = sev_guest.DEFAULT_PATH
    tdx_guest: Path = tdx_guest.DEFAULT_PATH
    attestation: Path = gramine.DEFAULT_ROOT
    nsm: Path = Path(nsm.DEVICE)
    tpm: Path = Path("/dev/tpmrm0")


def detect_source(
    family: str | None = None,
    *,
    vmpl: int | None = None,
    roots: Roots | None = None,
    files: FileOps | None = None,
    device: DeviceOps | None = None,
) -> EvidenceSource:
    """The best hardware source on this node (of ``family`` if given), or a ``ConfigError``.

    ``vmpl`` applies to SEV-SNP sources: the VMPL to request reports for.
    """
    if family is not None and family not in FAMILIES:
        raise ConfigError(
            "collector.no_source",
            f"no hardware evidence source exists for family {family!r} (only {FAMILIES})",
        )
    roots = roots or Roots()
    files = files or OS_FILES
    device = device or sev_guest.OS_DEVICE
    wanted = set(FAMILIES) if family is None else {family}
    looked: list[str] = []

    provider = _probe_configfs(roots.configfs_tsm, files, looked)
    if provider is not None and provider in wanted:
        return configfs_tsm.ConfigfsTsmSource(
            roots.configfs_tsm,
            family=provider,
            privlevel=vmpl if provider == "snp" else None,
            files=files,
        )
    if "snp" in wanted:
        if roots.sev_guest.exists():
            return sev_guest.SevGuestSource(roots.sev_guest, vmpl=vmpl or 0, device=device)
        looked.append(f"{roots.sev_guest}: absent")
    tdreport_only = "tdx" in wanted and roots.tdx_guest.exists()
    if "tdx" in wanted:
        looked.append(f"{roots.tdx_guest}: {'TDREPORT only' if tdreport_only else 'absent'}")
    if "sgx" in wanted:
        source = _probe_gramine(roots.attestation, files, looked)
        if source is not None:
            return source
    if "nitro" in wanted:
        if roots.nsm.exists():
            return nsm.NsmSource(nsm.IoctlNsmDevice(str(roots.nsm)))
        looked.append(f"{roots.nsm}: absent")
    if "tpm" in wanted and family == "tpm":
        if roots.tpm.exists():
            return tpm.TpmSource(tpm.Tpm2Backend(f"device:{roots.tpm}"))
        looked.append(f"{roots.tpm}: absent")
    if tdreport_only:
        raise tdx_guest.quote_unavailable(roots.tdx_guest, roots.configfs_tsm)
    what = f"for family {family}" if family else "on this node"
    raise ConfigError(
        "collector.no_source", f"no attestation interface {what}; looked at: " + "; ".join(looked)
    )


def _probe_configfs(root: Path, files: FileOps, looked: list[str]) -> str | None:
    """The family of configfs-tsm's provider, or ``None`` (with the reason noted)."""
    try:
        family = configfs_tsm.provider_family(configfs_tsm.read_provider(root, files))
    except AttestmeshError as exc:
        looked.append(f"{root}: {exc.detail or exc.reason}")
        return None
    looked.append(f"{root}: provider for {family}")
    return family


def _probe_gramine(root: Path, files: FileOps, looked: list[str]) -> EvidenceSource | None:
    if not root.exists():
        looked.append(f"{root}: absent")
        return None
    source = gramine.GramineSource(root, files=files)
    try:
        kind = source.attestation_type()
    except AttestmeshError as exc:
        looked.append(f"{root}: {exc.detail or exc.reason}")
        return None
    if kind != "dcap":
        looked.append(f"{root}: attestation_type {kind!r}, not dcap")
        return None
    return source
