"""WebSocket routes: the room socket, and the FastAPI chapter's three examples upgraded
(tokens checked against the database, broadcast across processes, messages persisted)."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect

from chat import logs, metrics, protocol, store
from chat.auth import Refused, SocketToken, SocketUser
from chat.client import Client, Item, RoomEvent
from chat.db import engine_of
from chat.limits import FrameGuard, TooManyConnections
from chat.service import RoomSession, admit, check_body
from chat.store import Identity, MessageRecord

router = APIRouter()

ROOM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
CHAPTER_ROOM = "_chapter"  # where /ws/{client_id} keeps its messages; no user room starts with "_"


def _receive_text_or_none(message: MutableMapping[str, Any]) -> str | None:
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(int(message.get("code") or 1000))
    text = message.get("text")
    return text if isinstance(text, str) else None


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
    async with engine_of(websocket).connect() as conn:
        room_id = await store.room_id(conn, name=room)
    assert room_id is not None
    try:
        guard = state.limits.open(user.user_id)
    except TooManyConnections:
        raise Refused(429, "too many connections for this user") from None
    opened = time.monotonic()
    try:
        await state.hub.join(room_id, room, client)
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
    after: Annotated[int | None, Query(ge=0)] = None,
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

    def render(item: Item) -> str | None:
        if isinstance(item, MessageRecord):
            return item.body
        return None if isinstance(item, RoomEvent) else item

    client = Client(websocket, queue_size=state.settings.socket_queue, render=render, identity=user, live_only=True)
    async with _joined(websocket, user, CHAPTER_ROOM, client) as (guard, room_id):

        async def post(body: str, kind: str) -> None:
            async with state.engine.connect() as conn:
                appended = await store.append_message(
                    conn,
                    room_id=room_id,
                    author_id=user.user_id,
                    author=user.name,
                    body=body,
                    kind=kind,
                    notify=state.hub.database_notifies,
                )
            await state.hub.published(room_id, [appended.message])

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
