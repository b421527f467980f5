"""This process's sockets, per room, fed from broadcaster.

One feed per room with local sockets: it subscribes to the room's channel (LISTEN happens once
per process), keeps the last seq it dispatched, and hands every message to every local socket
in seq order, exactly once. Whatever the fan-out could not carry (a payload over 8000 bytes, a
gap, notifications missed while the listener reconnected) is read from the table by seq.

With Redis fan-out (CHAT_FANOUT_URL) the database sends no NOTIFY for the app's messages: the
writer hands each committed batch to `Hub.published`, which publishes it as one payload per room.
Processes publish after their own commits, so one may overtake another: a feed holds messages
that arrived ahead of a missing seq for up to `gap_wait` seconds (`Overtaken`) before it reads
the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from broadcaster._base import Unsubscribed
from sqlalchemy.ext.asyncio import AsyncEngine

from chat import metrics, notify, store
from chat.broadcast import Broadcast
from chat.client import Client, RoomEvent
from chat.db import reading
from chat.notify import room_channel as channel_of
from chat.protocol import dumps, message_frame
from chat.reads import ReadPositions
from chat.store import MessageRecord
from chat.subscription import Subscription

log = logging.getLogger("chat.hub")

BACKFILL_PAGE = 500
EARLY_MAX = 1000  # messages held while waiting for a gap to fill; past that, read the table


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


def _stopping() -> bool:
    """This feed's task is being cancelled. broadcaster's subscribe can turn a cancellation into
    a KeyError (cancelled while its first subscriber waited for the LISTEN, it removes a queue it
    never added): a feed that took that for a failure would resubscribe, a task left running for
    a room or user nobody follows any more."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class RoomFeed:
    def __init__(self, hub: Hub, room_id: int, name: str) -> None:
        self.hub = hub
        self.room_id = room_id
        self.name = name
        self.clients: set[Subscription] = set()
        self.last_seq = 0
        self.ready = asyncio.Event()
        self._early = Overtaken()
        self._parked = False  # waiting for the next event with nothing else to do: see _direct
        self._staged: list[Subscription] | None = None  # owed a flush: see _stage
        self.task = asyncio.create_task(self._run(), name=f"feed-{name}")

    async def _run(self) -> None:
        while True:
            try:
                async with self.hub.broadcast.subscribe(channel_of(self.room_id)) as subscriber:
                    subscriber.direct = self._direct
                    if not self.ready.is_set():
                        # LISTEN first, then read the head: every later commit is notified to us.
                        async with reading(self.hub.engine) as conn:  # one round trip, not BEGIN + ROLLBACK too
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
                            self._parked = True
                            try:
                                event = await subscriber.get()
                            finally:
                                self._parked = False
                        await self._handle(event.message)
            except Unsubscribed:
                return
            except Exception as exc:
                if _stopping():
                    raise asyncio.CancelledError from exc
                log.exception("feed for room %r failed; resubscribing", self.name)
                await asyncio.sleep(1.0)

    async def _handle(self, payload: str) -> None:
        for notice in notify.parse_all(payload):  # a batch (Redis) is several, in seq order
            await self._notice(notice)

    def _direct(self, payload: str) -> bool:
        """Take a payload at once, in the fan-out's callback, when the feed is idle and the
        payload needs no waiting (live messages in order, events): no task wakes for it. False:
        the feed's task takes it from the queue (in order: nothing else is queued)."""
        if not self._parked:
            return False
        notices = notify.parse_all(payload)
        last = self.last_seq
        for notice in notices:
            if type(notice) is MessageRecord:
                if notice.seq == last + 1:
                    last = notice.seq
                elif notice.seq > last:
                    return False  # a gap: the task waits for it, or reads the table
            elif type(notice) is notify.Resync or (type(notice) is notify.Ref and notice.seq > last):
                return False  # read the table
        for notice in notices:
            self._take(notice)
        return True

    async def _notice(self, notice: notify.Notice) -> None:
        if not self._take(notice):
            await self._backfill()  # a payload too big to carry, a gap, a resync, or unreadable

    def _take(self, notice: notify.Notice) -> bool:
        """Handle what needs no waiting; False when the table must be read."""
        if isinstance(notice, notify.Event):
            kind = notice.data.get("type")
            if kind == "read":
                self._read(notice.data)
            elif kind == "removed":
                self._removed(notice.data)
            else:
                self._dispatch(RoomEvent(dumps({**notice.data, "room": self.name})))
        elif isinstance(notice, MessageRecord | notify.Ref) and notice.seq <= self.last_seq:
            pass  # already dispatched (a backfill got there first)
        elif isinstance(notice, MessageRecord) and notice.seq == self.last_seq + 1:
            self._live(notice)
            if self._early:
                for following in self._early.following(self.last_seq):
                    self._live(following)
        elif (
            isinstance(notice, MessageRecord)
            and self.hub.gap_wait > 0
            and self._early.hold(notice, deadline=asyncio.get_running_loop().time() + self.hub.gap_wait)
        ):
            pass  # ahead of a missing seq that another process has yet to publish
        elif not isinstance(notice, notify.Ignored):
            return False
        return True

    def _live(self, message: MessageRecord) -> None:
        # Once per message per process: from its transaction to its queueing on every socket.
        metrics.fanout_delay((datetime.now(UTC) - message.sent_at).total_seconds())
        self._dispatch(message)

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

    def _of_user(self, data: dict[str, Any]) -> list[Subscription]:
        user_id = data.get("user_id")
        return [s for s in self.clients if s.identity is not None and s.identity.user_id == user_id]

    def _read(self, data: dict[str, Any]) -> None:
        """A user's read position moved: their own sockets hear it (a frame for each alone)."""
        seq = data.get("read_seq")
        if not isinstance(seq, int):
            return
        frame = dumps({"type": "read", "room": self.name, "seq": seq})
        self._flush_staged()  # after the messages it may be about
        for subscription in self._of_user(data):
            subscription.offer(frame)

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
            frame = message_frame(self.name, item)  # once per message, shared by every socket
            for subscription in list(self.clients):
                if not subscription.live_batch:
                    subscription.deliver(item, frame)
                elif subscription.stage(item, frame):
                    self._stage(subscription)
            return
        self._flush_staged()  # what was staged before it goes out before it
        for subscription in list(self.clients):
            subscription.offer(item)

    def _stage(self, subscription: Subscription) -> None:
        """`subscription` has staged messages: flush them once the messages that arrived with
        them are dispatched too. A commit's NOTIFYs come in one read, and the driver queues a
        callback for each at once, so a flush queued behind the first runs after the last."""
        staged = self._staged
        if staged is None:
            staged = self._staged = []
            self.task.get_loop().call_soon(self._flush_staged)  # (get_running_loop costs a getpid)
        staged.append(subscription)

    def _flush_staged(self) -> None:
        staged, self._staged = self._staged, None
        for subscription in staged or ():
            subscription.flush_staged()


