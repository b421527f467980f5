"""The room protocol on one server: replay, resume, send and ack, and bad input."""

from __future__ import annotations

import asyncio
import json

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import MakeToken, unique
from tests.roomclient import RoomClient
from tests.servers import Server

HISTORY_ON_JOIN = 50  # the default of CHAT_HISTORY_ON_JOIN
ROOM_BODIES = text("SELECT body FROM messages JOIN rooms ON rooms.id = room_id WHERE name = :n ORDER BY seq")


async def test_send_is_stored_acknowledged_and_delivered_to_all(server_a: Server, make_token: MakeToken) -> None:
    room = server_a.ws(f"/rooms/{unique('r')}/ws")
    alice_name = unique("alice")
    alice, bob = await make_token(alice_name), await make_token()
    async with await RoomClient.open(room, alice) as a, await RoomClient.open(room, bob) as b:
        await a.ready()
        await b.ready()
        await a.send("hello", client_id="c1")
        ack = await a.until("ack")
        assert (ack["client_id"], ack["seq"], ack["duplicate"]) == ("c1", 1, False)
        for client in (a, b):
            message = await client.until("message")
            assert (message["seq"], message["body"], message["kind"]) == (1, "hello", "text")
            assert message["author"] == alice_name  # from the token, never from the client


async def test_history_replayed_on_join_then_live(server_a: Server, make_token: MakeToken) -> None:
    room = server_a.ws(f"/rooms/{unique('r')}/ws")
    token = await make_token()
    async with await RoomClient.open(room, token) as writer:
        await writer.ready()
        for i in range(1, 61):
            await writer.send(f"m{i}")
        await writer.until_seq(60)
    async with await RoomClient.open(room, token) as late:
        ready = await late.ready()
        assert late.seqs() == list(range(61 - HISTORY_ON_JOIN, 61))
        assert late.bodies()[-1] == "m60"
        assert ready["last_seq"] == 60
        await late.send("live")
        await late.until_seq(61)
        assert late.seqs()[-1] == 61


async def test_resume_after_seq_while_others_send(server_a: Server, make_token: MakeToken) -> None:
    """A client passing `after` gets exactly what follows, with no gap and no duplicate, even
    while two other clients are sending."""
    room = server_a.ws(f"/rooms/{unique('r')}/ws")
    tokens = [await make_token() for _ in range(3)]
    per_sender = 150
    async with await RoomClient.open(room, tokens[0]) as s1, await RoomClient.open(room, tokens[1]) as s2:
        await s1.ready()
        await s2.ready()
        for i in range(10):
            await s1.send(f"before{i}")
        await s1.until_seq(10)

        async def send_all(client: RoomClient, name: str) -> None:
            for i in range(per_sender):
                await client.send(f"{name}-{i}")
                if i % 10 == 0:
                    await asyncio.sleep(0)

        senders = asyncio.gather(send_all(s1, "s1"), send_all(s2, "s2"))
        resumed = []
        for after in (3, 7, 10):  # several joins racing the senders
            client = await RoomClient.open(room, tokens[2], after=after)
            resumed.append((after, client))
        await senders
        total = 10 + 2 * per_sender
        for after, client in resumed:
            await client.until_seq(total)
            assert client.seqs() == list(range(after + 1, total + 1)), f"after={after}"
            await client.close()


async def test_resend_with_same_client_id_is_stored_once(
    server_a: Server, make_token: MakeToken, engine: AsyncEngine
) -> None:
    name = unique("r")
    room = server_a.ws(f"/rooms/{name}/ws")
    async with await RoomClient.open(room, await make_token()) as c:
        await c.ready()
        await c.send("once", client_id="same")
        first = await c.until("ack")
        await c.send("once", client_id="same")
        second = await c.until("ack")
        assert (first["seq"], first["duplicate"]) == (1, False)
        assert (second["seq"], second["duplicate"]) == (1, True)
        await c.send("next")
        assert (await c.until("ack"))["seq"] == 2  # the refused duplicate left no gap
    async with engine.connect() as conn:
        count = await conn.scalar(
            text("SELECT count(*) FROM messages JOIN rooms ON rooms.id = room_id WHERE name = :n"),
            {"n": name},
        )
    assert count == 2


