"""The last good operator-signed document per KV key, and the rules for replacing it.

A KV entry changes; the policy service offers the new bytes here. Only a document that
verifies (see :mod:`services.policy.documents`), has valid content, and is *newer* than the
one in force may replace it. Everything else is refused with a logged reason and the document
in force stays: an unsigned or foreign-signed entry, a tampered one, an older signed version
put back (rollback), a different document under the same version, or the key's deletion (a
deletion is unsigned, and dropping reference values would loosen the policy).

"Newer" is measured against the highest version ever verified for the key, not only the one
in force: when the operator's newest signed document cannot be used (it does not compile),
the one before stays in force, and a signed version from between the two, put back by a
writer, must not slip in behind it.
"""

from __future__ import annotations

from collections.abc import Callable

from services.mesh import telemetry
from services.mesh.errors import PolicyError
from services.mesh.keys import TrustedKeys
from services.policy import documents
from services.policy.documents import Document

log = telemetry.logger("policy")


class Ledger:
    """Documents in force for one bucket; ``kind`` prefixes refusal reasons."""

    def __init__(
        self,
        bucket: str,
        kind: str,
        trusted: TrustedKeys,
        *,
        validate: Callable[[bytes], object],
    ) -> None:
        self.bucket = bucket
        self.kind = kind
        self.trusted = trusted
        self.validate = validate
        self._good: dict[str, Document] = {}
        self._highest: dict[str, tuple[int, str]] = {}
        """Per key, the version and digest of the newest document that ever verified."""
        self.refusals: dict[str, str] = {}
        """Per key, the reason its current KV value is not in force (for status and tests)."""

    def keys(self) -> set[str]:
        return set(self._good)

    def in_force(self, key: str) -> Document | None:
        return self._good.get(key)

    def offer(self, key: str, raw: bytes | None) -> Document | None:
        """The document to use for ``key`` given its KV value ``raw`` (``None``: absent).

        Returns the new document if it may replace the one in force (the caller commits it
        once it has compiled), else the one in force (or ``None`` if there never was one).
        """
        current = self._good.get(key)
        if raw is None:
            if current is not None:
                self._refuse(key, f"{self.kind}.deleted", "an unsigned deletion", current)
            return current
        try:
            document = documents.open_signed(
                raw, self.trusted, bucket=self.bucket, key=key, kind=self.kind
            )
            self.validate(document.payload)
        except PolicyError as exc:
            reason = exc.reason if exc.reason.startswith(self.kind) else f"{self.kind}.invalid"
            self._refuse(key, reason, exc.detail, current)
            return current
        if current is not None and document.digest == current.digest:
            self.refusals.pop(key, None)
            return current
        floor = max(
            (current.version, current.digest) if current is not None else (0, ""),
            self._highest.get(key, (0, "")),
        )
        if floor[1] and (
            document.version < floor[0]
            or (document.version == floor[0] and document.digest != floor[1])
        ):
            detail = f"version {document.version} does not follow {floor[0]}"
            self._refuse(key, f"{self.kind}.rollback", detail, current)
            return current
        self._highest[key] = (document.version, document.digest)
        return document

    def prime(self, key: str, history: list[bytes]) -> None:
        """Take the newest valid document among ``history`` (the key's earlier KV values) as
        in force, so a service that starts after an older signed document was put back, or
        after the key was deleted, still knows the newer one. Used once, at start."""
        best: Document | None = self._good.get(key)
        for raw in history:
            try:
                document = documents.open_signed(
                    raw, self.trusted, bucket=self.bucket, key=key, kind=self.kind
                )
                self.validate(document.payload)
            except PolicyError:
                continue
            if best is None or document.version > best.version:
                best = document
        if best is not None:
            self._good[key] = best
            self._highest[key] = max(self._highest.get(key, (0, "")), (best.version, best.digest))

    def commit(self, document: Document) -> None:
        current = self._good.get(document.key)
        if current is None or current.digest != document.digest:
            self._good[document.key] = document
            self.refusals.pop(document.key, None)

    def _refuse(self, key: str, reason: str, detail: str, current: Document | None) -> None:
        self.refusals[key] = reason
        log.error(
            "document.refused",
            reason=reason,
            bucket=self.bucket,
            key=key,
            detail=detail[:300],
            in_force=current.version if current else None,
        )