class UserFeed:
    """One user's channel in this process: one subscription however many of their `/socket`
    connections are open here (broadcaster's subscribe is not safe for two first subscribers of
    one channel at once: the second replaces the first's queue)."""

    def __init__(self, hub: Hub, user_id: int) -> None:
        self.hub = hub
        self.user_id = user_id
        self.listeners: set[Callable[[], object]] = set()
        self.task = asyncio.create_task(self._run(), name=f"user-{user_id}")

    async def _run(self) -> None:
        while True:
            try:
                async with self.hub.broadcast.subscribe(notify.user_channel(self.user_id)) as subscriber:
                    while True:
                        event = await subscriber.get()
                        # RESYNC: the fan-out reconnected, a change may have been missed.
                        if event.message in (notify.ROOMS_CHANGED, notify.RESYNC):
                            for listener in list(self.listeners):
                                listener()
            except Unsubscribed:
                return
            except Exception as exc:
                if _stopping():
                    raise asyncio.CancelledError from exc
                log.warning("room list events of user %d: %r; resubscribing", self.user_id, exc)
                await asyncio.sleep(1.0)


class Hub:
    def __init__(
        self, broadcast: Broadcast, engine: AsyncEngine, *, database_notifies: bool = True, gap_wait: float = 0.0
    ) -> None:
        self.broadcast = broadcast
        self.engine = engine
        # True: the insert trigger NOTIFYs every message (the default). False: the writer hands
        # each committed batch to `published`, which publishes it through Redis.
        self.database_notifies = database_notifies
        self.gap_wait = gap_wait  # seconds a feed waits for a missing seq before reading the table
        self.feeds: dict[int, RoomFeed] = {}
        self.user_feeds: dict[int, UserFeed] = {}
        self.sockets: set[Client] = set()  # every open socket, in rooms or not
        self.closing = False  # shutting down: no new sockets
        self._handshakes = 0  # handshakes reading their token: not yet among the sockets
        self._idle = asyncio.Event()  # set while no socket is open and no handshake reading
        self._idle.set()
        self.reads: ReadPositions | None = None  # set by the app's lifespan

    def attach(self, client: Client) -> None:
        self.sockets.add(client)
        self._idle.clear()

    def detach(self, client: Client) -> None:
        self.sockets.discard(client)
        self._settle()

    def _settle(self) -> None:
        if not self.sockets and not self._handshakes:
            self._idle.set()

    @contextlib.contextmanager
    def handshake(self) -> Iterator[None]:
        """Around a handshake's await before it is attached (its token's read): the drain waits
        for it as for a socket (auth.reading_token says why)."""
        self._handshakes += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._handshakes -= 1
            self._settle()

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
        subscription.flush_staged()  # what the feed dispatched before the leave goes out before it
        feed.clients.discard(subscription)
        if not feed.clients:
            del self.feeds[subscription.room_id]
            feed.task.cancel()  # leaves the channel; the backend UNLISTENs

    def last_seq(self, room_id: int) -> int:
        """The last seq this process dispatched in the room (0 if it has no feed)."""
        feed = self.feeds.get(room_id)
        return feed.last_seq if feed is not None else 0

    async def publish(self, room_id: int, kind: str, user: str, **extra: int) -> None:
        """Fan out an ephemeral event (join, leave, typing, read, removed) to the room in every
        process (best effort)."""
        try:
            await self.broadcast.publish(channel_of(room_id), notify.event_payload(kind, user, **extra))
        except Exception as exc:
            log.warning("could not publish %s: %r", kind, exc)

    def follow_user(self, user_id: int, listener: Callable[[], object]) -> None:
        """Call `listener` when the user's room list changes (through any process)."""
        feed = self.user_feeds.get(user_id)
        if feed is None:
            feed = self.user_feeds[user_id] = UserFeed(self, user_id)
        feed.listeners.add(listener)

    def unfollow_user(self, user_id: int, listener: Callable[[], object]) -> None:
        feed = self.user_feeds.get(user_id)
        if feed is None:
            return
        feed.listeners.discard(listener)
        if not feed.listeners:
            del self.user_feeds[user_id]
            feed.task.cancel()

    async def rooms_changed(self, user_id: int) -> None:
        """Tell the user's /socket connections, in every process, that their room list changed
        (best effort: the page also reads the list at load and after each reconnect)."""
        try:
            await self.broadcast.publish(notify.user_channel(user_id), notify.ROOMS_CHANGED)
        except Exception as exc:
            log.warning("could not publish a room list change: %r", exc)

    async def published(self, room_id: int, records: Sequence[MessageRecord]) -> None:
        """Call after commit with one room's newly stored messages (seq order): one publish. A
        no-op when the database's trigger fans out. A failed publish is not the senders' problem:
        the messages are stored and acked, and the backend wakes the room (RESYNC) once its
        fan-out answers again."""
        if self.database_notifies or not records:
            return
        try:
            await self.broadcast.publish(channel_of(room_id), notify.batch_payload(records))
        except Exception as exc:
            metrics.PUBLISH_FAILURES.inc()
            log.warning("could not publish %d message(s) to room %s: %r", len(records), room_id, exc)

    def clients(self) -> list[Client]:
        return list(self.sockets)

    async def going_away(self, timeout: float) -> None:
        """Shutting down: refuse new sockets, ask every socket to finish and close with 1001,
        and wait (bounded) until they have, and until every handshake reading its token has
        been refused (or attached, then closed)."""
        self.closing = True
        clients = self.clients()
        log.info("going away: closing %d socket(s)", len(clients))
        for client in clients:
            client.go_away()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def close(self) -> None:
        tasks = [feed.task for feed in self.feeds.values()] + [feed.task for feed in self.user_feeds.values()]
        self.feeds, self.user_feeds = {}, {}
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
