"""The baseline: the FastAPI chapter's example 3 broadcast, speaking our room protocol's frames.

A plain list of sockets per room in one process: no persistence, no auth, no queues. On a
`send` it answers the sender (the chapter's "You wrote", here an `ack`), then sends the
message frame to every socket in the room one after another, as the chapter's
ConnectionManager.broadcast does. Seqs count per room in memory.

    uvicorn bench.inmemory_app:app --ws websockets-sansio
"""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

app = FastAPI(title="in-memory broadcast baseline")

rooms: dict[str, list[WebSocket]] = {}
last_seq: dict[str, int] = {}


def dumps(frame: dict[str, object]) -> str:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


@app.get("/readyz")
async def readyz() -> dict[str, object]:
    return {"status": "ok", "sockets": sum(len(members) for members in rooms.values())}


@app.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    """A bare accept, as on the chat server."""
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(f"Message text was: {await websocket.receive_text()}")
    except WebSocketDisconnect:
        pass


@app.websocket("/rooms/{room}/ws")
async def room_socket(websocket: WebSocket, room: str) -> None:
    await websocket.accept()
    members = rooms.setdefault(room, [])
    members.append(websocket)
    await websocket.send_text(dumps({"type": "ready", "room": room, "user": "anon", "last_seq": last_seq.get(room, 0)}))
    try:
        while True:
            frame = json.loads(await websocket.receive_text())
            kind = frame.get("type")
            if kind == "send":
                seq = last_seq[room] = last_seq.get(room, 0) + 1
                client_id = frame.get("client_id")
                await websocket.send_text(
                    dumps({"type": "ack", "client_id": client_id, "seq": seq, "duplicate": False})
                )
                message = dumps(
                    {
                        "type": "message",
                        "room": room,
                        "seq": seq,
                        "author": "anon",
                        "kind": "text",
                        "body": frame.get("body"),
                        "sent_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                        "client_id": client_id,
                    }
                )
                for member in list(members):
                    with contextlib.suppress(Exception):  # a member that just left; the chapter's loop would stop
                        await member.send_text(message)
            elif kind == "ping":
                await websocket.send_text(dumps({"type": "pong"}))
            elif kind == "history":
                await websocket.send_text(dumps({"type": "history", "room": room, "messages": []}))
    except WebSocketDisconnect:
        pass
    finally:
        members.remove(websocket)
