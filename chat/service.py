"""A room socket's session: validates what the client sends, stores it, and answers."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from typing import Any

import asyncpg
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from chat import membership, metrics, protocol, store
from chat.client import SLOW_CONSUMER, Client
from chat.config import Settings
from chat.db import reading
from chat.hub import Hub
from chat.limits import FrameGuard, RateLimited, ReplayBusy
from chat.membership import NoSuchRoom
from chat.protocol import (
    CLOSE_FLOOD,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TRY_AGAIN,
    BadFrame,
    ChangeFrame,
    DeleteFrame,
    EditFrame,
    HistoryFrame,
    PingFrame,
    ReactFrame,
    ReadFrame,
    SendFrame,
    TypingFrame,
    UnreactFrame,
)
from chat.store import Identity
from chat.subscription import Subscription, tagged
from chat.writer import InFlight, NotStored, Stored, Writer

log = logging.getLogger("chat.service")

CHANGE_FRAMES = (EditFrame, DeleteFrame, ReactFrame, UnreactFrame)

REPLAY_PAGE = 500

# What a database that is away (restarting, unreachable, a backend terminated) raises.
DATABASE_ERRORS = (SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


def check_body(body: str, *, max_bytes: int) -> None:
    size = len(body.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise BadFrame("too_large", f"the message is {size} bytes; the limit is {max_bytes}")
    if not body.strip():
        raise BadFrame("empty", "the message is empty")
    if "\x00" in body:
        raise BadFrame("invalid_text", "the message contains a NUL character")
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:
        raise BadFrame("invalid_text", "the message contains a lone surrogate") from None


def inflight_bound(settings: Settings) -> int:
    """Sends one socket may have in flight: CHAT_SOCKET_INFLIGHT, but at most a quarter of the
    socket's queue, so that a burst of their acks (with the echoes of the same messages) never
    overflows it."""
    return max(1, min(settings.socket_inflight, settings.socket_queue // 4))


def inflight_bytes(settings: Settings) -> int:
    """Characters of text one socket may have in flight: a quarter of its queue's byte bound, so
    that the echoes of a whole batch of its sends fit beside what is queued already."""
    return max(1, settings.socket_queue_bytes // 4)


class Unseen(enum.Enum):
    """open_room's `seen` when the caller has not read the room (None: read, and not there)."""

    UNSEEN = enum.auto()


UNSEEN = Unseen.UNSEEN


async def open_room(
    engine: AsyncEngine,
    *,
    user: Identity,
    room: str,
    max_per_user: int,
    seen: membership.RoomAccess | Unseen | None = UNSEEN,
) -> int | None:
    """The room's id, made now (public, owned by the user) if it is new; None when the user has
    made `max_per_user` rooms already. Joining a public room makes the user a member; a private
    room they are not in raises NoSuchRoom, as does a DM name (those are made by POST /api/dms
    only). Callers check everything else first, so that a refused join makes no room. `seen`:
    the room as the caller has just read it (membership.token_and_access), when it did."""
    if not room.startswith("_"):
        if seen is UNSEEN:
            async with reading(engine) as conn:  # the common case, a member coming back: no transaction
                seen = await membership.access(conn, room=room, user_id=user.user_id)
        if seen is not None and seen.member:
            return seen.room_id
    async with engine.connect() as conn:
        if room.startswith("_"):  # "_…": the server's own rooms, without members
            room_id = await store.room_id(conn, name=room, create=False)
            if room_id is None:
                room_id = await store.create_room(conn, name=room, creator_id=None, max_per_user=max_per_user)
            return room_id
        found = await membership.access(conn, room=room, user_id=user.user_id)
        if found is None:
            if room.startswith(membership.DM_PREFIX):
                raise NoSuchRoom(room)
            # Made now, or found made (by someone else a moment ago, or private: then refused).
            room_id = await store.create_room(conn, name=room, creator_id=user.user_id, max_per_user=max_per_user)
            if room_id is None:
                return None
            found = await membership.access(conn, room=room, user_id=user.user_id)
            if found is None:
                raise NoSuchRoom(room)
        if not found.member:
            await membership.enter(conn, room_id=found.room_id, user_id=user.user_id)
    return found.room_id


def admit(guard: FrameGuard, client: Client | Subscription) -> RateLimited | None:
    """Charge one frame to the rate limits: None if it may be handled; else why not (and a
    client that keeps sending while refused is cut off as a flood)."""
    try:
        guard.check()
        return None
    except RateLimited as refused:
        metrics.REFUSALS.labels("rate_limited").inc()
        if refused.flood:
            client.kick(CLOSE_FLOOD, "flood: too many frames while rate limited", flush=True)
        return refused


