"""A hardened Redis backend for broadcaster, for CHAT_FANOUT_URL=redis://...

broadcaster's stock Redis backend lets its listener task die silently when the connection
drops, and redis-py's PubSub quietly reconnects and resubscribes on its own, so messages
published in between are lost without anyone noticing. This one, like chat.pubsub's Postgres
backend:

- keeps one subscriber connection per process, and publishes through a small bounded pool;
- checks the whole path with a heartbeat: it publishes to a channel of its own and must hear
  it back on the subscriber within the timeout (a dead, restarted or frozen Redis is noticed
  within seconds);
- on any failure (or any reconnect it did not make itself) drops both connections, reconnects
  with backoff, subscribes again, and emits RESYNC on every channel: Redis pub/sub is
  fire-and-forget, so subscribers read what they missed from the table;
- remembers the channels whose publish failed (bounded) and publishes RESYNC to them once
  Redis answers again, so other processes read those messages without waiting for the next one.

What travels on it (batches of messages, events, RESYNC) is chat/notify.py's wire format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from typing import Any

from broadcaster import Event
from redis import asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from chat.listener import Listener
from chat.notify import RESYNC

log = logging.getLogger("chat.redisbus")

MAX_OWED_CHANNELS = 10_000  # channels whose publish failed, to RESYNC when Redis is back
PUBLISH_CONNECTIONS = 4

_ERRORS = (OSError, RedisError, TimeoutError, ConnectionError)


def _client(url: str, *, timeout: float, pool: BlockingConnectionPool | None = None) -> aioredis.Redis:
    # No retries inside redis-py: a failure must surface here, so that we resync after it.
    options: dict[str, Any] = {"retry": Retry(NoBackoff(), 0), "socket_connect_timeout": timeout}
    if pool is not None:
        return aioredis.Redis(connection_pool=pool, **options)
    return aioredis.Redis.from_url(url, **options)


class RedisBackend(Listener):
    name = "redis"
    errors = _ERRORS
    log = log

    def __init__(self, url: str, *, heartbeat: float = 2.0, timeout: float = 3.0) -> None:
        super().__init__(heartbeat=heartbeat, timeout=timeout)
        self._url = url
        self._echo = asyncio.Event()
        # Our own heartbeat channel: hearing it back proves publish -> Redis -> subscriber works.
        self._beat_channel = f"chat:heartbeat:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._sub_client: aioredis.Redis | None = None
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._owed: set[str] = set()
        self._owe_all = False  # more failed channels than we keep: RESYNC every channel in use
        pool = BlockingConnectionPool.from_url(
            url, max_connections=PUBLISH_CONNECTIONS, timeout=timeout, socket_connect_timeout=timeout
        )
        self._publisher = _client(url, timeout=timeout, pool=pool)
        self.queue_usage = 0.0  # /readyz reports Postgres's NOTIFY queue; Redis has none
        self.connected_at = 0.0

    @property
    def connected(self) -> bool:
        return self._pubsub is not None and not self._lost.is_set()

    async def publish(self, channel: str, message: Any) -> None:
        if self._lost.is_set():
            # Known down: fail at once rather than hold the writer up; woken once Redis is back.
            self._owe(channel)
            raise ConnectionError("redis is unreachable; reconnecting")
        try:
            await asyncio.wait_for(self._publisher.publish(channel, str(message)), self._timeout)
        except (*_ERRORS, asyncio.CancelledError):  # cancelled: the writer stopped waiting for it
            self._owe(channel)
            raise

    async def channels_in_use(self) -> set[str]:
        """Room channels with a subscriber in some process (PUBSUB CHANNELS)."""
        channels = await asyncio.wait_for(self._publisher.pubsub_channels("room_*"), self._timeout)
        return {c.decode() if isinstance(c, bytes) else str(c) for c in channels}

    def owe_all(self) -> None:
        """RESYNC every room in use as soon as Redis answers."""
        self._owe_all = True

    # --- internals -----------------------------------------------------------------------------

    def _owe(self, channel: str) -> None:
        if len(self._owed) >= MAX_OWED_CHANNELS:
            self._owe_all = True
        else:
            self._owed.add(channel)

    async def _settle_debts(self) -> None:
        """RESYNC the channels whose publish failed, now that Redis answers."""
        if self._owe_all:
            self._owed |= await self.channels_in_use()
            self._owe_all = False
        if not self._owed:
            return
        log.info("redis is back: waking %d room(s) whose publish failed", len(self._owed))
        for channel in sorted(self._owed):
            await asyncio.wait_for(self._publisher.publish(channel, RESYNC), self._timeout)
            self._owed.discard(channel)

    async def _listen(self, channel: str) -> None:
        assert self._pubsub is not None
        await self._pubsub.subscribe(channel)

    async def _unlisten(self, channel: str) -> None:
        assert self._pubsub is not None
        await self._pubsub.unsubscribe(channel)

    async def _close_publisher(self) -> None:
        with contextlib.suppress(*_ERRORS):
            await self._publisher.aclose()

    async def _open(self) -> None:
        async with self._lock:
            client = _client(self._url, timeout=self._timeout)
            pubsub = client.pubsub()
            try:
                await asyncio.wait_for(pubsub.subscribe(self._beat_channel, *sorted(self._channels)), self._timeout)
                assert pubsub.connection is not None
                # redis-py reconnects a dropped pubsub connection by itself and resubscribes:
                # a reconnect we did not make means messages may have been missed.
                pubsub.connection.register_connect_callback(self._reconnected_behind_our_back)
            except BaseException:
                with contextlib.suppress(*_ERRORS):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    await client.aclose()
                raise
            self._sub_client, self._pubsub = client, pubsub
            self._lost.clear()
            self._reader = asyncio.create_task(self._read(pubsub), name="redis-reader")
            self.connected_at = time.monotonic()

    async def _reconnected_behind_our_back(self, _connection: Any) -> None:
        self._lost.set()

    async def _close(self) -> None:
        reader, pubsub, client = self._reader, self._pubsub, self._sub_client
        self._reader = self._pubsub = self._sub_client = None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, *_ERRORS):
                await reader
        # Never wait on a connection that may be half-open: drop the socket.
        if pubsub is not None and pubsub.connection is not None:
            with contextlib.suppress(*_ERRORS):
                await asyncio.wait_for(pubsub.connection.disconnect(nowait=True), self._timeout)
        if pubsub is not None:
            with contextlib.suppress(*_ERRORS):
                await asyncio.wait_for(pubsub.aclose(), self._timeout)  # type: ignore[no-untyped-call]
        if client is not None:
            with contextlib.suppress(*_ERRORS):
                await asyncio.wait_for(client.aclose(), self._timeout)

    async def _read(self, pubsub: PubSub) -> None:
        try:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                if message is None or message.get("type") != "message":
                    continue
                channel = message["channel"].decode()
                if channel == self._beat_channel:
                    self._echo.set()
                    continue
                self._emit(Event(channel, message["data"].decode()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of the connection, whatever redis-py raises
            log.warning("redis subscriber failed: %r", exc)
            self._lost.set()

    async def _beat(self) -> None:
        self._echo.clear()
        await asyncio.wait_for(self._publisher.publish(self._beat_channel, "beat"), self._timeout)
        await asyncio.wait_for(self._echo.wait(), self._timeout)
        await self._settle_debts()
