"""What an evidence source is: something that turns 64 bytes of REPORT_DATA into evidence."""

from __future__ import annotations

from typing import Protocol

from services.mesh import events


class EvidenceSource(Protocol):
    """A TEE (real device or simulator) able to produce evidence binding ``report_data``."""

    family: str
    simulated: bool

    def collect(self, report_data: bytes) -> events.Evidence:
        """Produce evidence whose signed report binds ``report_data`` (64 bytes)."""
        ...
