"""The LISTEN backend's supervisor (chat/pubsub.py) on the real test Postgres. The end-to-end
faults (killed, frozen, restarted backends) are in tests/test_faults.py and tests/test_fanout.py."""

from __future__ import annotations

import asyncio

import asyncpg
from broadcaster import Event

from chat.config import libpq_url
from chat.notify import RESYNC
from chat.pubsub import PostgresBackend, listener_settings
from tests.conftest import unique


class FaultyOnce(PostgresBackend):
    """Fault injection: the next heartbeat fails with an error nobody planned for (a bug, a
    driver's surprise), not with one of the connection errors the supervisor expects."""

    faults = 1

    async def _beat(self) -> None:
        if self.faults:
            self.faults -= 1
            raise RuntimeError("an unexpected error in the heartbeat")
        await super()._beat()


async def next_event(backend: PostgresBackend, timeout: float = 15.0) -> Event:
    return await asyncio.wait_for(backend.next_published(), timeout)


async def test_supervisor_survives_an_unexpected_error(database_url: str) -> None:
    """Before: the supervisor task died with the error, so no more heartbeats or reconnects, and
    a lost listener was never noticed. After: it logs, reconnects and carries on."""
    channel = unique("chan").replace("-", "_")
    backend = FaultyOnce(database_url, heartbeat=0.1, timeout=2.0)
    await backend.connect()
    admin = await asyncpg.connect(libpq_url(database_url))
    try:
        await backend.subscribe(channel)
        async with asyncio.timeout(15):
            while backend.faults:
                await asyncio.sleep(0.02)
        assert (await next_event(backend)) == Event(channel, RESYNC)  # it reconnected and resyncs
        assert backend._supervisor is not None and not backend._supervisor.done()
        assert backend.connected

        # Still supervising: a killed LISTEN connection is noticed and replaced.
        name = listener_settings()["application_name"]
        assert await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1", name
        )
        assert (await next_event(backend)) == Event(channel, RESYNC)
        async with asyncio.timeout(15):
            while not backend.connected:
                await asyncio.sleep(0.02)
        await admin.execute("SELECT pg_notify($1, 'after both')", channel)
        assert (await next_event(backend)) == Event(channel, "after both")
    finally:
        await admin.close()
        await backend.disconnect()
