"""A hardened Postgres backend for broadcaster.

broadcaster's stock Postgres backend shares one connection between publish and LISTEN (concurrent
publishes fail), and hangs silently when that connection drops. This one:

- keeps one LISTEN connection per process, used by one operation at a time, and publishes
  through a separate small pool;
- checks the connection with a heartbeat query under a timeout, so a dropped or half-open
  connection (killed backend, restarted or frozen server, idle_session_timeout) is noticed
  within seconds, then reconnects with backoff and LISTENs again on every channel;
- after every reconnect emits a RESYNC event on each channel: NOTIFY is fire-and-forget, so
  subscribers must read what they missed from the table.

The supervision (heartbeat, reconnect, RESYNC) is chat/listener.py's, shared with chat/redisbus.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import asyncpg
from broadcaster import Event

from chat import metrics
from chat.config import libpq_url
from chat.listener import Listener

log = logging.getLogger("chat.pubsub")


def listener_settings() -> dict[str, str]:
    # LISTEN must outlive idle periods: idle_session_timeout would kill it between heartbeats, so
    # the listener opts out for its own session. The name tells operators which process it serves.
    return {"application_name": f"chat-listener-{os.getpid()}", "idle_session_timeout": "0"}


QUEUE_WARNING = 0.5  # warn when Postgres's NOTIFY queue is this full

_CONNECTION_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


class PostgresBackend(Listener):
    name = "listener"
    errors = _CONNECTION_ERRORS
    log = log

    def __init__(self, url: str, *, heartbeat: float = 2.0, timeout: float = 3.0) -> None:
        super().__init__(heartbeat=heartbeat, timeout=timeout)
        self._dsn = libpq_url(url)
        self._conn: asyncpg.Connection | None = None  # used by one operation at a time, under _lock
        self._pool: asyncpg.Pool | None = None
        self.queue_usage = 0.0  # pg_notification_queue_usage(), read with every heartbeat

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed() and not self._lost.is_set()

    async def publish(self, channel: str, message: Any) -> None:
        assert self._pool is not None, "connect() first"
        await self._pool.execute("SELECT pg_notify($1, $2)", channel, str(message))

    # --- internals -----------------------------------------------------------------------------

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        self._emit(Event(channel, payload))

    def _on_terminate(self, _conn: Any) -> None:
        self._lost.set()

    async def _listen(self, channel: str) -> None:
        assert self._conn is not None
        await self._conn.add_listener(channel, self._on_notify)

    async def _unlisten(self, channel: str) -> None:
        assert self._conn is not None
        await self._conn.remove_listener(channel, self._on_notify)

    async def _open_publisher(self) -> None:
        self._pool = await asyncpg.create_pool(self._dsn, min_size=0, max_size=2)

    async def _close_publisher(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def _open(self) -> None:
        async with self._lock:
            conn = await asyncio.wait_for(
                asyncpg.connect(self._dsn, server_settings=listener_settings()), self._timeout
            )
            try:
                conn.add_termination_listener(self._on_terminate)
                for channel in sorted(self._channels):
                    await asyncio.wait_for(conn.add_listener(channel, self._on_notify), self._timeout)
            except BaseException:
                conn.terminate()
                raise
            self._conn = conn
            self._lost.clear()

    async def _close(self) -> None:
        if self._conn is not None:
            self._conn.terminate()  # never wait on a connection that may be half-open

    async def _beat(self) -> None:
        async with self._lock:
            assert self._conn is not None
            usage = await asyncio.wait_for(self._conn.fetchval("SELECT pg_notification_queue_usage()"), self._timeout)
            self._report_queue(float(usage))

    def _report_queue(self, usage: float) -> None:
        """A listener somewhere (any process on this Postgres) that stopped reading pins the
        shared NOTIFY queue; when it is full, every NOTIFY fails and so does every send."""
        if usage >= QUEUE_WARNING and self.queue_usage < QUEUE_WARNING:
            log.warning(
                "Postgres's NOTIFY queue is %.0f%% full: a listening session has stopped reading "
                "(idle in transaction?); sends will fail when it is full",
                usage * 100,
            )
        elif usage < QUEUE_WARNING <= self.queue_usage:
            log.info("Postgres's NOTIFY queue is back to %.0f%%", usage * 100)
        self.queue_usage = usage
        metrics.NOTIFY_QUEUE.set(usage)
