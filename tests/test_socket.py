"""One socket for many rooms (`/socket`, chat/connection.py and chat/socket_frames.py) against
real servers: subscribe, unsubscribe and resume per room across two processes, refusals that
leave the other rooms working, the rooms-per-socket limit, error frames for bad frames, and a
rejoin by a room id remembered from the linger (rename, removal)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from chat import store
from tests.conftest import MakeToken, unique
from tests.roomclient import RoomClient
from tests.servers import Server
from tests.test_membership import users
from tests.test_writer import commit_together


async def send(client: RoomClient, **frame: Any) -> None:
    await client.ws.send(json.dumps(frame))


def messages(client: RoomClient, room: str) -> list[tuple[int, str]]:
    """Live `message` frames and replayed `messages` batches, in order."""
    found: list[tuple[int, str]] = []
    for f in client.frames:
        if f["type"] == "messages" and f["room"] == room:
            assert all(m["type"] == "message" and m["room"] == room for m in f["messages"])
            found += [(m["seq"], m["body"]) for m in f["messages"]]
        elif f["type"] == "message" and f["room"] == room:
            found.append((f["seq"], f["body"]))
    return found


async def test_subscribe_unsubscribe_and_resume_per_room_across_processes(
    server_a: Server, server_b: Server, make_token: MakeToken
) -> None:
    token = await make_token()
    r1, r2 = unique("mx"), unique("mx")
    async with (
        await RoomClient.open(server_a.ws("/socket"), token) as reader,
        await RoomClient.open(server_b.ws("/socket"), await make_token()) as writer,
    ):
        for room in (r1, r2):
            await send(reader, type="subscribe", room=room)
            assert (await reader.ready())["room"] == room
            await send(writer, type="subscribe", room=room)
            await writer.until("ready", room=room)
        for i in range(3):
            for room in (r1, r2):
                await send(writer, type="send", room=room, body=f"{room} {i}", client_id=f"{room}-{i}")
                ack = await writer.until("ack", client_id=f"{room}-{i}")
                assert ack["room"] == room and ack["seq"] == i + 1
        for room in (r1, r2):
            await reader.until("message", room=room, seq=3)
            assert messages(reader, room) == [(i + 1, f"{room} {i}") for i in range(3)]
        assert all("room" in f for f in reader.frames if f["type"] != "pong")

        await send(reader, type="unsubscribe", room=r2)
        await reader.until("unsubscribed", room=r2)
        await send(writer, type="send", room=r2, body="after unsubscribe", client_id="u2")
        await writer.until("ack", client_id="u2")
        await send(writer, type="send", room=r1, body="still here", client_id="u1")
        await reader.until("message", room=r1, seq=4)  # r2's message went out before this one
        assert [b for _, b in messages(reader, r2)] == [f"{r2} {i}" for i in range(3)]

        last = {room: messages(reader, room)[-1][0] for room in (r1, r2)}
        await reader.close()
        for room in (r1, r2):  # missed while away: r2's unsubscribed message, then two more each
            for i in range(2):
                await send(writer, type="send", room=room, body=f"missed {i}", client_id=f"{room}-m{i}")
                await writer.until("ack", client_id=f"{room}-m{i}")

    async with await RoomClient.open(server_b.ws("/socket"), token) as resumed:
        for room in (r1, r2):
            await send(resumed, type="subscribe", room=room, after=last[room])
            ready = await resumed.until("ready", room=room)
            assert ready["last_seq"] == 6
        assert messages(resumed, r1) == [(5, "missed 0"), (6, "missed 1")]
        assert messages(resumed, r2) == [(4, "after unsubscribe"), (5, "missed 0"), (6, "missed 1")]
        replays = [f for f in resumed.frames if f["type"] == "messages"]
        assert [f["room"] for f in replays] == [r1, r2]  # one batch each: the replay's frame


async def test_a_refused_subscribe_leaves_the_other_rooms_working(
    server_a: Server, engine: AsyncEngine, make_token: MakeToken
) -> None:
    allowed, other = unique("ok"), unique("no")
    async with engine.connect() as conn:
        _, scoped = await store.create_token(conn, user_name=unique("scoped"), ttl=None, rooms=[allowed])
    async with await RoomClient.open(server_a.ws("/socket"), scoped) as client:
        await send(client, type="subscribe", room=allowed)
        await client.until("ready", room=allowed)
        await send(client, type="subscribe", room=other)
        error = await client.until("error", room=other)
        assert error["code"] == "forbidden"
        await send(client, type="send", room=other, body="nope", client_id="x")
        assert (await client.until("error", room=other))["code"] == "not_subscribed"
        await send(client, type="send", room=allowed, body="fine", client_id="y")
        await client.until("ack", client_id="y", room=allowed)
        await client.until("message", room=allowed, body="fine")
        assert client.close_code is None


@pytest.fixture(scope="module")
def two_rooms_server(database_url: str, tmp_root: Path) -> Iterator[Server]:
    server = Server(database_url, tmp_root, env={"CHAT_SOCKET_ROOMS_MAX": "2"})
    yield server
    server.stop()


async def test_rooms_per_socket_are_limited(two_rooms_server: Server, make_token: MakeToken) -> None:
    rooms = [unique("lim") for _ in range(3)]
    async with await RoomClient.open(two_rooms_server.ws("/socket"), await make_token()) as client:
        for room in rooms[:2]:
            await send(client, type="subscribe", room=room)
            await client.until("ready", room=room)
        await send(client, type="subscribe", room=rooms[2])
        assert (await client.until("error", room=rooms[2]))["code"] == "too_many_rooms"
        await send(client, type="unsubscribe", room=rooms[0])
        await client.until("unsubscribed", room=rooms[0])
        await send(client, type="subscribe", room=rooms[2])
        await client.until("ready", room=rooms[2])


async def test_bad_frames_get_error_frames_and_the_socket_stays_open(server_a: Server, make_token: MakeToken) -> None:
    room = unique("bad")
    async with await RoomClient.open(server_a.ws("/socket"), await make_token()) as client:
        await send(client, type="subscribe", room=room)
        await client.until("ready", room=room)
        cases: list[tuple[str | bytes, str]] = [
            ("not json", "invalid_json"),
            ("[1, 2]", "invalid_frame"),
            (json.dumps({"type": "dance", "room": room}), "unknown_type"),
            (json.dumps({"type": "send", "body": "no room"}), "invalid_frame"),
            (json.dumps({"type": "subscribe", "room": "bad room!"}), "invalid_room"),
            (json.dumps({"type": "subscribe", "room": room}), "already_subscribed"),
            (json.dumps({"type": "subscribe", "room": room + "x", "after": 2**64}), "invalid_frame"),
            (json.dumps({"type": "unsubscribe", "room": room + "x"}), "not_subscribed"),
            (json.dumps({"type": "history", "room": room + "x", "before": 5}), "not_subscribed"),
            (json.dumps({"type": "send", "room": room, "body": "   "}), "empty"),
            (b"\x00binary", "binary_not_supported"),
        ]
        for raw, code in cases:
            await client.ws.send(raw)
            error = await client.until("error")
            assert error["code"] == code, (raw, error)
        await send(client, type="ping")
        await client.until("pong")
        await send(client, type="send", room=room, body="still open", client_id="z")
        await client.until("ack", client_id="z")


async def test_a_burst_of_subscribes_then_a_send_right_away(server_a: Server, make_token: MakeToken) -> None:
    """Subscribes run beside each other (a few at a time per socket); a frame for a room whose
    subscribe is under way waits for it instead of being refused."""
    rooms = [unique("burst") for _ in range(10)]
    async with await RoomClient.open(server_a.ws("/socket"), await make_token()) as client:
        for room in rooms:
            await send(client, type="subscribe", room=room)
        await send(client, type="send", room=rooms[-1], body="right away", client_id="now")
        assert (await client.until("ack", client_id="now"))["room"] == rooms[-1]
        for room in rooms:
            await client.until("ready", room=room)
        await client.until("message", room=rooms[-1], body="right away")
        assert not [f for f in client.frames if f["type"] == "error"]


async def test_live_batch_on_the_socket_of_many_rooms(
    server_a: Server, server_b: Server, make_token: MakeToken, database_url: str
) -> None:
    """`/socket?live=batch`: sends that commit together reach the socket as one `messages` frame
    naming its room, after the room's `ready`; the messages are the room socket's, in order."""
    room = unique("mx-live")
    async with (
        await RoomClient.open(server_a.ws(f"/rooms/{room}/ws"), await make_token()) as sender,
        await RoomClient.open(server_b.ws("/socket?live=batch"), await make_token()) as reader,
    ):
        await sender.ready()
        await send(reader, type="subscribe", room=room)
        await reader.until("ready", room=room)
        acks = await commit_together(sender, database_url, room, [f"x{n}" for n in range(5)], "x")
        async with asyncio.timeout(15):
            while len(messages(reader, room)) < 5:
                await reader.until("messages", room=room)
        assert messages(reader, room) == [(a["seq"], f"x{n}") for n, a in enumerate(acks)]
        live = reader.frames[[f["type"] for f in reader.frames].index("ready") + 1 :]
        assert max(len(f["messages"]) for f in live if f["type"] == "messages") >= 4


async def test_a_rejoin_within_the_linger_checks_the_rooms_name_and_membership(
    server_a: Server, make_token: MakeToken
) -> None:
    """A subscribe of a room this process still holds for the user (unsubscribed a moment ago,
    within the presence linger) takes the room's id from memory, and the presence look confirms
    it: a room renamed meanwhile is not joined by its old name (a new room of that name is), and
    a member removed meanwhile is refused."""
    async with users(server_a, make_token, "owner", "member") as (owner, member):
        old, new = unique("rj"), unique("rj")
        assert (await owner.api.post("/rooms", json={"name": old, "visibility": "private"})).status_code == 201
        await owner.api.post(f"/rooms/{old}/members", json={"user": member.name})
        async with (
            await RoomClient.open(server_a.ws("/socket"), owner.token) as mine,
            await RoomClient.open(server_a.ws("/socket"), member.token) as theirs,
        ):
            for client in (mine, theirs):
                await send(client, type="subscribe", room=old)
                await client.until("ready", room=old)
            await send(mine, type="send", room=old, body="said before the rename", client_id="b")
            await mine.until("ack", client_id="b")
            await mine.until("message", room=old, body="said before the rename")
            for client in (mine, theirs):
                await send(client, type="unsubscribe", room=old)
                await client.until("unsubscribed", room=old)
            said = {client: messages(client, old) for client in (mine, theirs)}
            assert said[mine][-1][1] == "said before the rename"

            assert (await owner.api.patch(f"/rooms/{old}", json={"name": new})).status_code == 200
            assert (await owner.api.delete(f"/rooms/{new}/members/{member.name}")).status_code == 200

            await send(mine, type="subscribe", room=old)  # a new public room of the old name
            assert (await mine.until("ready", room=old))["last_seq"] == 0
            assert messages(mine, old) == said[mine]  # nothing replayed the second time
            await send(mine, type="subscribe", room=new)
            await mine.until("ready", room=new)
            assert "said before the rename" in [body for _, body in messages(mine, new)]

            await send(theirs, type="subscribe", room=new)  # removed meanwhile
            assert (await theirs.until("error", room=new))["code"] == "no_such_room"
            await send(theirs, type="subscribe", room=old)  # the new room of that name: not the old one
            await theirs.until("ready", room=old)
            assert messages(theirs, old) == said[theirs]
