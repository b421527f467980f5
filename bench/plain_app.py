"""The plain durable server: the same job as chat's hot path, written as plainly as this stack
allows, to show what the stack itself costs (the `plain` scenario).

Like the chat server it checks the token in the database before it accepts, replays the room's
last 50 messages, stores every send durably (one writer per process: whatever is waiting goes in
as one multi-row INSERT, acked after the commit) into the same `messages` table with the same
triggers, and fans out through Postgres NOTIFY to every process. It is written on asyncpg alone
(no SQLAlchemy), and leaves out everything else the chat server does:

- no presence (join/leave events), typing, reads, edits, history or `/socket`;
- no rate limits, no bound on sends in flight or on a socket's outgoing frames;
- no `client_id` idempotency, no retry after a failed commit (the senders get an error);
- no catch-up of messages committed while a socket joins (the bench joins quiet rooms), and no
  resync after the listener's connection drops.

So it is a floor, not a server to run: what one message and one join cost on uvicorn, asyncpg
and Postgres before any of the guarantees in the README.

    DATABASE_URL=postgresql://... uvicorn bench.plain_app:app --ws websockets-sansio
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

REPLAY = 50
MAX_BATCH = 500

# One round trip per join: the token (with its user), the room, the membership and the room's
# last REPLAY messages (oldest first), as JSON.
JOIN = f"""
SELECT u.id AS user_id, u.name, t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now()) AS valid,
       t.rooms, r.id AS room_id, r.last_seq, mb.user_id IS NOT NULL AS member,
       (SELECT coalesce(json_agg(x ORDER BY x.seq), '[]') FROM (
            SELECT seq, author, kind, body, client_id, created_at AS sent_at FROM messages
            WHERE room_id = r.id AND kind IN ('text', 'notice') ORDER BY seq DESC LIMIT {REPLAY}
        ) x)::text AS replay
FROM tokens t JOIN users u ON u.id = t.user_id
LEFT JOIN rooms r ON r.name = $2
LEFT JOIN memberships mb ON mb.room_id = r.id AND mb.user_id = u.id
WHERE t.hash = $1
"""
ENTER = """
WITH room AS (
    INSERT INTO rooms (name, created_by) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
    RETURNING id, last_seq
), member AS (
    INSERT INTO memberships (user_id, room_id) SELECT $2, id FROM room ON CONFLICT DO NOTHING
)
SELECT id, last_seq FROM room
"""
# Rows in (room, arrival) order, so that two processes' writers lock rooms in the same order.
INSERT = """
INSERT INTO messages (room_id, author_id, author, body, client_id)
SELECT room_id, author_id, author, body, client_id
FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[])
    WITH ORDINALITY AS t(room_id, author_id, author, body, client_id, ord)
WHERE set_config('chat.notify', 'room', true) = 'room'
ORDER BY room_id, ord
RETURNING room_id, seq
"""


def dumps(frame: dict[str, Any]) -> str:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


@dataclass(slots=True)
class Send:
    ws: WebSocket
    room_id: int
    author_id: int
    author: str
    body: str
    client_id: str | None


@dataclass
class State:
    pool: asyncpg.Pool | None = None
    listener: asyncpg.Connection | None = None
    writer: asyncpg.Connection | None = None
    waiting: asyncio.Queue[Send] = field(default_factory=asyncio.Queue)
    rooms: dict[int, tuple[str, list[WebSocket]]] = field(default_factory=dict)  # id -> (name, sockets)
    sending: set[asyncio.Future[None]] = field(default_factory=set)
    listening: asyncio.Lock = field(default_factory=asyncio.Lock)  # one LISTEN/UNLISTEN at a time


state = State()


def _notified(_: object, __: int, channel: str, payload: str) -> None:
    """A NOTIFY from the trigger: one frame, sent to every socket of the room in this process."""
    room = state.rooms.get(int(channel[5:]))
    if room is None:
        return
    data = json.loads(payload)
    if "seq" not in data or "ref" in data or data.get("target_seq") is not None:
        return  # chat's room events, a message too big for NOTIFY, an edit: the plain server has none
    frame = dumps(
        {
            "type": "message",
            "room": room[0],
            "seq": data["seq"],
            "author": data["author"],
            "kind": data["kind"],
            "body": data["body"],
            "sent_at": data["sent_at"],
            "client_id": data["client_id"],
        }
    )
    _spawn([(ws, frame) for ws in room[1]])


def _spawn(frames: list[tuple[WebSocket, str]]) -> None:
    task = asyncio.ensure_future(_send_all(frames))
    state.sending.add(task)  # the loop keeps only a weak reference
    task.add_done_callback(state.sending.discard)


async def _send_all(frames: list[tuple[WebSocket, str]]) -> None:
    """One after another, as the FastAPI chapter's broadcast does (a socket gone is skipped)."""
    for ws, frame in frames:
        with contextlib.suppress(Exception):
            await ws.send_text(frame)


