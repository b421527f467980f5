"""One socket for many rooms (`/socket`): routes each frame by its room to that room's session.

A subscribe is authorised like a room socket's join (token room scopes, the rooms-per-socket
limit); a refusal is an error frame naming the room, and the socket stays open. Each room has
its own Subscription (cursor, replay) and RoomSession (sends, history, typing); the socket
shares one outgoing queue, one connection slot and one rate-limit guard across its rooms.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from chat import logs, metrics, notify, protocol, socket_frames
from chat.client import Client
from chat.config import Settings
from chat.hub import Hub
from chat.limits import FrameGuard
from chat.membership import NoSuchRoom
from chat.presence import Presence
from chat.protocol import BadFrame, PingFrame
from chat.service import RoomSession, admit, inflight_bound, inflight_bytes, open_room
from chat.socket_frames import (
    RoomDeleteFrame,
    RoomEditFrame,
    RoomFrame,
    RoomHistoryFrame,
    RoomReactFrame,
    RoomReadFrame,
    RoomSendFrame,
    RoomUnreactFrame,
    SubscribeFrame,
    UnsubscribeFrame,
)
from chat.store import Identity
from chat.subscription import Subscription
from chat.writer import InFlight, Writer

log = logging.getLogger("chat.connection")

SUBSCRIBES_AT_ONCE = 4  # per socket


class Connection:
    def __init__(
        self,
        *,
        settings: Settings,
        hub: Hub,
        presence: Presence,
        writer: Writer,
        identity: Identity,
        client: Client,
        guard: FrameGuard,
        live_batch: bool = False,
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.presence = presence
        self.writer = writer
        # One bound on sends in flight for the whole socket, whatever the room; their answers,
        # and the errors that answer frames, go out in the order the frames came in.
        self.inflight = InFlight(inflight_bound(settings), client.offer, max_bytes=inflight_bytes(settings))
        client.settle = self.inflight.settle  # a graceful close flushes their acks first
        self.identity = identity
        self.client = client
        self.guard = guard
        self.live_batch = live_batch  # ?live=batch: see Subscription.stage
        self.rooms: dict[str, RoomSession] = {}  # by name
        # Subscribes not yet answered, by room: queued (in order) or under way in one of at most
        # SUBSCRIBES_AT_ONCE workers. A burst of 50 is 50 frames in a queue, not 50 tasks (the
        # tasks' frames, all alive at once, raised the process's memory for good).
        self._pending: dict[str, SubscribeFrame] = {}
        self._queued: deque[SubscribeFrame] | None = None
        self._workers: set[asyncio.Task[None]] | None = None  # made on the first subscribe
        self._settle: asyncio.Event | None = None  # set when a subscribe ends, for _settled()
        self._leaving: set[asyncio.Task[None]] = set()  # presence updates of rooms removed from
        # The user's room list changed (an invite, a new DM, a removal): the page reads it again.
        hub.follow_user(identity.user_id, self._rooms_changed)
        self._on_removed = self._removed  # one bound method for all its rooms, not one per room

    def _rooms_changed(self) -> None:
        self.client.offer(notify.ROOMS_CHANGED)

    def error(self, code: str, detail: str, **extra: Any) -> None:
        self.inflight.answer(protocol.error_frame(code, detail, **extra))

    async def handle(self, text: str | None) -> None:
        if refused := admit(self.guard, self.client):
            self.inflight.answer(refused.frame())
            return
        if text is None:
            self.error("binary_not_supported", "send JSON text frames")
            return
        self.guard.charge_bytes(len(text))
        try:
            frame = socket_frames.parse(text)
        except BadFrame as exc:
            metrics.REFUSALS.labels(exc.code).inc()
            self.error(exc.code, exc.detail, **protocol.client_id_of(text))
            return
        if isinstance(frame, PingFrame):
            self.client.offer(protocol.dumps({"type": "pong"}))
        elif isinstance(frame, SubscribeFrame):
            self.subscribe(frame)
        elif isinstance(frame, UnsubscribeFrame):
            await self._settled(frame.room)
            await self.unsubscribe(frame.room)
        else:
            await self._settled(frame.room)
            await self.in_room(frame)

    async def _settled(self, room: str) -> None:
        """Until a subscribe of `room` under way is done (answered with ready or an error)."""
        while room in self._pending:
            settle = self._settle
            if settle is None:
                settle = self._settle = asyncio.Event()
            await settle.wait()

    async def in_room(self, frame: RoomFrame) -> None:
        session = self.rooms.get(frame.room)
        changes = (RoomEditFrame, RoomDeleteFrame, RoomReactFrame, RoomUnreactFrame)
        extra = {"client_id": frame.client_id} if isinstance(frame, (RoomSendFrame, *changes)) else {}
        if session is None:
            self.error("not_subscribed", "subscribe to the room first", room=frame.room, **extra)
            return
        try:
            if isinstance(frame, RoomSendFrame):
                await session.send(frame)
            elif isinstance(frame, changes):
                await session.change(frame)
            elif isinstance(frame, RoomHistoryFrame):
                await session.history(frame)
            elif isinstance(frame, RoomReadFrame):
                session.read(frame.seq)
            else:
                await session.typing()
        except BadFrame as exc:
            metrics.REFUSALS.labels(exc.code).inc()
            self.error(exc.code, exc.detail, room=frame.room, **extra)

    def subscribe(self, frame: SubscribeFrame) -> None:
        """Check a subscribe, then run it beside the socket's other frames (a few at a time per
        socket, so that one socket's burst of subscribes cannot take the pool)."""
        room, user = frame.room, self.identity
        if room in self.rooms or room in self._pending:
            self.error("already_subscribed", "already subscribed to this room", room=room)
            return
        if not socket_frames.ROOM_NAME.fullmatch(room):
            detail = "invalid room name: 1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit"
            self.error("invalid_room", detail, room=room)
            return
        if not user.may_join(room):
            metrics.REFUSALS.labels("room not allowed for this token").inc()
            self.error("forbidden", "room not allowed for this token", room=room)
            return
        if len(self.rooms) + len(self._pending) >= self.settings.socket_rooms_max:
            detail = f"at most {self.settings.socket_rooms_max} rooms per socket: unsubscribe from one first"
            self.error("too_many_rooms", detail, room=room)
            return
        self._pending[room] = frame
        queued = self._queued
        if queued is None:
            queued = self._queued = deque()
        queued.append(frame)
        workers = self._workers
        if workers is None:
            workers = self._workers = set()
        if len(workers) < SUBSCRIBES_AT_ONCE:
            task = asyncio.create_task(self._subscribe_queued())
            workers.add(task)
            task.add_done_callback(workers.discard)

    async def _subscribe_queued(self) -> None:
        """A subscribe worker: runs the queued subscribes in the order they came, until none is left."""
        while self._queued:
            frame = self._queued.popleft()
            if not self._queued:
                self._queued = None  # a socket between bursts keeps no queue
            try:
                if not self.client.closing:
                    await self._join(frame)
            except Exception:  # a bug: say so in the log, and answer the client
                log.exception("subscribe to %r failed", frame.room)
                self.error("unavailable", "could not subscribe: try again", room=frame.room)
            finally:
                self._pending.pop(frame.room, None)
                if (settle := self._settle) is not None:
                    self._settle = None
                    settle.set()

    async def _join(self, frame: SubscribeFrame) -> None:
        room, user = frame.room, self.identity
        # A user back in a room this process holds for them (a reload, a reconnect, another tab):
        # its id is known here, and the presence look, which rechecks the membership anyway,
        # confirms it by the room's name in the same round trip: one round trip less than the
        # room check below. Not confirmed (renamed, say): the long way.
        held = self.presence.held(room, user.user_id)
        if held is not None and await self._subscribe(frame, held, rejoin=True):
            return
        try:
            room_id = await open_room(
                self.hub.engine, user=user, room=room, max_per_user=self.settings.max_rooms_per_user
            )
        except NoSuchRoom:
            self._no_such_room(room)
            return
        except Exception as exc:
            log.warning("subscribing to %r failed: %r", room, exc)
            self.error("unavailable", "could not subscribe: try again", room=room)
            return
        if room_id is None:
            metrics.REFUSALS.labels("too many rooms created by this user").inc()
            self.error("too_many_rooms_created", "too many rooms created by this user", room=room)
            return
        await self._subscribe(frame, room_id)

    def _no_such_room(self, room: str) -> None:
        # A private room answers a non-member as a room that cannot be had, saying no more.
        metrics.REFUSALS.labels("no such room").inc()
        self.error("no_such_room", "no such room", room=room)

    async def _subscribe(self, frame: SubscribeFrame, room_id: int, *, rejoin: bool = False) -> bool:
        """Subscribe to the room `room_id`: the feed, the presence enter (which rechecks the
        membership) beside the replay's first page, then the replay. With `rejoin` (the id is
        presence.held()'s guess), False if the enter did not confirm the room: nothing is left
        behind, and nothing was answered."""
        room, user = frame.room, self.identity
        sub = Subscription(self.client, room_id, room, tag=True, batch=True, live_batch=self.live_batch)
        removed = asyncio.Event()  # until the room is this socket's (below), a removal only notes it
        sub.on_removed = lambda _: removed.set()
        try:
            await self.hub.join(sub, timeout=self.settings.join_timeout_seconds)
        except TimeoutError:
            metrics.REFUSALS.labels("room not ready").inc()
            self.error("unavailable", "room not ready: try again", room=room)
            return True
        if removed.is_set():
            self.hub.leave(sub)
            if not rejoin:
                self._no_such_room(room)
            return not rejoin
        session = RoomSession(
            settings=self.settings,
            engine=self.hub.engine,
            hub=self.hub,
            identity=user,
            room_id=room_id,
            room=room,
            client=sub,
            guard=self.guard,
            writer=self.writer,
            inflight=self.inflight,
        )
        # The replay reads its first page beside the presence enter; it sends nothing before
        # the enter has confirmed the subscription (refused: it is cancelled on leaving the block).
        async with session.replay_early(after=frame.after) as replay:
            try:
                # A removal that committed after open_room's check, and whose event this process
                # handled before the join, reached no subscription: the presence enter looks again
                # under its lock, now that the feed has ours (a removal's event is published after
                # its commit), in the same round trip. None: not a member, nothing counted.
                if rejoin:
                    online = await self.presence.rejoin(room_id, room, user)
                else:
                    online = await self.presence.enter(room_id, user, members_only=True, room=room)
            except Exception as exc:
                log.warning("presence of %r failed: %r", room, exc)
                self.hub.leave(sub)
                self.error("unavailable", "could not subscribe: try again", room=room)
                return True
            if online is None:
                self.hub.leave(sub)
                if not rejoin:
                    self._no_such_room(room)
                return not rejoin
            if removed.is_set():  # removed meanwhile (the hub has taken the subscription out already)
                await self.presence.leave(room_id, user, linger=False)
                self.error("removed", "you were removed from this room", room=room)
                return True
            self.rooms[room] = session
            sub.on_removed = self._on_removed
            logs.event("open", room=room, user=user.name, token_id=user.token_id, client=logs.address(self.client.ws))
            replay.go(online)
        await replay.wait()
        return True

    async def unsubscribe(self, room: str) -> None:
        if room not in self.rooms:
            self.error("not_subscribed", "not subscribed to this room", room=room)
            return
        await self._leave(room)
        self.client.offer(protocol.dumps({"type": "unsubscribed", "room": room}))

    async def _leave(self, room: str) -> None:
        session = self.rooms.pop(room)
        sub = session.client
        self.hub.leave(sub)
        seconds = f"{time.monotonic() - sub.since:.1f}"
        code, where = self.client.close_code, logs.address(self.client.ws)
        logs.event("close", room=room, user=self.identity.name, code=code, seconds=seconds, client=where)
        await self.presence.leave(session.room_id, self.identity)

    def _removed(self, sub: Subscription) -> None:
        """The user was removed from the room (the hub has taken the subscription out of the
        feed): the room ends on this socket now, with an error frame saying why."""
        room = sub.room
        session = self.rooms.get(room)
        if session is None or session.client is not sub:
            return
        del self.rooms[room]
        self.error("removed", "you were removed from this room", room=room)
        task = asyncio.create_task(self.presence.leave(session.room_id, self.identity, linger=False))
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    async def close(self) -> None:
        """The socket ended: stop the subscribes under way, and leave every room."""
        self.hub.unfollow_user(self.identity.user_id, self._rooms_changed)
        self._queued = None  # the subscribes not yet started never will be
        workers = list(self._workers or ())
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._pending.clear()
        for room in list(self.rooms):
            await self._leave(room)
