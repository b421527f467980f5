"""WebSocket routes: the room socket, and the FastAPI chapter's three examples upgraded
(tokens checked against the database, broadcast across processes, messages persisted)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, WebSocket, WebSocketDisconnect
from fastapi.exceptions import WebSocketRequestValidationError
from starlette.requests import HTTPConnection

from chat import deps, logs, metrics, protocol, socket_frames
from chat.auth import (
    Refused,
    SocketToken,
    SocketUser,
    check_origin,
    reading_token,
    refuse,
    room_identity,
    shutting_down,
)
from chat.client import Client
from chat.config import Settings
from chat.connection import Connection
from chat.hub import Hub
from chat.limits import FrameGuard, Limits, TokenBucket, TooManyConnections
from chat.membership import NoSuchRoom, RoomAccess
from chat.protocol import CLOSE_FLOOD, CLOSE_IDLE, CLOSE_REMOVED, MAX_BIGINT
from chat.service import UNSEEN, RoomSession, Unseen, admit, check_body, inflight_bound, inflight_bytes, open_room
from chat.store import TOKEN_PREFIX, Identity
from chat.subscription import Render, Subscription, chapter_render
from chat.writer import UNAVAILABLE, InFlight, NotStored, Stored

log = logging.getLogger("chat.ws")

router = APIRouter()
chapter = APIRouter()  # the FastAPI chapter's examples: off with CHAT_CHAPTER_ROUTES=false
Bigint = Annotated[int, Path(ge=-MAX_BIGINT, le=MAX_BIGINT)]

ROOM_NAME = socket_frames.ROOM_NAME  # the same rule in both socket protocols and the API
CHAPTER_ROOM = "_chapter"  # where /ws/{client_id} keeps its messages; no user room starts with "_"
# The room socket's `replay` parameter, and both sockets' `live`: `frames` (the default) sends
# one `message` frame per message; `batch` sends `messages` frames (fewer frames to send and to
# read): a replay's pages, and live messages that reach the process together (one commit's).
Framing = Literal["frames", "batch"]


def _receive_text_or_none(message: MutableMapping[str, Any]) -> str | None:
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(int(message.get("code") or 1000))
    text = message.get("text")
    return text if isinstance(text, str) else None


async def refuse_invalid(conn: HTTPConnection, exc: Exception) -> None:
    """A socket's path or query parameter failed validation: refuse it before accept with 400 and
    the reason, as any other refusal (FastAPI's default is a bare close, seen as 403)."""
    assert isinstance(exc, WebSocketRequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
    await refuse(conn, Refused(400, f"invalid {where}: {first.get('msg', 'not valid')}"))


def _connect(hub: Hub, limits: Limits, user: Identity, client: Client) -> FrameGuard:
    """What any socket holds while it is open: a connection slot of its user, and its place
    among the process's sockets (revocation, shutdown). Taken before accept; give it back with
    _disconnect. (Plain functions, not context managers: an idle socket keeps no extra frames.)"""
    if hub.closing:
        raise shutting_down()
    try:
        guard = limits.open(user.user_id)
    except TooManyConnections:
        raise Refused(429, "too many connections for this user") from None
    hub.attach(client)
    metrics.SOCKETS.inc()
    return guard


def _disconnect(hub: Hub, limits: Limits, user: Identity, client: Client) -> None:
    hub.detach(client)
    metrics.SOCKETS.dec()
    limits.close(user.user_id)


async def _join(
    shared: deps.SharedObjects,
    user: Identity,
    room: str,
    client: Client,
    *,
    render: Render | None = None,
    live_only: bool = False,
    events: bool = True,
    seen: RoomAccess | Unseen | None = UNSEEN,
    batch: bool = False,
    live_batch: bool = False,
) -> tuple[FrameGuard, Subscription]:
    """A socket of one room: its connection, and its place in the room's feed. Taken before
    accept, so that a connected client hears every message; give it back with _leave. The room
    is made last, once every other check has passed: a refused join leaves nothing behind.
    `seen`: the room as read with the user's token (room_identity)."""
    if not user.may_join(room):
        raise Refused(403, "room not allowed for this token")
    guard = _connect(shared.hub, shared.limits, user, client)
    try:
        try:
            room_id = await open_room(
                shared.engine, user=user, room=room, max_per_user=shared.settings.max_rooms_per_user, seen=seen
            )
        except NoSuchRoom:
            raise Refused(404, "no such room") from None
        if room_id is None:
            raise Refused(429, "too many rooms created by this user")
        sub = Subscription(
            client, room_id, room, render=render, live_only=live_only, events=events, batch=batch, live_batch=live_batch
        )
        await _enter(shared, sub)
    except BaseException:
        _disconnect(shared.hub, shared.limits, user, client)
        raise
    logs.event("open", room=room, user=user.name, token_id=user.token_id, client=logs.address(client.ws))
    return guard, sub


async def _enter(shared: deps.SharedObjects, sub: Subscription) -> None:
    try:
        await shared.hub.join(sub, timeout=shared.settings.join_timeout_seconds)
    except TimeoutError:
        raise Refused(503, "room not ready: try again") from None


def _leave(shared: deps.SharedObjects, user: Identity, sub: Subscription) -> None:
    client = sub.client
    shared.hub.leave(sub)
    seconds = f"{time.monotonic() - sub.since:.1f}"
    code, where = client.close_code, logs.address(client.ws)
    logs.event("close", room=sub.room, user=user.name, code=code, seconds=seconds, sent=client.sent, client=where)
    _disconnect(shared.hub, shared.limits, user, client)


@asynccontextmanager
async def _joined(
    shared: deps.SharedObjects,
    user: Identity,
    room: str,
    client: Client,
    *,
    render: Render | None = None,
    live_only: bool = False,
    events: bool = True,
) -> AsyncIterator[tuple[FrameGuard, Subscription]]:
    guard, sub = await _join(shared, user, room, client, render=render, live_only=live_only, events=events)
    try:
        yield guard, sub
    finally:
        _leave(shared, user, sub)


def _client(websocket: WebSocket, settings: Settings, user: Identity) -> Client:
    return Client(websocket, max_items=settings.socket_queue, max_bytes=settings.socket_queue_bytes, identity=user)


@router.websocket("/rooms/{room}/ws")
async def room_socket(
    websocket: WebSocket,
    room: str,
    token: SocketToken,
    shared: deps.Shared,  # one dependency, not six: see deps.SharedObjects
    after: Annotated[int | None, Query(ge=0, le=MAX_BIGINT)] = None,
    replay: Annotated[Framing, Query()] = "frames",
    live: Annotated[Framing, Query()] = "frames",
) -> None:
    settings, engine, hub, presence, writer = shared.settings, shared.engine, shared.hub, shared.presence, shared.writer
    # The token and the room in one read (a 401 still comes before any other refusal but a
    # shutdown's); a name that is not a room's never reaches the database.
    valid = ROOM_NAME.fullmatch(room) is not None
    with reading_token(hub):
        user, seen = await room_identity(engine, token, room if valid else None)
    if not valid:
        raise Refused(400, "invalid room name: 1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit")
    client = _client(websocket, settings, user)
    guard, sub = await _join(shared, user, room, client, seen=seen, batch=replay == "batch", live_batch=live == "batch")
    del seen
    try:
        session = RoomSession(
            settings=settings,
            engine=engine,
            hub=hub,
            identity=user,
            room_id=sub.room_id,
            room=room,
            client=sub,
            guard=guard,
            writer=writer,
        )
        # The replay reads its first page beside the presence enter, and sends nothing before
        # the enter has confirmed the join and the socket is accepted (refused: it is cancelled).
        entered = False  # counted in presence: to be taken out when the socket ends
        try:
            async with session.replay_early(after=after) as early:
                # As on /socket (chat/connection.py): a removal that committed after open_room's
                # check and whose event came before the join reached no subscription. The presence
                # enter looks again, under its lock, in the same round trip (None: not a member,
                # nothing counted).
                online = await presence.enter(sub.room_id, user, members_only=True, room=room)
                if online is None:
                    raise Refused(404, "no such room")
                entered = True
                await websocket.accept()
                # Who is online goes to the replay alone (its `ready` frame), not into a variable
                # of this frame, which lives as long as the socket: a room of 20 would keep 20 names.
                early.go(online)
                del online
            start = [early.wait]
            del early
            await client.serve(session.handle_weighed, start=start.pop())
        except WebSocketDisconnect:
            pass
        finally:
            if entered:  # a removed user goes offline at once; anyone else lingers (a reload)
                await presence.leave(sub.room_id, user, linger=client.close_code != CLOSE_REMOVED)
    finally:
        _leave(shared, user, sub)


@router.websocket("/socket")
async def socket(
    websocket: WebSocket, user: SocketUser, shared: deps.Shared, live: Annotated[Framing, Query()] = "frames"
) -> None:
    """One socket for many rooms: subscribe, unsubscribe, and room frames naming their room."""
    settings, hub, limits, presence, writer = shared.settings, shared.hub, shared.limits, shared.presence, shared.writer
    client = _client(websocket, settings, user)
    guard = _connect(hub, limits, user, client)
    try:
        connection = Connection(
            settings=settings,
            hub=hub,
            presence=presence,
            writer=writer,
            identity=user,
            client=client,
            guard=guard,
            live_batch=live == "batch",
        )
        try:
            await websocket.accept()
            await client.serve(connection.handle)
        except WebSocketDisconnect:
            pass
        finally:
            await connection.close()
    finally:
        _disconnect(hub, limits, user, client)


# --- the FastAPI chapter's examples -----------------------------------------------------------


def masked(token: str) -> str:
    """A token as page script may see it: enough to tell tokens apart, never enough to use one
    (the cookie is HttpOnly; echoing it whole would hand it to any script on the page)."""
    return f"{TOKEN_PREFIX}…{token[-4:]}"


@chapter.websocket("/ws")
async def echo(websocket: WebSocket, settings: deps.Settings, limits: deps.Limits) -> None:
    """Example 1: answers each text with `Message text was: {data}`. No token, so it gets the
    anonymous controls: the Origin check, a cap per client address, a rate limit, an idle timeout."""
    check_origin(websocket, settings)
    address = websocket.client.host if websocket.client else "unknown"
    if not limits.addresses.take(address):
        raise Refused(429, "too many connections from this address")
    try:
        bucket = TokenBucket(settings.rate_per_second, settings.rate_burst)
        refused_in_a_row = 0
        await websocket.accept()
        while True:
            try:
                message = await asyncio.wait_for(websocket.receive(), settings.echo_idle_seconds)
            except TimeoutError:
                await websocket.close(CLOSE_IDLE, f"idle: nothing received for {settings.echo_idle_seconds:g}s")
                return
            text = _receive_text_or_none(message)
            if wait := bucket.take(time.monotonic()):
                metrics.REFUSALS.labels("rate_limited").inc()
                refused_in_a_row += 1
                if refused_in_a_row > settings.flood_close_after:
                    metrics.REFUSALS.labels("flood").inc()
                    await websocket.close(CLOSE_FLOOD, "flood: too many frames while rate limited")
                    return
                reply = f"Error: slow down, retry in {wait:.1f}s"
            else:
                refused_in_a_row = 0
                reply = f"Message text was: {text}" if text is not None else "binary frames are not supported"
            # Bounded too: a client that sends but never reads would otherwise hold its slot forever.
            try:
                await asyncio.wait_for(websocket.send_text(reply), settings.echo_idle_seconds)
            except TimeoutError:
                return
    except WebSocketDisconnect:
        pass
    finally:
        limits.addresses.give_back(address)


@chapter.websocket("/items/{item_id}/ws")
async def items(
    websocket: WebSocket,
    item_id: str,
    token: SocketToken,
    user: SocketUser,
    settings: deps.Settings,
    hub: deps.Hub,
    limits: deps.Limits,
    q: Annotated[int | None, Query(ge=-MAX_BIGINT, le=MAX_BIGINT)] = None,
) -> None:
    """Example 2: dependencies; the token must be a live one from the tokens table. Under the
    room socket's controls: the user's connection cap, the rate limit, and revocation (4001)."""
    client = _client(websocket, settings, user)
    guard = _connect(hub, limits, user, client)  # the token watcher closes it with 4001 once revoked

    async def handle(data: str | None) -> None:
        if refused := admit(guard, client):
            client.offer(f"Error: slow down, retry in {refused.retry_after:.1f}s")
            return
        client.offer(f"Session cookie or query token value is: {masked(token)}")
        if q is not None:
            client.offer(f"Query parameter q is: {q}")
        client.offer(f"Message text was: {data}, for item ID: {item_id}")

    try:
        await websocket.accept()
        await client.serve(handle)
    except WebSocketDisconnect:
        pass
    finally:
        _disconnect(hub, limits, user, client)


@chapter.websocket("/ws/{client_id}")
async def clients(
    websocket: WebSocket,
    client_id: Bigint,
    user: SocketUser,
    shared: deps.Shared,
) -> None:
    """Example 3: broadcast to every client in every process; persisted in the `_chapter` room."""
    settings, writer = shared.settings, shared.writer
    client = _client(websocket, settings, user)
    joined = _joined(shared, user, CHAPTER_ROOM, client, render=chapter_render, live_only=True, events=False)
    async with joined as (guard, sub):
        room_id = sub.room_id
        # Pipelined like the room socket: each message goes to the writer and the loop reads on;
        # a message the database did not take gets a line saying so (in the order sent).
        inflight = InFlight(inflight_bound(settings), client.offer, max_bytes=inflight_bytes(settings))
        client.settle = inflight.settle

        async def handle(data: str | None) -> None:
            if refused := admit(guard, client):
                client.offer(f"Error: slow down, retry in {refused.retry_after:.1f}s")
                return
            if data is None:
                client.offer("binary frames are not supported")
                return
            try:
                check_body(data, max_bytes=settings.max_message_bytes)
            except protocol.BadFrame as exc:
                client.offer(f"Error: {exc.detail}")
                return
            # The chapter's echo goes out at once, before the broadcast of the same message.
            client.offer(f"You wrote: {data}")
            await inflight.reserve()
            stored = writer.submit(
                room_id=room_id,
                author_id=user.user_id,
                author=user.name,
                body=f"Client #{client_id} says: {data}",
            )
            inflight.add(stored, lambda done: not_stored(done, data), len(data))

        await websocket.accept()
        await client.serve(handle)
    try:
        await writer.submit(
            room_id=room_id,
            author_id=user.user_id,
            author=user.name,
            body=f"Client #{client_id} left the chat",
            kind="notice",
        )
    except NotStored as exc:
        log.warning("the chapter's leave notice was not stored: %s", exc.detail)


def not_stored(done: asyncio.Future[Stored], data: str) -> str | None:
    """The chapter socket's line for a message the database did not take (None: it did)."""
    error = done.exception()
    if error is None:
        return None
    if isinstance(error, NotStored) and error.code != UNAVAILABLE:
        reason = error.detail
    else:
        reason = "the database did not take it; send it again"
    metrics.REFUSALS.labels(error.code if isinstance(error, NotStored) else UNAVAILABLE).inc()
    return f"Error: your message was not stored ({reason}): {data}"
