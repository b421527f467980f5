"""WebSocket routes: the room socket, and the FastAPI chapter's three examples upgraded
(tokens checked against the database, broadcast across processes, messages persisted)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, WebSocket, WebSocketDisconnect
from fastapi.exceptions import WebSocketRequestValidationError
from starlette.requests import HTTPConnection

from chat import logs, metrics, protocol, store
from chat.auth import Refused, SocketToken, SocketUser, check_origin, refuse
from chat.client import Client, Item, RoomEvent
from chat.db import engine_of
from chat.limits import FrameGuard, TokenBucket, TooManyConnections
from chat.protocol import CLOSE_FLOOD, CLOSE_IDLE, MAX_BIGINT
from chat.revocation import OUTSIDE_ROOMS
from chat.service import RoomSession, admit, check_body, inflight_bound
from chat.store import TOKEN_PREFIX, Identity, MessageRecord
from chat.writer import UNAVAILABLE, InFlight, NotStored, Stored, writer_of

log = logging.getLogger("chat.ws")

router = APIRouter()
chapter = APIRouter()  # the FastAPI chapter's examples: off with CHAT_CHAPTER_ROUTES=false
Bigint = Annotated[int, Path(ge=-MAX_BIGINT, le=MAX_BIGINT)]

ROOM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
CHAPTER_ROOM = "_chapter"  # where /ws/{client_id} keeps its messages; no user room starts with "_"


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


@asynccontextmanager
async def _joined(
    websocket: WebSocket, user: Identity, room: str, client: Client
) -> AsyncIterator[tuple[FrameGuard, int]]:
    """What a socket holds while it is open: a connection slot of its user, and its place in
    the room's feed. Taken before accept, so that a connected client hears every message."""
    state = websocket.app.state
    if state.hub.closing:
        raise Refused(503, "server shutting down: try again")  # the client reconnects elsewhere
    if not user.may_join(room):
        raise Refused(403, "room not allowed for this token")
    try:
        guard = state.limits.open(user.user_id)
    except TooManyConnections:
        raise Refused(429, "too many connections for this user") from None
    opened = time.monotonic()
    try:
        # The room is made last, once every check has passed: a refused join leaves nothing behind.
        async with engine_of(websocket).connect() as conn:
            room_id = await store.room_id(conn, name=room, create=False)
            if room_id is None:
                creator = None if room.startswith("_") else user.user_id  # "_…": the server's own
                room_id = await store.create_room(
                    conn, name=room, creator_id=creator, max_per_user=state.settings.max_rooms_per_user
                )
        if room_id is None:
            raise Refused(429, "too many rooms created by this user")
        try:
            await state.hub.join(room_id, room, client, timeout=state.settings.join_timeout_seconds)
        except TimeoutError:
            raise Refused(503, "room not ready: try again") from None
        metrics.SOCKETS.inc()
        logs.event("open", room=room, user=user.name, token_id=user.token_id)
        try:
            yield guard, room_id
        finally:
            state.hub.leave(room_id, client)
            metrics.SOCKETS.dec()
            seconds = f"{time.monotonic() - opened:.1f}"
            logs.event("close", room=room, user=user.name, code=client.close_code, seconds=seconds, sent=client.sent)
    finally:
        state.limits.close(user.user_id)


@router.websocket("/rooms/{room}/ws")
async def room_socket(
    websocket: WebSocket,
    room: str,
    user: SocketUser,
    after: Annotated[int | None, Query(ge=0, le=MAX_BIGINT)] = None,
) -> None:
    if not ROOM_NAME.fullmatch(room):
        raise Refused(400, "invalid room name: 1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit")
    state = websocket.app.state

    def render(item: Item) -> str:
        if isinstance(item, MessageRecord):
            return protocol.message_frame(room, item)
        return item.frame if isinstance(item, RoomEvent) else item

    client = Client(websocket, queue_size=state.settings.socket_queue, render=render, identity=user)
    async with _joined(websocket, user, room, client) as (guard, room_id):
        session = RoomSession(
            settings=state.settings,
            engine=state.engine,
            hub=state.hub,
            identity=user,
            room_id=room_id,
            room=room,
            client=client,
            guard=guard,
            writer=writer_of(websocket),
        )
        online = await state.presence.enter(room_id, user)
        try:
            await websocket.accept()
            await session.replay(after=after, online=online)
            await client.serve(session.handle)
        except WebSocketDisconnect:
            pass
        finally:
            await state.presence.leave(room_id, user)


