"""A simulated AWS Nitro enclave emitting real-format, really signed NSM attestation documents.

Documents are untagged COSE_Sign1 ES384 structures with the NSM's payload map, signed through a
test chain shaped like AWS's (:mod:`services.testing.nitro_pki`), so they verify exactly like
hardware documents once the test root is loaded explicitly into the trust store.

The mesh's binding value (``SHA-512(nonce || public key)``, 64 bytes) goes into ``user_data``,
as a real enclave would put it; the document's own ``nonce`` and ``public_key`` fields are filled
when the caller supplies them. Like the real NSM, the simulator's document certificate lives
three hours: when it nears expiry the enclave is re-issued a fresh one (and fresh regional,
zonal and instance CAs under the same root key), so a long ``attestmesh up`` keeps verifying.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from services.mesh import events
from services.testing.nitro_pki import NitroTestPki, TestEnclave, default_pcrs

RENEW_BEFORE = timedelta(minutes=15)
"""Re-issue the document certificate when less than this remains of its three hours."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class SimulatedNitro:
    """One simulated enclave on one simulated EC2 instance; each seed is another instance."""

    family = "nitro"
    simulated = True

    def __init__(
        self,
        *,
        seed: int = 0,
        region: str = "us-east-1",
        image: bytes = b"attestmesh simulated enclave image",
        clock: Callable[[], datetime] = _utcnow,
        pki: NitroTestPki | None = None,
    ) -> None:
        digest = hashlib.sha256(f"attestmesh-nitro-{seed}".encode()).hexdigest()
        self.instance_id = f"i-{digest[:17]}"
        self.enclave_id = f"enc{digest[17:33]}"
        self.region = region
        self.pcrs = default_pcrs(image)
        self.clock = clock
        self._enclave: TestEnclave | None = None
        if pki is not None:
            self._enclave = self._issue(pki)

    def _issue(self, pki: NitroTestPki) -> TestEnclave:
        enclave = pki.enclave(enclave_id=self.enclave_id)
        enclave.pcrs = dict(self.pcrs)
        return enclave

    def enclave(self, now: datetime) -> TestEnclave:
        """The enclave as of ``now``, re-certified when its certificate is (nearly) expired."""
        current = self._enclave
        if current is not None:
            leaf = current.leaf
            if leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc - RENEW_BEFORE:
                return current
        pki = NitroTestPki(now=now, region=self.region, instance_id=self.instance_id)
        self._enclave = self._issue(pki)
        return self._enclave

    def document(
        self, report_data: bytes, *, nonce: bytes | None = None, public_key: bytes | None = None
    ) -> bytes:
        """A signed attestation document with ``user_data = report_data``."""
        now = self.clock()
        return self.enclave(now).document(
            timestamp=now, user_data=report_data, nonce=nonce, public_key=public_key
        )

    def collect(
        self, report_data: bytes, *, nonce: bytes | None = None, public_key: bytes | None = None
    ) -> events.Evidence:
        """Evidence binding ``report_data`` (the EvidenceSource contract)."""
        return events.NitroEvidence(
            document=self.document(report_data, nonce=nonce, public_key=public_key)
        )
