"""Which failures are a failover to wait out and which a refusal (``services/mesh/outage.py``):
the consumers, the KV and the policy's loader all sort by this one table."""

from __future__ import annotations

import nats.errors
import nats.js.errors
import pytest

from services.mesh import outage
from services.mesh.errors import BusError, Unavailable


@pytest.mark.parametrize(
    ("code", "err_code", "expected"),
    [
        (503, 10008, True),  # JetStream temporarily unavailable: an election
        (503, 10163, True),  # a per-subject check not ready yet
        (503, None, True),  # a bare 503: no responders
        (503, 0, True),
        (503, 10023, False),  # insufficient resources: a full store does not pass
        (503, 10076, False),  # JetStream not enabled
        (503, 10077, False),  # a store failure
        (400, 10071, False),
        (404, 10059, False),
    ],
)
def test_only_a_503_that_passes_with_time_is_an_outage(
    code: int, err_code: int | None, expected: bool
) -> None:
    assert outage.outage_answer(code, err_code) is expected
    error = nats.js.errors.APIError(code=code, err_code=err_code)
    assert outage.unanswered(error) is expected


@pytest.mark.parametrize(
    "exc",
    [
        nats.errors.TimeoutError(),
        nats.errors.NoRespondersError(),
        nats.errors.ConnectionClosedError(),
        TimeoutError(),
        Unavailable("kv.unavailable", "no leader"),
        nats.js.errors.ServiceUnavailableError(code=503, err_code=10008),
    ],
)
def test_nobody_answering_is_an_outage(exc: Exception) -> None:
    assert outage.unanswered(exc)
    mapped = outage.mapped(exc, unavailable="kv.unavailable", refused="kv.api_error")
    assert isinstance(mapped, Unavailable) and mapped.reason == "kv.unavailable"


@pytest.mark.parametrize(
    "exc",
    [
        BusError("kv.api_error", "10059"),
        nats.js.errors.NotFoundError(code=404, err_code=10059),
        nats.js.errors.ServiceUnavailableError(code=503, err_code=10023),
        nats.errors.BadSubjectError(),
        ValueError("not a bus error at all"),
    ],
)
def test_a_refusal_is_not(exc: Exception) -> None:
    assert not outage.unanswered(exc)
    mapped = outage.mapped(exc, unavailable="kv.unavailable", refused="kv.api_error")
    assert not isinstance(mapped, Unavailable) and mapped.reason == "kv.api_error"