class RoomSession:
    # One per room a socket is in (50 on a full /socket): slots keep it to its fields, no dict.
    __slots__ = (
        "_inflight",
        "_typed_at",
        "client",
        "engine",
        "guard",
        "hub",
        "identity",
        "room",
        "room_id",
        "settings",
        "writer",
    )

    def __init__(
        self,
        *,
        settings: Settings,
        engine: AsyncEngine,
        hub: Hub,
        identity: Identity,
        room_id: int,
        room: str,
        client: Subscription,
        guard: FrameGuard,
        writer: Writer,
        inflight: InFlight | None = None,
    ) -> None:
        self.settings = settings
        self.writer = writer
        # Sends awaiting their commit: the receive loop goes on reading meanwhile, up to the
        # bound, and their answers go out in the order the sends came in. A socket of many rooms
        # shares one among its rooms; its owner has a graceful close flush their acks first.
        # A room socket's own is made by its first frame (see `inflight`): most sockets are idle.
        self._inflight = inflight
        self.engine = engine
        self.hub = hub
        self.identity = identity
        self.room_id = room_id
        self.room = room
        self.client = client
        self.guard = guard
        self._typed_at = -1e9  # when this socket's last typing event went out

    @property
    def inflight(self) -> InFlight:
        inflight = self._inflight
        if inflight is None:
            settings = self.settings
            bound, max_bytes = inflight_bound(settings), inflight_bytes(settings)
            inflight = self._inflight = InFlight(bound, self.client.offer, max_bytes=max_bytes)
            # From now on a graceful close flushes the acks of sends in flight first.
            self.client.client.settle = inflight.settle
        return inflight

    def replay_early(self, *, after: int | None) -> EarlyReplay:
        """The replay, started now: its slot and first page are taken while the caller confirms
        the join (the presence enter, which rechecks membership), and nothing is sent before
        `EarlyReplay.go`: one round trip less before `ready` than reading after the enter."""
        return EarlyReplay(self, after)

    async def replay(self, *, after: int | None, online: asyncio.Future[list[str]]) -> None:
        """Queue the room's history, then `ready`, then go live. Each page is read on a pooled
        connection that is given back before the page is sent; sending waits for the reader
        (bounded by CHAT_REPLAY_SEND_TIMEOUT_SECONDS, then close 4000), and each user replays
        at most CHAT_REPLAYS_PER_USER at a time. Live messages are held back (not queued) until
        replay has read up to what the room's feed has dispatched. With `after`: every message
        after it; without: the last CHAT_HISTORY_ON_JOIN. The first page is read at once, and
        sent once `online` has who is online (the join is confirmed: replay_early)."""
        sub = self.client
        timeout = self.settings.replay_send_timeout_seconds
        try:
            async with self.guard.limits.replay_slot(self.identity.user_id, timeout):
                await self._replay(after, timeout, online)
        except ReplayBusy:
            sub.kick(CLOSE_TRY_AGAIN, "too many joins at once: try again")
            return
        except TimeoutError:
            sub.kick(CLOSE_SLOW_CONSUMER, SLOW_CONSUMER)
            return
        except Exception as exc:  # the database failed mid-replay: the client resumes elsewhere or later
            log.warning("replay of %r failed: %r", self.room, exc)
            sub.kick(CLOSE_TRY_AGAIN, "database unavailable: reconnect and resume")
            return

    async def _replay(self, after: int | None, timeout: float, online: asyncio.Future[list[str]]) -> None:
        sub = self.client
        seen = self.hub.last_seq(self.room_id)  # read before the page: the page includes it
        async with reading(self.engine) as conn:
            if after is None:
                # The latest messages as they are now, and the seq they are as of: changes up to it
                # are in them, and the catch-up below starts after it. A room with no messages
                # yet needs its head read before the page (one round trip more, for those alone).
                page = functools.partial(
                    store.history_page,
                    conn,
                    room_id=self.room_id,
                    before=None,
                    limit=self.settings.history_on_join,
                    viewer_id=self.identity.user_id,
                )
                rows, as_of = await page()
                if as_of is None:
                    head = await store.room_head(conn, room_id=self.room_id)
                    rows, as_of = await page()
                head = as_of if as_of is not None else head
            else:
                head = await store.room_head(conn, room_id=self.room_id)
                rows = await store.messages_after(conn, room_id=self.room_id, after=min(after, head), limit=REPLAY_PAGE)
        if after is None:
            sub.cursor = rows[0].seq - 1 if rows else head
            complete = True  # the newest rows: nothing newer was committed when they were read
        else:
            sub.cursor = min(after, head)  # a cursor from the future: resume from now
            complete = len(rows) < REPLAY_PAGE
        who = await online  # the join is confirmed (and the socket accepted): send from here
        while True:
            await sub.replay_rows(rows, timeout=timeout)
            if after is None:
                sub.cursor = max(sub.cursor, head)  # the current-state page holds the changes up to head
            if sub.client.closing:
                return
            if complete and self.hub.last_seq(self.room_id) == seen:
                # Nothing dispatched since the read: whatever comes next is live. No await
                # between this check and going live.
                ready = {
                    "type": "ready",
                    "room": self.room,
                    "user": self.identity.name,
                    "last_seq": sub.cursor,
                    "online": who,
                }
                sub.offer(protocol.dumps(ready))
                sub.go_live()
                return
            seen = self.hub.last_seq(self.room_id)
            async with reading(self.engine) as conn:  # one statement: no BEGIN, no ROLLBACK
                rows = await store.messages_after(conn, room_id=self.room_id, after=sub.cursor, limit=REPLAY_PAGE)
            complete = len(rows) < REPLAY_PAGE

    async def handle_weighed(self, text: str | None) -> None:
        """A room socket's frame, then its size charged: big frames cost more (the debt delays the
        next ones). A method, not a partial: the socket's receive loop keeps it for its life."""
        await self.handle(text)
        if text is not None:
            self.guard.charge_bytes(len(text))

    async def handle(self, text: str | None) -> None:
        # Errors answer frames that may be sends: in order behind the sends in flight.
        if refused := admit(self.guard, self.client):
            self.inflight.answer(refused.frame())
            return
        if text is None:
            self.inflight.answer(protocol.error_frame("binary_not_supported", "send JSON text frames"))
            return
        frame: protocol.Incoming | None = None
        try:
            frame = protocol.parse(text)
            if isinstance(frame, SendFrame):
                await self.send(frame)
            elif isinstance(frame, CHANGE_FRAMES):
                await self.change(frame)
            elif isinstance(frame, HistoryFrame):
                await self.history(frame)
            elif isinstance(frame, TypingFrame):
                await self.typing()
            elif isinstance(frame, ReadFrame):
                self.read(frame.seq)
            elif isinstance(frame, PingFrame):
                self.reply({"type": "pong"})
        except BadFrame as exc:
            metrics.REFUSALS.labels(exc.code).inc()
            # Errors answering a send name its client_id, so the client knows which one failed.
            if isinstance(frame, (SendFrame, *CHANGE_FRAMES)):
                extra = {"client_id": frame.client_id}
            else:
                extra = protocol.client_id_of(text) if frame is None else {}
            self.inflight.answer(protocol.error_frame(exc.code, exc.detail, **extra))
        except DATABASE_ERRORS as exc:  # a read (history) while the database is away: say so, stay open
            log.warning("a %s frame failed: %r", getattr(frame, "type", "?"), exc)
            metrics.REFUSALS.labels("unavailable").inc()
            self.inflight.answer(protocol.error_frame("unavailable", "the database is unavailable; try again"))

    def reply(self, frame: dict[str, Any]) -> None:
        self.client.offer(protocol.dumps(frame))

    async def send(self, frame: SendFrame) -> None:
        """Hand the message to the writer and go back to reading: the ack (or error) goes out
        once it is committed, in order. At the in-flight bound this waits for a free slot, so
        the socket stops reading and TCP pushes back."""
        check_body(frame.body, max_bytes=self.settings.max_message_bytes)
        await self.inflight.reserve()
        future = self.writer.submit(
            room_id=self.room_id,
            author_id=self.identity.user_id,
            author=self.identity.name,
            body=frame.body,
            client_id=frame.client_id,
            reply_to=frame.reply_to,
        )
        self._answer(future, frame.client_id, len(frame.body))

    async def change(self, frame: ChangeFrame) -> None:
        """An edit, delete, react or unreact: stored by the same writer, in the same batches, as
        sends, and answered the same way (ack with its seq, or an error frame naming the
        client_id). The database checks the target and the permissions (migration 0008), under
        the room's lock, so two processes cannot both delete or both react."""
        if isinstance(frame, EditFrame):
            check_body(frame.body, max_bytes=self.settings.max_message_bytes)
            body = frame.body
        elif isinstance(frame, (ReactFrame, UnreactFrame)):
            body = frame.emoji
        else:
            body = ""
        await self.inflight.reserve()
        future = self.writer.submit(
            room_id=self.room_id,
            author_id=self.identity.user_id,
            author=self.identity.name,
            body=body,
            kind=frame.type,
            client_id=frame.client_id,
            target_seq=frame.target_seq,
        )
        self._answer(future, frame.client_id, len(body))

    def _answer(self, future: asyncio.Future[Stored], client_id: str | None, size: int) -> None:
        room = self.room if self.client.tag else None  # a socket of many rooms: name it

        def answer(done: asyncio.Future[Stored]) -> str:
            error = done.exception()
            if error is None:
                stored = done.result()
                text = protocol.ack_frame(client_id, stored.seq, stored.duplicate)
            else:
                code, detail = (
                    (error.code, error.detail) if isinstance(error, NotStored) else ("unavailable", str(error))
                )
                metrics.REFUSALS.labels(code).inc()
                text = protocol.error_frame(code, detail, client_id=client_id)
            return text if room is None else tagged(text, room)

        self.inflight.add(future, answer, size)

    async def typing(self) -> None:
        """Ephemeral: fanned out (NOTIFY or Redis), never stored, at most one per interval per
        socket (the rest are dropped quietly). Clients clear it when the typist's message or
        leave arrives, or after a few seconds of silence."""
        now = time.monotonic()
        if now - self._typed_at < self.settings.typing_interval_seconds:
            return
        self._typed_at = now
        await self.hub.publish(self.room_id, "typing", self.identity.name)

    def read(self, seq: int) -> None:
        """Everything up to `seq` is read: written coalesced (chat/reads.py); every socket of
        this user in the room hears the new position as a `read` frame once it is stored."""
        reads = self.hub.reads
        if reads is None or not reads.advance(
            user_id=self.identity.user_id, user=self.identity.name, room_id=self.room_id, seq=seq
        ):
            raise BadFrame("unavailable", "read positions are not being taken now: try again")

    async def history(self, frame: HistoryFrame) -> None:
        """A page of older messages. If it would be over CHAT_HISTORY_REPLY_BYTES, its oldest
        messages are left out (has_more says so); its size is charged to the rate limits."""
        limit = min(frame.limit, self.settings.history_page_max)
        async with reading(self.engine) as conn:  # one statement (its head is of the same snapshot)
            rows, as_of = await store.history_page(
                conn, room_id=self.room_id, before=frame.before, limit=limit + 1, viewer_id=self.identity.user_id
            )
        frames = [protocol.message_frame(self.room, r) for r in rows[-limit:]]
        kept = protocol.fit(frames, max_bytes=self.settings.history_reply_bytes)
        # as_of: the messages hold every change up to this seq; a client skips live changes of
        # them up to it (they may reach it after this page).
        head = protocol.dumps({"type": "history", "room": self.room, "before": frame.before, "as_of": as_of})
        more = "true" if kept < len(frames) or len(rows) > limit else "false"
        # The message frames are the same JSON as message_dict's: joined, not encoded again.
        reply = f'{head[:-1]},"has_more":{more},"messages":[{",".join(frames[len(frames) - kept :])}]}}'
        self.guard.charge_bytes(len(reply))
        self.client.offer(reply)


class EarlyReplay:
    """A replay running ahead of its join's confirmation (RoomSession.replay_early), used as
    `async with`: `go` lets it send; leaving the block without `go` (the join was refused or
    failed) cancels it unsent, which gives its slot and pooled connection back."""

    # Running replays, held here until done: a socket kicked before its replay starts (revoked,
    # shutting down) does not await its task, and the loop keeps only weak references to tasks.
    _running: set[asyncio.Task[None]] = set()

    def __init__(self, session: RoomSession, after: int | None) -> None:
        self._online: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(session.replay(after=after, online=self._online))
        self._running.add(self.task)
        self.task.add_done_callback(self._running.discard)

    async def __aenter__(self) -> EarlyReplay:
        return self

    async def __aexit__(self, *_: object) -> None:
        if not self._online.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def go(self, online: list[str]) -> None:
        """The join is confirmed: send the replay, then `ready` with who is `online`."""
        self._online.set_result(online)

    async def wait(self) -> None:
        await self.task