async def _write() -> None:
    """The process's writer: everything waiting, as one INSERT (one commit), then the acks."""
    while True:
        batch = [await state.waiting.get()]
        while len(batch) < MAX_BATCH and not state.waiting.empty():
            batch.append(state.waiting.get_nowait())
        assert state.writer is not None
        try:
            rows = await state.writer.fetch(
                INSERT,
                [s.room_id for s in batch],
                [s.author_id for s in batch],
                [s.author for s in batch],
                [s.body for s in batch],
                [s.client_id for s in batch],
            )
        except (asyncpg.PostgresError, OSError) as exc:
            error = {"type": "error", "code": "unavailable", "detail": str(exc)}
            _spawn([(s.ws, dumps({**error, "client_id": s.client_id})) for s in batch])
            continue
        seqs: dict[int, list[int]] = {}
        for row in rows:
            seqs.setdefault(row["room_id"], []).append(row["seq"])
        for room_seqs in seqs.values():
            room_seqs.sort(reverse=True)
        acks = []
        for send in batch:  # a room's seqs in arrival order
            ack = {"type": "ack", "client_id": send.client_id, "seq": seqs[send.room_id].pop(), "duplicate": False}
            acks.append((send.ws, dumps(ack)))
        _spawn(acks)


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    dsn = os.environ["DATABASE_URL"]  # a libpq URL
    state.pool = await asyncpg.create_pool(dsn, min_size=2, max_size=10)
    state.listener = await asyncpg.connect(dsn)
    state.writer = await asyncpg.connect(dsn)
    writer = asyncio.create_task(_write())
    try:
        yield
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await state.writer.close()
        await state.listener.close()
        await state.pool.close()


app = FastAPI(title="plain durable server", lifespan=lifespan)


@app.get("/readyz")
async def readyz() -> dict[str, object]:
    return {"status": "ok", "sockets": sum(len(sockets) for _, sockets in state.rooms.values())}


@app.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    """A bare accept, as on the chat server."""
    await websocket.accept()
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            await websocket.send_text(f"Message text was: {await websocket.receive_text()}")


@app.websocket("/rooms/{room}/ws")
async def room_socket(websocket: WebSocket, room: str) -> None:
    assert state.pool is not None and state.listener is not None
    raw = websocket.cookies.get("session") or websocket.query_params.get("token") or ""
    async with state.pool.acquire() as conn:
        row = await conn.fetchrow(JOIN, hashlib.sha256(raw.encode()).digest(), room)
        if row is None or not row["valid"] or (row["rooms"] is not None and room not in row["rooms"]):
            await websocket.close(4001, "invalid token")
            return
        room_id, last_seq, replay = row["room_id"], row["last_seq"], row["replay"]
        if room_id is None or not row["member"]:
            room_id, last_seq = await conn.fetchrow(ENTER, room, row["user_id"])
    await websocket.accept()
    for message in json.loads(replay) if replay else ():
        await websocket.send_text(dumps({"type": "message", "room": room, **message}))
        last_seq = message["seq"] if message["seq"] > last_seq else last_seq
    entry = state.rooms.get(room_id)
    if entry is None:
        entry = state.rooms[room_id] = (room, [])
        async with state.listening:
            await state.listener.add_listener(f"room_{room_id}", _notified)
    entry[1].append(websocket)
    await websocket.send_text(dumps({"type": "ready", "room": room, "user": row["name"], "last_seq": last_seq}))
    try:
        while True:
            frame = json.loads(await websocket.receive_text())
            kind = frame.get("type")
            if kind == "send":
                body = frame.get("body")
                if not isinstance(body, str):
                    await websocket.send_text(dumps({"type": "error", "code": "bad_frame", "detail": "no body"}))
                    continue
                client_id = frame.get("client_id")
                state.waiting.put_nowait(Send(websocket, room_id, row["user_id"], row["name"], body, client_id))
            elif kind == "ping":
                await websocket.send_text(dumps({"type": "pong"}))
    except WebSocketDisconnect:
        pass
    finally:
        entry[1].remove(websocket)
        if not entry[1] and state.rooms.get(room_id) is entry:
            del state.rooms[room_id]
            async with state.listening:
                await state.listener.remove_listener(f"room_{room_id}", _notified)
