"""A real broker service on its own thread and event loop, for tests of synchronous commands.

Operator commands run ``asyncio.run`` themselves, so the broker they talk to cannot share
their loop; a thread gives it one of its own, as a separate process would, without the
start-up cost of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from services import app
from services.mesh import authconf, identities
from services.mesh.config import Config

START_TIMEOUT_S = 20.0


@contextmanager
def running_broker(config: Config) -> Iterator[None]:
    """``attestmesh broker`` for ``config`` (signed in as the broker of its data dir) until
    the block ends; its failure to start or run is raised here."""
    config = authconf.signed_in_as(config, identities.BROKER)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    failure: list[BaseException] = []
    started = threading.Event()

    async def main() -> None:
        started.set()
        await app.broker(config, stop)

    def target() -> None:
        try:
            loop.run_until_complete(main())
        except Exception as exc:  # reported to the test below  # noqa: BLE001
            failure.append(exc)
        finally:
            started.set()
            loop.close()

    thread = threading.Thread(target=target, name="broker", daemon=True)
    thread.start()
    started.wait(START_TIMEOUT_S)
    try:
        yield
    finally:
        with contextlib.suppress(RuntimeError):  # the loop already ended
            loop.call_soon_threadsafe(stop.set)
        thread.join(START_TIMEOUT_S)
    if failure:
        raise failure[0]
