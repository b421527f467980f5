"""The relay: with Redis fan-out, brings rows that other SQL clients insert (psql, scripts, other
services) to Redis, so that they are delivered live like the app's own.

The insert trigger sends such rows to the `chat_relay` NOTIFY channel (migration 0007). Every
server process runs a relay, but only the one holding a session-level advisory lock on its own
connection LISTENs and forwards; the others retry the lock every `retry` seconds, so when the
holder dies (kill -9, a lost connection) Postgres releases its lock and another process takes
over within about that long. Whenever a process starts holding, notifications sent while no one
held may have been missed: it wakes (RESYNC) every room that has subscribers, which then read
the table by seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from typing import Any

import asyncpg

from chat import metrics, notify
from chat.config import libpq_url
from chat.notify import RELAY_CHANNEL, RESYNC
from chat.redisbus import RedisBackend

log = logging.getLogger("chat.relay")

LOCK_KEY = 0x63686174_72656C61  # "chatrela": one relay per database
QUEUE_ITEMS = 10_000  # notifications waiting for Redis; past that, wake every room instead

_CONNECTION_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


class Relay:
    def __init__(
        self, database_url: str, backend: RedisBackend, *, heartbeat: float, timeout: float, retry: float = 0.5
    ) -> None:
        self._dsn = libpq_url(database_url)
        self._backend = backend
        self._heartbeat = heartbeat
        self._timeout = timeout
        self._retry = retry
        self._queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_ITEMS)
        self._overflowed = False
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.holding = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = self._retry
        while True:
            try:
                await self._session()
                delay = self._retry
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection lost, or anything else: try again
                log.warning("relay: %r; retrying", exc)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)

    async def _session(self) -> None:
        settings = {"application_name": f"chat-relay-{os.getpid()}", "idle_session_timeout": "0"}
        conn = await asyncio.wait_for(asyncpg.connect(self._dsn, server_settings=settings), self._timeout)
        forwarder: asyncio.Task[None] | None = None
        try:
            # Polling: Postgres has no "wake me when this advisory lock is free" but a blocking
            # pg_advisory_lock, which a half-open connection would hold up for good.
            lock = "SELECT pg_try_advisory_lock($1)"
            while True:
                if await asyncio.wait_for(conn.fetchval(lock, LOCK_KEY), self._timeout):
                    break
                await asyncio.sleep(self._retry)
            self._lost.clear()
            conn.add_termination_listener(lambda _conn: self._lost.set())
            await asyncio.wait_for(conn.add_listener(RELAY_CHANNEL, self._on_notify), self._timeout)
            self.holding = True
            log.info("relay: this process now relays other SQL clients' rows to Redis")
            await self._wake_all()  # what was inserted while no one relayed
            forwarder = asyncio.create_task(self._forward(), name="relay-forwarder")
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), self._heartbeat)
                if self._lost.is_set():
                    raise ConnectionError("the relay's connection was lost")
                await asyncio.wait_for(conn.fetchval("SELECT 1"), self._timeout)
        finally:
            self.holding = False
            if forwarder is not None:
                forwarder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await forwarder
            conn.terminate()  # releases the lock; never wait on a half-open connection

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            self._overflowed = True  # bounded: the forwarder wakes every room instead

    async def _forward(self) -> None:
        while True:
            payload = await self._queue.get()
            if self._overflowed:
                self._overflowed = False
                while not self._queue.empty():
                    self._queue.get_nowait()
                await self._wake_all()
                continue
            target = notify.relayed(payload)
            if target is None:
                log.warning("relay: unreadable notification %r", payload[:200])
                continue
            try:
                await self._backend.publish(*target)
                metrics.RELAYED.inc()
            except Exception as exc:  # the backend wakes the room when Redis is back
                log.warning("relay: could not publish to %s: %r", target[0], exc)

    async def _wake_all(self) -> None:
        """RESYNC every room channel that has a subscriber somewhere."""
        try:
            channels = await self._backend.channels_in_use()
        except Exception as exc:
            log.warning("relay: could not list rooms to wake: %r", exc)
            self._backend.owe_all()
            return
        for channel in channels:
            with contextlib.suppress(Exception):
                await self._backend.publish(channel, RESYNC)
