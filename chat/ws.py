"""WebSocket routes: the room socket, and the FastAPI chapter's three examples upgraded
(tokens checked against the database, broadcast across processes, messages persisted)."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect

from chat import logs, metrics, protocol, socket_frames, store
from chat.auth import Refused, SocketToken, SocketUser
from chat.client import Client
from chat.connection import Connection
from chat.db import engine_of
from chat.limits import FrameGuard, TooManyConnections
from chat.service import RoomSession, admit, check_body
from chat.store import Identity
from chat.subscription import Render, Subscription, chapter_render

router = APIRouter()

ROOM_NAME = socket_frames.ROOM_NAME  # the same rule in both socket protocols and the API
CHAPTER_ROOM = "_chapter"  # where /ws/{client_id} keeps its messages; no user room starts with "_"


def _receive_text_or_none(message: MutableMapping[str, Any]) -> str | None:
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(int(message.get("code") or 1000))
    text = message.get("text")
    return text if isinstance(text, str) else None


async def _room_id(websocket: WebSocket, user: Identity, room: str) -> int:
    """The room's id (made if new), if this token may join it; else Refused(403)."""
    if not user.may_join(room):
        raise Refused(403, "room not allowed for this token")
    async with engine_of(websocket).connect() as conn:
        room_id = await store.room_id(conn, name=room)
    assert room_id is not None
    return room_id


def _connect(websocket: WebSocket, user: Identity, client: Client) -> FrameGuard:
    """What any socket holds while it is open: a connection slot of its user, and its place
    among the process's sockets (revocation, shutdown). Taken before accept; give it back with
    _disconnect. (Plain functions, not context managers: an idle socket keeps no extra frames.)"""
    state = websocket.app.state
    if state.hub.closing:
        raise Refused(503, "server shutting down: try again")  # the client reconnects elsewhere
    try:
        guard: FrameGuard = state.limits.open(user.user_id)
    except TooManyConnections:
        raise Refused(429, "too many connections for this user") from None
    state.hub.attach(client)
    metrics.SOCKETS.inc()
    return guard


def _disconnect(websocket: WebSocket, user: Identity, client: Client) -> None:
    state = websocket.app.state
    state.hub.detach(client)
    metrics.SOCKETS.dec()
    state.limits.close(user.user_id)


async def _join(
    websocket: WebSocket,
    user: Identity,
    room: str,
    client: Client,
    *,
    render: Render,
    live_only: bool = False,
    events: bool = True,
) -> tuple[FrameGuard, Subscription]:
    """A socket of one room: its connection, and its place in the room's feed. Taken before
    accept, so that a connected client hears every message; give it back with _leave."""
    if websocket.app.state.hub.closing:
        raise Refused(503, "server shutting down: try again")
    room_id = await _room_id(websocket, user, room)
    guard = _connect(websocket, user, client)
    sub = Subscription(client, room_id, room, render=render, live_only=live_only, events=events)
    try:
        await websocket.app.state.hub.join(sub)
    except BaseException:
        _disconnect(websocket, user, client)
        raise
    logs.event("open", room=room, user=user.name, token_id=user.token_id)
    return guard, sub


def _leave(websocket: WebSocket, user: Identity, sub: Subscription) -> None:
    client = sub.client
    websocket.app.state.hub.leave(sub)
    seconds = f"{time.monotonic() - sub.since:.1f}"
    logs.event("close", room=sub.room, user=user.name, code=client.close_code, seconds=seconds, sent=client.sent)
    _disconnect(websocket, user, client)


@asynccontextmanager
async def _joined(
    websocket: WebSocket,
    user: Identity,
    room: str,
    client: Client,
    *,
    render: Render,
    live_only: bool = False,
    events: bool = True,
) -> AsyncIterator[tuple[FrameGuard, Subscription]]:
    guard, sub = await _join(websocket, user, room, client, render=render, live_only=live_only, events=events)
    try:
        yield guard, sub
    finally:
        _leave(websocket, user, sub)


def _client(websocket: WebSocket, user: Identity) -> Client:
    settings = websocket.app.state.settings
    return Client(websocket, max_items=settings.socket_queue, max_bytes=settings.socket_queue_bytes, identity=user)


