"""Access to the shared real-hardware test vectors, which live outside this repository.

The vectors are found at ``$ATTESTMESH_VECTORS`` or at ``../shared/vectors`` next to the
repository; they are read in place and never copied into the project. Each vector directory holds
``vector.json`` (expectations and the verification time ``at``), the evidence file and an
optional ``collateral/`` folder. Evidence and collateral are checked against the SHA-256 recorded
in ``vector.json``, so a silently altered vector fails loudly instead of testing the wrong thing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from services.verifier.families.base import VerifyOptions
from services.verifier.trust import TrustStore

_REPO = Path(__file__).resolve().parents[2]


class VectorError(Exception):
    """A vector directory does not match its ``vector.json``."""


def vectors_root() -> Path | None:
    """``$ATTESTMESH_VECTORS``, else ``<repo>/../shared/vectors``; ``None`` if neither exists."""
    explicit = os.environ.get("ATTESTMESH_VECTORS")
    candidate = Path(explicit) if explicit else _REPO.parent / "shared" / "vectors"
    return candidate if candidate.is_dir() else None


def roots_dir() -> Path | None:
    """The vectors' trust directory (``roots/``), laid out as the trust store expects."""
    root = vectors_root()
    if root is None or not (root / "roots").is_dir():
        return None
    return root / "roots"


@dataclass(frozen=True)
class Vector:
    """One vector: its files' bytes, its expectations and the time at which to verify it."""

    id: str
    dir: Path
    meta: dict[str, Any]
    evidence: bytes
    collateral: dict[str, bytes] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return str(self.meta["family"])

    @property
    def kind(self) -> str:
        return str(self.meta["kind"])

    @property
    def at(self) -> datetime:
        """The verification time (timezone-aware) at which every certificate is valid."""
        value = datetime.fromisoformat(self.meta["at"])
        if value.tzinfo is None:
            raise VectorError(f"{self.id}: 'at' has no timezone")
        return value

    @property
    def expect(self) -> dict[str, Any]:
        expect: dict[str, Any] = self.meta["expect"]
        return expect


def load_vector(directory: Path) -> Vector:
    """Load one vector directory, checking file hashes against ``vector.json``."""
    meta = json.loads((directory / "vector.json").read_text())
    evidence_meta = meta["evidence"]
    evidence = (directory / evidence_meta["file"]).read_bytes()
    _check_digest(meta["id"], evidence_meta["file"], evidence, evidence_meta["sha256"])
    collateral: dict[str, bytes] = {}
    for name, info in (meta.get("collateral") or {}).items():
        data = (directory / "collateral" / name).read_bytes()
        _check_digest(meta["id"], name, data, info["sha256"])
        collateral[name] = data
    return Vector(id=meta["id"], dir=directory, meta=meta, evidence=evidence, collateral=collateral)


def iter_vectors(
    family: str, *, root: Path | None = None, kinds: tuple[str, ...] = ("positive", "negative")
) -> Iterator[Vector]:
    """Every vector of ``family`` (positive ones, then ``negative/``), sorted by id."""
    base = root if root is not None else vectors_root()
    if base is None:
        return
    folders = {"positive": base / family, "negative": base / "negative" / family}
    for kind in kinds:
        folder = folders[kind]
        if folder.is_dir():
            for directory in sorted(p for p in folder.iterdir() if (p / "vector.json").is_file()):
                yield load_vector(directory)


def _check_digest(vector_id: str, name: str, data: bytes, expected: str) -> None:
    if hashlib.sha256(data).hexdigest() != expected:
        raise VectorError(f"{vector_id}: {name} does not match the sha256 in vector.json")


def pick(vectors: Mapping[str, Vector], vector_id: str) -> Vector:
    """The vector ``vector_id``; a pinned vector missing from the shared set is an error, not a
    reason to skip (the set changed under the tests)."""
    if vector_id not in vectors:
        raise VectorError(f"vector {vector_id} is missing from the shared vectors")
    return vectors[vector_id]


def verify_options(vector: Vector, trust: TrustStore, **changes: Any) -> VerifyOptions:
    """Options that verify ``vector`` as recorded: at its ``at`` time, with its collateral."""
    values: dict[str, Any] = {"now": vector.at, "trust": trust, "collateral": vector.collateral}
    values.update(changes)
    return VerifyOptions(**values)