async def test_malformed_input_gets_errors_and_changes_nothing(
    server_a: Server, make_token: MakeToken, engine: AsyncEngine
) -> None:
    name = unique("r")
    room = server_a.ws(f"/rooms/{name}/ws")
    bad = [
        ("not json", "invalid_json"),
        (json.dumps([1, 2]), "invalid_frame"),
        (json.dumps({"type": "shout", "body": "x"}), "unknown_type"),
        (json.dumps({"body": "x"}), "unknown_type"),
        (json.dumps({"type": "send"}), "invalid_frame"),
        (json.dumps({"type": "send", "body": 5}), "invalid_frame"),
        (json.dumps({"type": "send", "body": "x", "author": "mallory"}), "invalid_frame"),
        (json.dumps({"type": "send", "body": "x" * 16385}), "too_large"),
        (json.dumps({"type": "send", "body": "€" * 5462}), "too_large"),  # 16,386 bytes, 5,462 characters
        (json.dumps({"type": "send", "body": "   "}), "empty"),
        (json.dumps({"type": "send", "body": "a\u0000b"}), "invalid_text"),
        (json.dumps({"type": "send", "body": "x", "client_id": "c" * 65}), "invalid_frame"),
    ]
    async with await RoomClient.open(room, await make_token()) as c:
        await c.ready()
        for frame, code in bad:
            await c.ws.send(frame)
            error = await c.until("error")
            assert error["code"] == code, frame[:80]
        await c.send("   ", client_id="e1")
        assert (await c.until("error"))["client_id"] == "e1"  # errors answering a send name it
        await c.ws.send(b"\x00\x01binary")
        assert (await c.until("error"))["code"] == "binary_not_supported"
        # The socket is still usable, and nothing was written.
        await c.send("fine")
        assert (await c.until("ack"))["seq"] == 1
    async with engine.connect() as conn:
        bodies = (await conn.scalars(ROOM_BODIES, {"n": name})).all()
    assert bodies == ["fine"]


async def test_message_over_the_notify_limit_is_delivered(server_a: Server, make_token: MakeToken) -> None:
    room = server_a.ws(f"/rooms/{unique('r')}/ws")
    big = "€" * 5000  # 15,000 bytes: too big for a NOTIFY payload, so it travels by reference
    a = await RoomClient.open(room, await make_token())
    b = await RoomClient.open(room, await make_token())
    async with a, b:
        await a.ready()
        await b.ready()
        await a.send("small")
        await a.send(big)
        await a.send("after")
        for client in (a, b):
            await client.until_seq(3)
            assert client.bodies() == ["small", big, "after"]


async def test_history_request_pages_back(server_a: Server, make_token: MakeToken) -> None:
    room = server_a.ws(f"/rooms/{unique('r')}/ws")
    async with await RoomClient.open(room, await make_token()) as c:
        await c.ready()
        for i in range(1, 31):
            await c.send(f"m{i}")
        await c.until_seq(30)
        await c.ws.send(json.dumps({"type": "history", "before": 11, "limit": 5}))
        page = await c.until("history")
        assert [m["seq"] for m in page["messages"]] == [6, 7, 8, 9, 10]
        await c.ws.send(json.dumps({"type": "history", "before": 3, "limit": 50}))
        assert [m["seq"] for m in (await c.until("history"))["messages"]] == [1, 2]


async def test_invalid_room_name_is_refused(server_a: Server, make_token: MakeToken) -> None:
    from tests.test_auth import refusal

    token = await make_token()
    for name in ("_chapter", "-x", "a" * 65, "sp%20ace"):
        status, reason = await refusal(server_a.ws(f"/rooms/{name}/ws?token={token}"))
        assert status == 400 and reason.startswith("invalid room name"), name
