"""Reference values that cannot be listed are an error, never "no reference values".

Without reference values the default policy allows any affirming verdict, so a listing error
taken for an empty bucket would loosen every decision for that family. What the policy does
with the error (deny with ``policy.refvalues_unavailable``) is tested in
``test_signed_policy_flow``; this pins down that the KV seam hands it an error to act on.
"""

from __future__ import annotations

import pytest

from services.mesh import subjects
from services.mesh.bus import Bus
from services.mesh.errors import BusError, Unavailable
from services.mesh.keys import SigningKey
from services.mesh.kv import LIST_FAILED
from services.mesh.natskv import NatsKeyValue
from services.mesh.server import NatsServer
from services.policy import refvalues


async def _stored(bus: Bus) -> NatsKeyValue:
    kv = NatsKeyValue(await bus.key_value(subjects.BUCKET_REFVALUES))
    operator = SigningKey.generate("operator")
    await refvalues.store(kv, "snp", {"measurement": ["aa" * 48]}, operator=operator)
    assert set(await refvalues.read_all(kv)) == {"snp"}
    return kv


async def test_reading_a_vanished_bucket_raises(bus: Bus) -> None:
    kv = await _stored(bus)
    await bus.js.delete_stream(f"KV_{subjects.BUCKET_REFVALUES}")
    with pytest.raises(BusError) as caught:
        await refvalues.read_all(kv)
    assert caught.value.reason == LIST_FAILED
    assert not isinstance(caught.value, Unavailable)  # gone, not failing over


async def test_reading_over_a_closed_connection_raises(nats_server: NatsServer) -> None:
    bus = await Bus.connect(nats_server.url, "closing")
    await bus.setup(nonce_ttl=60.0)
    kv = await _stored(bus)
    await bus.close()
    with pytest.raises(BusError) as caught:
        await refvalues.read_all(kv)
    assert caught.value.reason == LIST_FAILED
    assert isinstance(caught.value, Unavailable)  # worth waiting out
