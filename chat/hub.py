"""This process's sockets, per room, fed from broadcaster.

One feed per room with local sockets: it subscribes to the room's channel (LISTEN happens once
per process), keeps the last seq it dispatched, and hands every message to every local socket
in seq order, exactly once. Whatever NOTIFY could not carry (a payload over 8000 bytes, a gap,
notifications missed while the listener reconnected) is read from the table by seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

from broadcaster import Broadcast
from broadcaster._base import Unsubscribed
from sqlalchemy.ext.asyncio import AsyncEngine

from chat import metrics, notify, store
from chat.client import Client, RoomEvent
from chat.notify import room_channel as channel_of
from chat.protocol import dumps
from chat.reads import ReadPositions
from chat.store import MessageRecord
from chat.subscription import Subscription

log = logging.getLogger("chat.hub")

BACKFILL_PAGE = 500


class RoomFeed:
    def __init__(self, hub: Hub, room_id: int, name: str) -> None:
        self.hub = hub
        self.room_id = room_id
        self.name = name
        self.clients: set[Subscription] = set()
        self.last_seq = 0
        self.ready = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name=f"feed-{name}")

    async def _run(self) -> None:
        while True:
            try:
                async with self.hub.broadcast.subscribe(channel_of(self.room_id)) as subscriber:
                    if not self.ready.is_set():
                        # LISTEN first, then read the head: every later commit is notified to us.
                        async with self.hub.engine.connect() as conn:
                            self.last_seq = await store.room_head(conn, room_id=self.room_id)
                        for client in self.clients:
                            if client.live_only:
                                client.cursor = max(client.cursor, self.last_seq)
                        self.ready.set()
                    else:
                        await self._backfill()
                    while True:
                        await self._handle((await subscriber.get()).message)
            except Unsubscribed:
                return
            except Exception:
                log.exception("feed for room %r failed; resubscribing", self.name)
                await asyncio.sleep(1.0)

    async def _handle(self, payload: str) -> None:
        notice = notify.parse(payload)
        if isinstance(notice, notify.Event):
            kind = notice.data.get("type")
            if kind == "read":
                self._read(notice.data)
            elif kind == "removed":
                self._removed(notice.data)
            else:
                self._dispatch(RoomEvent(dumps({**notice.data, "room": self.name})))
        elif isinstance(notice, MessageRecord | notify.Ref) and notice.seq <= self.last_seq:
            return  # already dispatched (a backfill got there first)
        elif isinstance(notice, MessageRecord) and notice.seq == self.last_seq + 1:
            # Once per message per process: from its transaction to its queueing on every socket.
            metrics.FANOUT_DELAY.observe((datetime.now(UTC) - notice.sent_at).total_seconds())
            self._dispatch(notice)
        elif not isinstance(notice, notify.Ignored):
            await self._backfill()  # a payload too big for NOTIFY, a gap, a resync, or unreadable

    async def _backfill(self) -> None:
        delay = 0.1
        while True:
            try:
                async with self.hub.engine.connect() as conn:
                    while True:
                        rows = await store.messages_after(
                            conn, room_id=self.room_id, after=self.last_seq, limit=BACKFILL_PAGE
                        )
                        metrics.BACKFILLED.inc(len(rows))
                        for row in rows:
                            self._dispatch(row)
                        if len(rows) < BACKFILL_PAGE:
                            return
            except (OSError, TimeoutError, ConnectionError) as exc:
                log.warning("room %r: backfill failed (%r); retrying", self.name, exc)
            except Exception as exc:  # asyncpg/SQLAlchemy errors while Postgres restarts
                log.warning("room %r: backfill failed (%r); retrying", self.name, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _of_user(self, data: dict[str, Any]) -> list[Subscription]:
        user_id = data.get("user_id")
        return [s for s in self.clients if s.identity is not None and s.identity.user_id == user_id]

    def _read(self, data: dict[str, Any]) -> None:
        """A user's read position moved: their own sockets hear it (a frame for each alone)."""
        seq = data.get("read_seq")
        if not isinstance(seq, int):
            return
        for subscription in self._of_user(data):
            subscription.offer(dumps({"type": "read", "room": subscription.room, "seq": seq}))

    def _removed(self, data: dict[str, Any]) -> None:
        """A member was removed: their subscriptions leave the room now, in this process, before
        anything else in the room's stream reaches them; the others hear who left."""
        for subscription in self._of_user(data):
            self.hub.leave(subscription)
            subscription.removed()
        self._dispatch(RoomEvent(dumps({"type": "removed", "user": str(data.get("user", "")), "room": self.name})))

    def _dispatch(self, item: MessageRecord | RoomEvent) -> None:
        if isinstance(item, MessageRecord):
            self.last_seq = item.seq
        for subscription in list(self.clients):
            subscription.offer(item)


class Hub:
    def __init__(self, broadcast: Broadcast, engine: AsyncEngine) -> None:
        self.broadcast = broadcast
        self.engine = engine
        self.feeds: dict[int, RoomFeed] = {}
        self.sockets: set[Client] = set()  # every open socket, in rooms or not
        self.closing = False  # shutting down: no new sockets
        self._idle = asyncio.Event()  # set while no socket is joined
        self._idle.set()
        self.reads: ReadPositions | None = None  # set by the app's lifespan

    def attach(self, client: Client) -> None:
        self.sockets.add(client)
        self._idle.clear()

    def detach(self, client: Client) -> None:
        self.sockets.discard(client)
        if not self.sockets:
            self._idle.set()

    async def join(self, subscription: Subscription, *, timeout: float = 10.0) -> None:
        room_id = subscription.room_id
        feed = self.feeds.get(room_id)
        if feed is None:
            feed = self.feeds[room_id] = RoomFeed(self, room_id, subscription.room)
        if subscription.live_only and feed.ready.is_set():
            subscription.cursor = feed.last_seq  # before any further dispatch can reach it
        feed.clients.add(subscription)
        try:
            await asyncio.wait_for(feed.ready.wait(), timeout)
        except BaseException:
            self.leave(subscription)
            raise

    def leave(self, subscription: Subscription) -> None:
        feed = self.feeds.get(subscription.room_id)
        if feed is None:
            return
        feed.clients.discard(subscription)
        if not feed.clients:
            del self.feeds[subscription.room_id]
            feed.task.cancel()  # leaves the channel; the backend UNLISTENs

    def last_seq(self, room_id: int) -> int:
        """The last seq this process dispatched in the room (0 if it has no feed)."""
        feed = self.feeds.get(room_id)
        return feed.last_seq if feed is not None else 0

    async def publish(self, room_id: int, event: dict[str, Any]) -> None:
        """Fan out an ephemeral event to the room in every process (best effort)."""
        try:
            await self.broadcast.publish(channel_of(room_id), dumps(event))
        except Exception as exc:
            log.warning("could not publish %s: %r", event.get("type"), exc)

    def clients(self) -> list[Client]:
        return list(self.sockets)

    async def going_away(self, timeout: float) -> None:
        """Shutting down: refuse new sockets, ask every socket to finish and close with 1001,
        and wait (bounded) until they have."""
        self.closing = True
        clients = self.clients()
        log.info("going away: closing %d socket(s)", len(clients))
        for client in clients:
            client.go_away()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def close(self) -> None:
        feeds, self.feeds = list(self.feeds.values()), {}
        for feed in feeds:
            feed.task.cancel()
        for feed in feeds:
            with contextlib.suppress(asyncio.CancelledError):
                await feed.task