# --- the FastAPI chapter's examples -----------------------------------------------------------


def masked(token: str) -> str:
    """A token as page script may see it: enough to tell tokens apart, never enough to use one
    (the cookie is HttpOnly; echoing it whole would hand it to any script on the page)."""
    return f"{TOKEN_PREFIX}…{token[-4:]}"


@chapter.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    """Example 1: answers each text with `Message text was: {data}`. No token, so it gets the
    anonymous controls: the Origin check, a cap per client address, a rate limit, an idle timeout."""
    check_origin(websocket)
    state = websocket.app.state
    settings = state.settings
    address = websocket.client.host if websocket.client else "unknown"
    if not state.limits.addresses.take(address):
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
        state.limits.addresses.give_back(address)


@chapter.websocket("/items/{item_id}/ws")
async def items(
    websocket: WebSocket,
    item_id: str,
    token: SocketToken,
    user: SocketUser,
    q: Annotated[int | None, Query(ge=-MAX_BIGINT, le=MAX_BIGINT)] = None,
) -> None:
    """Example 2: dependencies; the token must be a live one from the tokens table. Under the
    room socket's controls: the user's connection cap, the rate limit, and revocation (4001)."""
    state = websocket.app.state
    if state.hub.closing:
        raise Refused(503, "server shutting down: try again")
    try:
        guard = state.limits.open(user.user_id)
    except TooManyConnections:
        raise Refused(429, "too many connections for this user") from None
    client = Client(
        websocket,
        queue_size=state.settings.socket_queue,
        render=lambda i: i if isinstance(i, str) else None,
        identity=user,
    )

    async def handle(data: str | None) -> None:
        if refused := admit(guard, client):
            client.offer(f"Error: slow down, retry in {refused.retry_after:.1f}s")
            return
        client.offer(f"Session cookie or query token value is: {masked(token)}")
        if q is not None:
            client.offer(f"Query parameter q is: {q}")
        client.offer(f"Message text was: {data}, for item ID: {item_id}")

    OUTSIDE_ROOMS.add(client)  # the token watcher closes it with 4001 once revoked or expired
    try:
        await websocket.accept()
        await client.serve(handle)
    except WebSocketDisconnect:
        pass
    finally:
        OUTSIDE_ROOMS.discard(client)
        state.limits.close(user.user_id)


@chapter.websocket("/ws/{client_id}")
async def clients(websocket: WebSocket, client_id: Bigint, user: SocketUser) -> None:
    """Example 3: broadcast to every client in every process; persisted in the `_chapter` room."""
    state = websocket.app.state

    def render(item: Item) -> str | None:
        if isinstance(item, MessageRecord):
            return item.body
        return None if isinstance(item, RoomEvent) else item

    client = Client(websocket, queue_size=state.settings.socket_queue, render=render, identity=user, live_only=True)
    writer = writer_of(websocket)
    async with _joined(websocket, user, CHAPTER_ROOM, client) as (guard, room_id):
        # Pipelined like the room socket: each message goes to the writer and the loop reads on;
        # a message the database did not take gets a line saying so (in the order sent).
        inflight = InFlight(inflight_bound(state.settings), client.offer)
        client.settle = inflight.settle

        async def handle(data: str | None) -> None:
            if refused := admit(guard, client):
                client.offer(f"Error: slow down, retry in {refused.retry_after:.1f}s")
                return
            if data is None:
                client.offer("binary frames are not supported")
                return
            try:
                check_body(data, max_bytes=state.settings.max_message_bytes)
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
            inflight.add(stored, lambda done: not_stored(done, data))

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
