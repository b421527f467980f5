"""This process's sockets, per room, fed from broadcaster.

One feed per room with local sockets: it subscribes to the room's channel (LISTEN happens once
per process), keeps the last seq it dispatched, and hands every message to every local socket
in seq order, exactly once. Whatever NOTIFY could not carry (a payload over 8000 bytes, a gap,
notifications missed while the listener reconnected) is read from the table by seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import datetime
from typing import Any

from broadcaster import Broadcast
from broadcaster._base import Unsubscribed
from sqlalchemy.ext.asyncio import AsyncEngine

from chat import metrics, store
from chat.client import Client, RoomEvent
from chat.protocol import dumps
from chat.pubsub import RESYNC
from chat.redisbus import batch_payload
from chat.store import MessageRecord

log = logging.getLogger("chat.hub")

BACKFILL_PAGE = 500
EARLY_MAX = 1000  # messages held while waiting for a gap to fill; past that, read the table


def channel_of(room_id: int) -> str:
    return f"room_{room_id}"  # room names may be longer than a channel name's 63 bytes


class Overtaken:
    """Messages that arrived ahead of a missing seq, held until the gap fills or `deadline`
    passes (then the feed reads the table). With Redis fan-out, processes publish after their own
    commits, so one may overtake another; NOTIFY arrives in commit order and never needs this."""

    def __init__(self, limit: int = EARLY_MAX) -> None:
        self.limit = limit
        self.held: dict[int, MessageRecord] = {}
        self.deadline = 0.0  # when to stop waiting for the gap (loop time); meaningful while held

    def __bool__(self) -> bool:
        return bool(self.held)

    def hold(self, record: MessageRecord, *, deadline: float) -> bool:
        """Keep `record` for later; False when full (read the table instead). The first held
        message of a gap sets the deadline."""
        if len(self.held) >= self.limit:
            return False
        if not self.held:
            self.deadline = deadline
        self.held[record.seq] = record
        return True

    def following(self, last_seq: int) -> list[MessageRecord]:
        """The held messages that now follow `last_seq` without a gap, in order (removed)."""
        ready = []
        while (record := self.held.pop(last_seq + 1, None)) is not None:
            ready.append(record)
            last_seq = record.seq
        self.forget(last_seq)
        return ready

    def forget(self, last_seq: int) -> None:
        """Drop what is at or before `last_seq` (dispatched by a backfill)."""
        for seq in [s for s in self.held if s <= last_seq]:
            del self.held[seq]


class RoomFeed:
    def __init__(self, hub: Hub, room_id: int, name: str) -> None:
        self.hub = hub
        self.room_id = room_id
        self.name = name
        self.clients: set[Client] = set()
        self.last_seq = 0
        self.ready = asyncio.Event()
        self._early = Overtaken()
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
                        if self._early:  # a gap: wait a little for the missing seqs, then read them
                            try:
                                timeout = max(0.0, self._early.deadline - asyncio.get_running_loop().time())
                                event = await asyncio.wait_for(subscriber.get(), timeout)
                            except TimeoutError:
                                await self._backfill()  # reads every held message too: all are committed
                                self._early.held.clear()  # never wait twice for the same gap
                                continue
                        else:
                            event = await subscriber.get()
                        await self._handle(event.message)
            except Unsubscribed:
                return
            except Exception:
                log.exception("feed for room %r failed; resubscribing", self.name)
                await asyncio.sleep(1.0)

    async def _handle(self, payload: str) -> None:
        if payload == RESYNC:
            await self._backfill()
            return
        try:
            data: dict[str, Any] | list[dict[str, Any]] = json.loads(payload)
        except ValueError:
            log.warning("room %r: unreadable notification; reading the table instead", self.name)
            await self._backfill()
            return
        # A list is a batch of messages committed together (Redis fan-out publishes those).
        for item in data if isinstance(data, list) else [data]:
            await self._message(item)

    async def _message(self, data: dict[str, Any]) -> None:
        seq = data.get("seq")
        if seq is None:
            if data.get("type") in ("join", "leave", "typing"):
                self._dispatch(RoomEvent(dumps({**data, "room": self.name})))
            return
        if seq <= self.last_seq:
            return  # already dispatched (a backfill got there first)
        if data.get("ref"):
            await self._backfill()  # a payload too big to carry: read the rows
            return
        record = MessageRecord(
            seq=seq,
            author=data["author"],
            body=data["body"],
            kind=data["kind"],
            author_id=data.get("author_id"),
            client_id=data.get("client_id"),
            sent_at=datetime.fromisoformat(data["sent_at"]),
        )
        if seq == self.last_seq + 1:
            self._dispatch(record)
            for following in self._early.following(self.last_seq):
                self._dispatch(following)
        elif self.hub.gap_wait <= 0 or not self._early.hold(
            record, deadline=asyncio.get_running_loop().time() + self.hub.gap_wait
        ):
            await self._backfill()  # a gap

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
                            self._early.forget(self.last_seq)
                            return
            except (OSError, TimeoutError, ConnectionError) as exc:
                log.warning("room %r: backfill failed (%r); retrying", self.name, exc)
            except Exception as exc:  # asyncpg/SQLAlchemy errors while Postgres restarts
                log.warning("room %r: backfill failed (%r); retrying", self.name, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _dispatch(self, item: MessageRecord | RoomEvent) -> None:
        if isinstance(item, MessageRecord):
            self.last_seq = item.seq
        for client in list(self.clients):
            client.offer(item)


class Hub:
    def __init__(
        self, broadcast: Broadcast, engine: AsyncEngine, *, database_notifies: bool = True, gap_wait: float = 0.0
    ) -> None:
        self.broadcast = broadcast
        self.engine = engine
        # True: the insert trigger NOTIFYs every message (the default). False: the app publishes
        # each batch itself after commit (hub.published), through Redis.
        self.database_notifies = database_notifies
        self.gap_wait = gap_wait  # seconds a feed waits for a missing seq before reading the table
        self.feeds: dict[int, RoomFeed] = {}
        self.closing = False  # shutting down: no new sockets
        self._idle = asyncio.Event()  # set while no socket is joined
        self._idle.set()

    async def join(self, room_id: int, name: str, client: Client, *, timeout: float = 10.0) -> None:
        feed = self.feeds.get(room_id)
        if feed is None:
            feed = self.feeds[room_id] = RoomFeed(self, room_id, name)
        if client.live_only and feed.ready.is_set():
            client.cursor = feed.last_seq  # before any further dispatch can reach it
        feed.clients.add(client)
        self._idle.clear()
        try:
            await asyncio.wait_for(feed.ready.wait(), timeout)
        except BaseException:
            self.leave(room_id, client)
            raise

    def leave(self, room_id: int, client: Client) -> None:
        feed = self.feeds.get(room_id)
        if feed is None:
            return
        feed.clients.discard(client)
        if not feed.clients:
            del self.feeds[room_id]
            feed.task.cancel()  # leaves the channel; the backend UNLISTENs
        if not self.feeds:
            self._idle.set()

    async def publish(self, room_id: int, event: dict[str, Any]) -> None:
        """Fan out an ephemeral event to the room in every process (best effort)."""
        try:
            await self.broadcast.publish(channel_of(room_id), dumps(event))
        except Exception as exc:
            log.warning("could not publish %s: %r", event.get("type"), exc)

    async def published(self, room_id: int, records: list[MessageRecord]) -> None:
        """Call after commit with one room's newly stored messages (seq order), as one batch.
        A no-op when the database's trigger fans out; else one publish. A failed publish is not
        the sender's problem: the message is stored and acked, and the backend wakes the room
        (RESYNC) once its fan-out answers again."""
        if self.database_notifies or not records:
            return
        try:
            await self.broadcast.publish(channel_of(room_id), batch_payload(records))
        except Exception as exc:
            metrics.PUBLISH_FAILURES.inc()
            log.warning("could not publish %d message(s) to room %s: %r", len(records), room_id, exc)

    def clients(self) -> list[Client]:
        return [client for feed in self.feeds.values() for client in feed.clients]

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
