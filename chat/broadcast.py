"""broadcaster's Broadcast, delivering each event straight from the backend to its subscribers.

The stock class passes every event through two queues and two tasks: the backend's queue, read by
a listener task, then each subscriber's queue, read by the subscriber's task. Here the backend
(chat/listener.py) hands each event to `deliver` as it arrives (in arrival order, in the
callback that received it), and a subscriber may take it there and then (`Subscriber.direct`)
when it has nothing queued: a room feed dispatches an in-order message without any task waking.
What it does not take is queued, in order, for its task.

A subscriber's queue is bounded (`QUEUE_MAX` events and `QUEUE_MAX_BYTES` of payload): while a
feed is busy (reading the table, waiting for a gap to fill) the events wait there, and past the
bound they are replaced by one RESYNC (read the table), which is what every subscriber already
does after a reconnect. Only a `removed` event cannot be read from the table: those are kept, one
per distinct payload (so at most one per member removed), ahead of the RESYNC.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from broadcaster import Event
from broadcaster._base import Unsubscribed

from chat import metrics
from chat.listener import Listener
from chat.notify import RESYNC

log = logging.getLogger("chat.broadcast")

QUEUE_MAX = 10_000  # events queued for one subscriber; past that, one RESYNC stands for them
# Their payloads' bytes too: a NOTIFY payload is under 8,000 bytes, but a Redis batch may be
# 256 KB (notify.MAX_BATCH_BYTES), so the count alone would let one feed keep gigabytes.
QUEUE_MAX_BYTES = 4 * 2**20


def is_removal(payload: str) -> bool:
    """A member's removal (notify.event_payload("removed", ...)): never replaced by a RESYNC."""
    if '"removed"' not in payload:  # cheap: almost every payload is a message
        return False
    try:
        data = json.loads(payload)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("type") == "removed" and "seq" not in data


def collapse(queued: list[Event | None], channel: str) -> list[Event | None]:
    """What stands for `queued` (a full queue): its distinct removals in order, then a RESYNC
    (and the end of the subscription, None, if it was queued)."""
    kept: list[Event | None] = []
    seen: set[str] = set()
    for event in queued:
        if event is not None and is_removal(event.message) and event.message not in seen:
            seen.add(event.message)
            kept.append(event)
    kept.append(Event(channel, RESYNC))
    if None in queued:
        kept.append(None)
    return kept


class Subscriber:
    """One subscription to a channel: its queue, and what may take an event without it."""

    __slots__ = ("channel", "closed", "direct", "queue", "queued_bytes")

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()  # bounded by `offer`
        self.queued_bytes = 0  # the payloads in `queue`
        # Takes an event's payload at once if it can (True), else it is queued (False). Only ever
        # called with nothing queued, so events stay in order.
        self.direct: Callable[[str], bool] | None = None
        self.closed = False

    async def get(self) -> Event:
        item = await self.queue.get()
        if item is None:
            raise Unsubscribed()
        self.queued_bytes -= len(item.message)
        return item

    def offer(self, event: Event) -> None:
        queue = self.queue
        if queue.empty() and (direct := self.direct) is not None:
            try:
                if direct(event.message):
                    return
            except Exception:
                # Whatever it dispatched stands; the rest is read from the table by its task.
                log.exception("subscriber of %s failed on an event; resyncing it", self.channel)
                event = Event(self.channel, RESYNC)
        if queue.qsize() >= QUEUE_MAX or self.queued_bytes + len(event.message) > QUEUE_MAX_BYTES:
            metrics.FANOUT_OVERFLOWS.inc()
            queued = [queue.get_nowait() for _ in range(queue.qsize())]
            kept = collapse([*queued, event], self.channel)
            for item in kept:
                queue.put_nowait(item)
            self.queued_bytes = sum(len(item.message) for item in kept if item is not None)
            return
        queue.put_nowait(event)
        self.queued_bytes += len(event.message)


class Broadcast:
    """broadcaster's Broadcast (same subscribe and publish), on one of our backends, without its
    listener task and its queue."""

    def __init__(self, *, backend: Listener) -> None:
        self._backend = backend
        self._subscribers: dict[str, set[Subscriber]] = {}

    async def connect(self) -> None:
        self._backend.sink = self.deliver
        await self._backend.connect()

    async def disconnect(self) -> None:
        await self._backend.disconnect()

    async def publish(self, channel: str, message: str) -> None:
        await self._backend.publish(channel, message)

    def deliver(self, event: Event) -> None:
        subscribers = self._subscribers.get(event.channel)
        if subscribers:
            for subscriber in list(subscribers):
                subscriber.offer(event)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Subscriber]:
        subscriber = Subscriber(channel)
        self._subscribers.setdefault(channel, set()).add(subscriber)
        try:
            # Every subscriber waits for the LISTEN (a no-op when it is in place already), so
            # that none starts reading before its channel is listened to.
            await self._backend.subscribe(channel)
            yield subscriber
        finally:
            subscriber.direct = None
            current = self._subscribers.get(channel)
            if current is not None:
                current.discard(subscriber)
                if not current:
                    del self._subscribers[channel]
                    await self._backend.unsubscribe(channel)
            subscriber.queue.put_nowait(None)
