"""Operator actions on node identities: ``attestmesh node reset NAME``.

A pin is released only deliberately (a node rebuilt on new hardware), and every release is
written to the broker's sealed, hash-chained audit log *before* the pin is removed, so a
reset can never happen unrecorded. The record names the node and the SHA-256 of the identity
it was pinned to, never anything secret.
"""

from __future__ import annotations

import hashlib

from services.broker.audit import AuditLog, Outcome
from services.broker.sealing import SealingKeySource
from services.broker.store import load_keyring
from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.keys import TrustedKeys
from services.mesh.natskv import NatsKeyValue
from services.policy.pins import Pin, PinStore

PIN_RESET = "node.pin_reset"
AUDIT_RESOURCE = "node-pin"


async def reset_node(
    bus: Bus, node: str, sealing: SealingKeySource, trusted: TrustedKeys
) -> Pin | None:
    """Audit, then remove ``node``'s pin; return the pin removed (``None``: it had none).

    ``trusted`` must hold the broker's checkpoint key: appending continues the chain from the
    broker's last signed checkpoint, which is refused unless it verifies."""
    subjects.token(node)
    pins = PinStore(NatsKeyValue(await bus.key_value(subjects.BUCKET_PINS)))
    found = await pins.get(node)
    if found is None:
        return None
    pin, _revision = found
    state = NatsKeyValue(await bus.key_value(subjects.BUCKET_BROKER))
    audit = AuditLog(state, await load_keyring(state, sealing), trusted=trusted)
    await audit.append(
        node=node,
        resource=AUDIT_RESOURCE,
        decision_id="none",
        verdict_digest=hashlib.sha256(pin.hwid.encode()).hexdigest(),
        outcome=Outcome.PIN_RESET,
        reason=PIN_RESET,
    )
    return await pins.reset(node)
