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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from typing import Any

import asyncpg
from broadcaster import BroadcastBackend, Event

from chat import metrics
from chat.config import libpq_url
from chat.notify import RESYNC

log = logging.getLogger("chat.pubsub")


def listener_settings() -> dict[str, str]:
    # LISTEN must outlive idle periods: idle_session_timeout would kill it between heartbeats, so
    # the listener opts out for its own session. The name tells operators which process it serves.
    return {"application_name": f"chat-listener-{os.getpid()}", "idle_session_timeout": "0"}


QUEUE_WARNING = 0.5  # warn when Postgres's NOTIFY queue is this full

_CONNECTION_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


class PostgresBackend(BroadcastBackend):
    def __init__(self, url: str, *, heartbeat: float = 2.0, timeout: float = 3.0) -> None:
        self._dsn = libpq_url(url)
        self._heartbeat = heartbeat
        self._timeout = timeout
        self._channels: set[str] = set()  # what we should be listening to
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()  # asyncpg allows one operation at a time per connection
        self._lost = asyncio.Event()
        self._pool: asyncpg.Pool | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self.queue_usage = 0.0  # pg_notification_queue_usage(), read with every heartbeat

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed() and not self._lost.is_set()

    async def connect(self) -> None:
        # Fails loudly at start-up: a server that cannot reach its database should not start.
        await self._open()
        try:
            self._pool = await asyncpg.create_pool(self._dsn, min_size=0, max_size=2)
        except BaseException:
            await self.disconnect()  # no LISTEN connection left behind by a failed start
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name="pubsub-supervisor")

    async def disconnect(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._conn is not None:
            self._conn.terminate()
        if self._pool is not None:
            await self._pool.close()

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)
        await self._apply(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        await self._apply(channel)

    async def publish(self, channel: str, message: Any) -> None:
        assert self._pool is not None, "connect() first"
        await self._pool.execute("SELECT pg_notify($1, $2)", channel, str(message))

    async def next_published(self) -> Event:
        return await self._events.get()

    # --- internals -----------------------------------------------------------------------------

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        self._events.put_nowait(Event(channel, payload))

    def _on_terminate(self, _conn: Any) -> None:
        self._lost.set()

    async def _apply(self, channel: str) -> None:
        """Make the connection's LISTEN state for `channel` match what is wanted *now*, so
        that racing subscribe/unsubscribe calls end in the right state whatever their order."""
        async with self._lock:
            conn = self._conn
            if conn is None or not self.connected:
                return  # the reconnect LISTENs to every wanted channel
            try:
                if channel in self._channels:
                    await asyncio.wait_for(conn.add_listener(channel, self._on_notify), self._timeout)
                else:
                    await asyncio.wait_for(conn.remove_listener(channel, self._on_notify), self._timeout)
            except _CONNECTION_ERRORS as exc:
                log.warning("LISTEN/UNLISTEN %s failed (%s); reconnecting", channel, exc)
                self._lost.set()

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

    async def _supervise(self) -> None:
        while True:
            try:
                await self._watch()
            except Exception:
                # Whatever went wrong, this task must live on: without it there are no heartbeats
                # and no reconnects, and /readyz stays 503 for good. Start again from a new
                # connection, after a pause so that a repeating fault cannot spin. (Cancellation,
                # at shutdown, is not an Exception and still ends the task.)
                log.exception("listener supervisor: unexpected error; reconnecting")
                self._lost.set()
                await asyncio.sleep(self._heartbeat)

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), self._heartbeat)
            try:
                if not self._lost.is_set():
                    await self._beat()
                    continue
            except _CONNECTION_ERRORS as exc:
                log.warning("listener heartbeat failed: %r", exc)
            await self._reconnect()

    async def _reconnect(self) -> None:
        self._lost.set()
        if self._conn is not None:
            self._conn.terminate()  # never wait on a connection that may be half-open
        delay = 0.1
        while True:
            try:
                await self._open()
                break
            except _CONNECTION_ERRORS as exc:
                log.warning("listener reconnect failed: %r; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
        metrics.LISTENER_RECONNECTS.inc()
        log.info("listener reconnected; resyncing %d channel(s)", len(self._channels))
        for channel in sorted(self._channels):
            self._events.put_nowait(Event(channel, RESYNC))
