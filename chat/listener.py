"""The supervised subscriber shared by the fan-out backends (chat/pubsub.py, chat/redisbus.py).

Both backends hold one subscriber connection per process and must notice when it silently stops
delivering. This base class owns what they have in common:

- the wanted channel set, and (un)subscribing so that racing calls end in the wanted state;
- a supervisor task that runs a heartbeat under a timeout, and on any failure drops the
  connection, reconnects with backoff and subscribes again to every wanted channel;
- after every reconnect, a RESYNC event on each channel: the transports are fire-and-forget, so
  subscribers must read what they missed from the table.

A backend supplies the connection itself: `_open` (connect and subscribe to every wanted channel,
then clear `_lost`), `_beat`, `_close`, `_listen`/`_unlisten` and its publisher's lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from abc import abstractmethod
from collections.abc import Callable

from broadcaster import BroadcastBackend, Event

from chat import metrics
from chat.notify import RESYNC


class Listener(BroadcastBackend):
    name = "listener"  # in log lines: "<name> heartbeat failed", "<name> reconnected"
    errors: tuple[type[BaseException], ...] = (OSError, TimeoutError)  # a connection failing, expected
    log = logging.getLogger("chat.listener")

    def __init__(self, *, heartbeat: float, timeout: float) -> None:
        self._heartbeat = heartbeat
        self._timeout = timeout
        self._channels: set[str] = set()  # what we should be subscribed to
        # Where events go: chat/broadcast.py's `deliver`, called as each arrives. Without one (a
        # backend on its own, in tests) they wait in `_events` for `next_published`.
        self.sink: Callable[[Event], None] | None = None
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._lock = asyncio.Lock()  # one (un)subscribe or reconnect at a time on the connection
        self._lost = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None

    @property
    @abstractmethod
    def connected(self) -> bool: ...

    # --- what a backend supplies ---------------------------------------------------------------

    @abstractmethod
    async def _open(self) -> None:
        """Connect and subscribe to every wanted channel, then clear `_lost`; raise on failure."""

    @abstractmethod
    async def _beat(self) -> None:
        """Prove the connection still works, within `_timeout`; raise if it does not."""

    @abstractmethod
    async def _close(self) -> None:
        """Drop the subscriber connection without waiting on it (it may be half-open)."""

    @abstractmethod
    async def _listen(self, channel: str) -> None: ...

    @abstractmethod
    async def _unlisten(self, channel: str) -> None: ...

    async def _open_publisher(self) -> None:
        """Called once at start-up, after `_open`."""

    async def _close_publisher(self) -> None:
        """Called once at shutdown, after `_close`."""

    # --- BroadcastBackend ----------------------------------------------------------------------

    async def connect(self) -> None:
        # Fails loudly at start-up: a server that cannot reach its fan-out should not start.
        await self._open()
        try:
            await self._open_publisher()
        except BaseException:
            await self.disconnect()  # no subscriber connection left behind by a failed start
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name=f"{self.name}-supervisor")

    async def disconnect(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._close()
        await self._close_publisher()

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)
        await self._apply(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        await self._apply(channel)

    async def next_published(self) -> Event:
        return await self._events.get()

    def _emit(self, event: Event) -> None:
        sink = self.sink
        if sink is not None:
            sink(event)
        else:
            self._events.put_nowait(event)

    # --- supervision ---------------------------------------------------------------------------

    async def _apply(self, channel: str) -> None:
        """Make the subscription for `channel` match what is wanted *now*, so that racing
        subscribe/unsubscribe calls end in the right state whatever their order."""
        async with self._lock:
            if not self.connected:
                return  # the reconnect subscribes to every wanted channel
            wanted = channel in self._channels
            try:
                await asyncio.wait_for(self._listen(channel) if wanted else self._unlisten(channel), self._timeout)
            except self.errors as exc:
                verb = "subscribe" if wanted else "unsubscribe"
                self.log.warning("%s %s failed (%r); reconnecting", verb, channel, exc)
                self._lost.set()

    async def _supervise(self) -> None:
        while True:
            try:
                await self._watch()
            except Exception:
                # Whatever went wrong, this task must live on: without it there are no heartbeats
                # and no reconnects, and /readyz stays 503 for good. Start again from a new
                # connection, after a pause so that a repeating fault cannot spin. (Cancellation,
                # at shutdown, is not an Exception and still ends the task.)
                self.log.exception("%s supervisor: unexpected error; reconnecting", self.name)
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
            except self.errors as exc:
                self.log.warning("%s heartbeat failed: %r", self.name, exc)
            except Exception as exc:  # a bug or a driver's surprise: still a connection to replace
                self.log.exception("%s heartbeat failed unexpectedly: %r", self.name, exc)
            await self._reconnect()

    async def _reconnect(self) -> None:
        self._lost.set()
        await self._close()
        delay = 0.1
        while True:
            try:
                await self._open()
                break
            except Exception as exc:
                self.log.warning("%s reconnect failed: %r; retrying in %.1fs", self.name, exc, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
        metrics.LISTENER_RECONNECTS.inc()
        self.log.info("%s reconnected; resyncing %d channel(s)", self.name, len(self._channels))
        for channel in sorted(self._channels):
            self._emit(Event(channel, RESYNC))
