"""Service configuration: one typed struct, read from a JSON file and the environment.

Configuration is read once at the edge (the CLI) and passed down explicitly; nothing deeper
in the code looks at the environment, so every service is testable with a hand-built config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from services.mesh.boundedjson import MAX_DEPTH, depth
from services.mesh.errors import ConfigError
from services.mesh.keys import TrustedKeys

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"

SealingSource = Literal["file", "env", "k8s-secret", "snp"]
SnpKeyField = Literal["policy", "image_id", "family_id", "measurement", "guest_svn", "tcb_version"]


class SnpSealing(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What the broker mixes into its SEV-SNP derived sealing key (``sealing_source: snp``).

    Every field changes the key: keep them fixed for the life of the sealed state, and plan
    any change (a new image when ``measurement`` is mixed in) as a recovery (README: sealing
    keys). Field names follow AMD's MSG_KEY_REQ.
    """

    device: str = "/dev/sev-guest"
    root_key: Literal["vcek", "vmrk"] = "vcek"
    """VCEK: the chip's key, so the same guest on another chip derives another key."""
    fields: list[SnpKeyField] = msgspec.field(default_factory=lambda: ["measurement", "policy"])
    vmpl: Annotated[int, msgspec.Meta(ge=0, le=3)] = 0
    guest_svn: Annotated[int, msgspec.Meta(ge=0, lt=2**32)] = 0
    tcb_version: Annotated[int, msgspec.Meta(ge=0)] = 0
    """The raw 64-bit TCB_VERSION (checked to fit when the key is requested)."""


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything a service needs from outside.

    ``test_roots_dir`` is the only way the project's test PKI becomes trusted, and
    ``allow_simulated`` the only way the release policy accepts simulated evidence: both are
    off unless a simulated deployment (``attestmesh up``) or a test sets them explicitly.
    ``offline`` keeps verifiers from fetching collateral (VCEKs from AMD's KDS); what is
    missing then stays missing and the verdict says so.
    """

    nats_url: str = DEFAULT_NATS_URL
    """One server's URL, or a cluster's: every member's, comma-separated (clients fail over)."""
    nats_nkey_seed_file: str | None = None
    data_dir: str = ".attestmesh"
    roots_dir: str | None = None
    test_roots_dir: str | None = None
    collateral_dir: str | None = None
    keys_dir: str | None = None
    policy_key_file: str | None = None
    """A collector's copy of the policy service's public key (PEM): the only signer whose
    decisions it acts on. Unset: ``policy.pem`` in the trusted-keys directory."""
    offline: bool = False
    kds_url: str = "https://kdsintf.amd.com"
    pcs_url: str = "https://api.trustedservices.intel.com"
    intel_root_crl_url: str = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"

    @property
    def vendor_urls(self) -> dict[str, str]:
        """The vendor services collateral planners fetch from (mirrors or a PCCS allowed)."""
        return {"kds": self.kds_url, "pcs": self.pcs_url, "intel_root_crl": self.intel_root_crl_url}

    nonce_ttl_s: float = 120.0
    decision_ttl_s: float = 300.0
    verdict_ttl_s: float = 300.0
    reattest_interval_s: float = 60.0
    jetstream_replicas: int = 1
    """Copies JetStream keeps of each stream and bucket (3 on a 3-server cluster)."""
    max_deliver: int = 5
    ack_wait_s: float = 30.0
    max_backlog: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 256
    """The policy refuses new rounds (``mesh.busy`` to a nonce request) while this many
    messages or more wait in the stages behind it (:mod:`services.policy.admission`)."""
    appraisal: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    """Per family, the verifier's appraisal policy (``{"snp": {"min_reported_tcb": ...}}``)."""
    allow_warning: bool = False
    allow_simulated: bool = False
    pinning: bool = True
    """Pin each node name to the hardware of its first allowed attestation (README: node
    identity and pinning); ``attestmesh node reset NAME`` releases a pin."""
    health_file: str | None = None
    """Touched while connected to NATS; ``attestmesh health`` checks it (Kubernetes probe)."""
    otlp_endpoint: str | None = None
    """Alias for ``OTEL_EXPORTER_OTLP_ENDPOINT``; the standard ``OTEL_*`` variables win."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (0: any free one); none: no scrape endpoint."""
    metrics_host: str = "127.0.0.1"
    """Address of the metrics endpoint (``0.0.0.0`` in a pod, so Prometheus can scrape it)."""
    log_level: str = "info"
    audit_max_records: Annotated[int, msgspec.Meta(ge=1, le=50_000)] = 20_000
    """The broker keeps at most this many audit records behind its newest checkpoint.

    Bounded well below the most keys a bucket listing reads (100,000), which the log shares
    with the secrets and every node's decision and release claim: a log at its bound must
    still list, or checkpoints, pruning and restarts would fail for good."""
    audit_checkpoint_every: Annotated[int, msgspec.Meta(ge=1)] = 1000
    """The broker signs an audit checkpoint after this many records (and every interval)."""
    audit_maintenance_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    """How often the broker seals its refusal counts, checkpoints and prunes the audit log."""
    sealing_source: SealingSource = "file"
    """Where the broker and the operator's commands get the sealing key (README: sealing
    keys): a key file, ``ATTESTMESH_SEALING_KEY``, a mounted Kubernetes Secret or the SNP
    firmware. None of them ever creates a key."""
    sealing_key_file: str | None = None
    """The key file of ``sealing_source: file``; unset: ``broker-sealing.key`` in ``data_dir``."""
    sealing_secret_dir: str | None = None
    """Where the Kubernetes Secret holding ``broker-sealing.key`` is mounted (``k8s-secret``)."""
    sealing_snp: SnpSealing = msgspec.field(default_factory=SnpSealing)

    def __post_init__(self) -> None:
        if self.audit_checkpoint_every > self.audit_max_records:
            raise ValueError("audit_checkpoint_every must not exceed audit_max_records")

    @property
    def keys_path(self) -> Path:
        return Path(self.keys_dir) if self.keys_dir else Path(self.data_dir) / "keys"

    @property
    def trusted_keys_path(self) -> Path:
        """Public keys of the verifiers, the policy service and the operator that others
        accept (each consumer accepts each key only for its role)."""
        return self.keys_path / "trusted"

    def policy_trust(self) -> TrustedKeys:
        """The keys a collector accepts decisions from (it accepts only ``policy`` among them)."""
        if self.policy_key_file is None:
            return TrustedKeys.load(self.trusted_keys_path)
        try:
            pem = Path(self.policy_key_file).read_bytes()
        except OSError as exc:
            raise ConfigError(
                "config.unreadable", f"{self.policy_key_file}: {exc.strerror}"
            ) from None
        return TrustedKeys.from_pem("policy", pem)


ENVIRONMENT = {
    "ATTESTMESH_NATS_URL": "nats_url",
    "ATTESTMESH_NATS_NKEY_SEED_FILE": "nats_nkey_seed_file",
    "ATTESTMESH_DATA_DIR": "data_dir",
    "ATTESTMESH_ROOTS": "roots_dir",
    "ATTESTMESH_OTLP_ENDPOINT": "otlp_endpoint",
    "ATTESTMESH_METRICS_PORT": "metrics_port",
    "ATTESTMESH_SEALING_SOURCE": "sealing_source",
    "ATTESTMESH_SEALING_KEY_FILE": "sealing_key_file",
    "ATTESTMESH_SEALING_SECRET_DIR": "sealing_secret_dir",
}
"""The variables :func:`load` reads, each the name of one ``Config`` field.

``ATTESTMESH_SEALING_KEY`` is deliberately not among them: it is the key itself (for
``sealing_source: env``), read only by :class:`~services.broker.keysources.EnvKeySource`, so
it can never end up in a ``Config`` that is saved, printed or logged."""


def load(path: str | os.PathLike[str] | None = None, **overrides: object) -> Config:
    """Read ``path`` (JSON) if given, then apply ``ATTESTMESH_*`` env and explicit overrides.

    Precedence: explicit overrides (the command line) > environment > file > defaults, so
    one shared ``config.json`` can be adjusted per process (``attestmesh up`` gives each
    service its own NATS identity and metrics port this way) and a command-line flag always
    means what it says.
    """
    raw: dict[str, object] = {}
    if path is not None:
        try:
            data = Path(path).read_bytes()
            if depth(data) > MAX_DEPTH:
                raise ConfigError("config.invalid", f"{path}: nested deeper than {MAX_DEPTH}")
            raw = msgspec.json.decode(data)
        except (OSError, msgspec.DecodeError) as exc:
            raise ConfigError("config.unreadable", f"{path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError("config.invalid", f"{path}: expected a JSON object")
    for env, field in ENVIRONMENT.items():
        if os.environ.get(env):
            raw[field] = os.environ[env]
    if isinstance(raw.get("metrics_port"), str):
        raw["metrics_port"] = _port(str(raw["metrics_port"]))
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError("config.invalid", str(exc)) from None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigError("config.invalid", f"metrics port {text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError("config.invalid", f"metrics port {port} is out of range")
    return port


def save(config: Config, path: str | os.PathLike[str]) -> None:
    Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(config)))