async def _weighed(session: RoomSession, guard: FrameGuard, text: str | None) -> None:
    """A room socket's frame, then its size charged: big frames cost more (the debt delays the
    next ones)."""
    await session.handle(text)
    if text is not None:
        guard.charge_bytes(len(text))


@router.websocket("/rooms/{room}/ws")
async def room_socket(
    websocket: WebSocket,
    room: str,
    user: SocketUser,
    after: Annotated[int | None, Query(ge=0)] = None,
) -> None:
    if not ROOM_NAME.fullmatch(room):
        raise Refused(400, "invalid room name: 1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit")
    state = websocket.app.state
    client = _client(websocket, user)
    render = functools.partial(protocol.message_frame, room)
    guard, sub = await _join(websocket, user, room, client, render=render)
    try:
        session = RoomSession(
            settings=state.settings,
            engine=state.engine,
            hub=state.hub,
            identity=user,
            room_id=sub.room_id,
            room=room,
            client=sub,
            guard=guard,
        )
        handle = functools.partial(_weighed, session, guard)
        online = await state.presence.enter(sub.room_id, user)
        try:
            await websocket.accept()
            await client.serve(handle, start=functools.partial(session.replay, after=after, online=online))
        except WebSocketDisconnect:
            pass
        finally:
            await state.presence.leave(sub.room_id, user)
    finally:
        _leave(websocket, user, sub)


@router.websocket("/socket")
async def socket(websocket: WebSocket, user: SocketUser) -> None:
    """One socket for many rooms: subscribe, unsubscribe, and room frames naming their room."""
    state = websocket.app.state
    client = _client(websocket, user)
    guard = _connect(websocket, user, client)
    try:
        connection = Connection(
            settings=state.settings,
            hub=state.hub,
            presence=state.presence,
            identity=user,
            client=client,
            guard=guard,
        )
        try:
            await websocket.accept()
            await client.serve(connection.handle)
        except WebSocketDisconnect:
            pass
        finally:
            await connection.close()
    finally:
        _disconnect(websocket, user, client)


# --- the FastAPI chapter's examples -----------------------------------------------------------


@router.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    """Example 1: answers each text with `Message text was: {data}`."""
    await websocket.accept()
    try:
        while True:
            text = _receive_text_or_none(await websocket.receive())
            await websocket.send_text(
                f"Message text was: {text}" if text is not None else "binary frames are not supported"
            )
    except WebSocketDisconnect:
        pass


@router.websocket("/items/{item_id}/ws")
async def items(websocket: WebSocket, item_id: str, token: SocketToken, user: SocketUser, q: int | None = None) -> None:
    """Example 2: dependencies; the token must be a live one from the tokens table."""
    await websocket.accept()
    try:
        while True:
            data = _receive_text_or_none(await websocket.receive())
            await websocket.send_text(f"Session cookie or query token value is: {token}")
            if q is not None:
                await websocket.send_text(f"Query parameter q is: {q}")
            await websocket.send_text(f"Message text was: {data}, for item ID: {item_id}")
    except WebSocketDisconnect:
        pass


@router.websocket("/ws/{client_id}")
async def clients(websocket: WebSocket, client_id: int, user: SocketUser) -> None:
    """Example 3: broadcast to every client in every process; persisted in the `_chapter` room."""
    state = websocket.app.state
    client = _client(websocket, user)
    joined = _joined(websocket, user, CHAPTER_ROOM, client, render=chapter_render, live_only=True, events=False)
    async with joined as (guard, sub):
        room_id = sub.room_id

        async def post(body: str, kind: str) -> None:
            async with state.engine.connect() as conn:
                await store.append_message(
                    conn, room_id=room_id, author_id=user.user_id, author=user.name, body=body, kind=kind
                )

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
            client.offer(f"You wrote: {data}")
            await post(f"Client #{client_id} says: {data}", "text")
            metrics.MESSAGES_IN.inc()

        await websocket.accept()
        await client.serve(handle)
    await post(f"Client #{client_id} left the chat", "notice")
