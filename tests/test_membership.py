"""Membership against real servers (chat/membership.py, chat/roomapi.py): the access matrix over
HTTP, both socket routes and search; removal that ends a member's sockets at once; read
positions and unread counts across two processes; mentions; and the room list's query plan."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.exceptions import InvalidStatus

from chat import membership, store
from tests.conftest import MakeToken, unique
from tests.roomclient import RoomClient
from tests.servers import Server
from tests.test_changes import acked, request
from tests.test_history_api import explain, nodes


async def send(client: RoomClient, **frame: Any) -> None:
    await client.ws.send(json.dumps(frame))


@asynccontextmanager
async def api_of(server: Server, token: str) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=f"{server.http}/api", headers=headers, timeout=30) as client:
        yield client


class User:
    def __init__(self, name: str, token: str, api: httpx.AsyncClient) -> None:
        self.name, self.token, self.api = name, token, api


@asynccontextmanager
async def users(server: Server, make_token: MakeToken, *prefixes: str) -> AsyncIterator[list[User]]:
    made = []
    clients = []
    for prefix in prefixes:
        name = unique(prefix)
        token = await make_token(name)
        client = httpx.AsyncClient(
            base_url=f"{server.http}/api", headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        clients.append(client)
        made.append(User(name, token, client))
    try:
        yield made
    finally:
        for client in clients:
            await client.aclose()


async def my_rooms(user: User) -> dict[str, dict[str, Any]]:
    response = await user.api.get("/me/rooms")
    assert response.status_code == 200, response.text
    return {r["name"]: r for r in response.json()}


async def all_rooms(user: User) -> set[str]:
    """Every name GET /api/rooms lists for the user, page by page."""
    names: list[str] = []
    while True:
        params: dict[str, Any] = {"limit": 500, **({"after": names[-1]} if names else {})}
        page = [r["name"] for r in (await user.api.get("/rooms", params=params)).json()]
        if not page:
            return set(names)
        names += page


async def subscribe(server: Server, user: User, room: str) -> tuple[RoomClient, dict[str, Any]]:
    """A /socket subscribed (or refused): the client and its ready or error frame."""
    client = await RoomClient.open(server.ws("/socket"), user.token)
    await send(client, type="subscribe", room=room)
    async with asyncio.timeout(15):
        while True:
            for frame in client.frames:
                if frame.get("room") == room and frame["type"] in ("ready", "error"):
                    return client, frame
            await asyncio.sleep(0.05)


SECRET = "the secret word is marmalade (edited)"
CHANGES = ("reply", "edit", "react", "unreact", "delete")


async def change_frames(client: RoomClient, room: str, secret: int, *, allowed: bool, missing: str) -> list[bool]:
    """Each change frame of issue 12 naming `room` on a /socket: for a member, acked (a reply of
    their own, edited, a reaction to the secret taken back, the reply deleted); for anyone else,
    the very answer that the same frame naming a room that does not exist gets."""
    if allowed:
        reply = await request(client, {"type": "send", "body": "a reply", "reply_to": secret}, room=room)
        frames = [
            {"type": "edit", "target_seq": reply.get("seq"), "body": "a reply, edited"},
            {"type": "react", "target_seq": secret, "emoji": "🎉"},
            {"type": "unreact", "target_seq": secret, "emoji": "🎉"},
            {"type": "delete", "target_seq": reply.get("seq")},
        ]
        answers = [reply] + [await request(client, frame, room=room) for frame in frames]
        return [answer["type"] == "ack" for answer in answers]
    frames = [
        {"type": "send", "body": "a reply", "reply_to": secret},
        {"type": "edit", "target_seq": secret, "body": "mine now"},
        {"type": "react", "target_seq": secret, "emoji": "🎉"},
        {"type": "unreact", "target_seq": secret, "emoji": "👍"},
        {"type": "delete", "target_seq": secret},
    ]
    ok = []
    for frame in frames:
        there = await request(client, {**frame, "client_id": "same"}, room=room)
        nowhere = await request(client, {**frame, "client_id": "same"}, room=missing)
        ok.append(there["type"] == "error" and {**there, "room": missing} == nowhere)
    return ok


async def test_the_access_matrix_leaks_nothing(server_a: Server, server_b: Server, make_token: MakeToken) -> None:
    async with users(server_a, make_token, "owner", "member", "outsider") as (owner, member, outsider):
        public, private = unique("pub"), unique("priv")
        for name, visibility in ((public, "public"), (private, "private")):
            made = await owner.api.post("/rooms", json={"name": name, "visibility": visibility})
            assert made.status_code == 201, made.text
            added = await owner.api.post(f"/rooms/{name}/members", json={"user": member.name})
            assert added.json()["changed"] is True
        dm = (await owner.api.post("/dms", json={"user": member.name})).json()
        assert dm["dm_with"] == member.name and dm["visibility"] == "private"
        again = (await member.api.post("/dms", json={"user": owner.name})).json()
        assert again["name"] == dm["name"] and again["dm_with"] == owner.name  # found, listed under the other
        secrets: dict[str, int] = {}
        for room in (public, private, dm["name"]):
            async with await RoomClient.open(server_a.ws(f"/rooms/{room}/ws"), owner.token) as ws:
                await ws.ready()
                secret = secrets[room] = await acked(ws, {"type": "send", "body": "the secret word is marmalade"})
                await acked(ws, {"type": "edit", "target_seq": secret, "body": SECRET})  # history follows changes
                await acked(ws, {"type": "react", "target_seq": secret, "emoji": "👍"})

        checks = leaks = 0
        missing = unique("nothing")
        for user in (owner, member, outsider):
            listed = await all_rooms(user)
            mine = set(await my_rooms(user))
            for room in (public, private, dm["name"]):
                allowed = user is not outsider or room == public
                answers = {
                    "messages": await user.api.get(f"/rooms/{room}/messages"),
                    "search": await user.api.get(f"/rooms/{room}/search", params={"q": "marmalade"}),
                    "members": await user.api.get(f"/rooms/{room}/members"),
                }
                nothing = {
                    "messages": await user.api.get(f"/rooms/{missing}/messages"),
                    "search": await user.api.get(f"/rooms/{missing}/search", params={"q": "marmalade"}),
                    "members": await user.api.get(f"/rooms/{missing}/members"),
                }
                for what, response in answers.items():
                    checks += 1
                    if allowed:
                        assert response.status_code == 200, (what, room, response.text)
                    elif response.status_code != 404 or response.json() != nothing[what].json():
                        leaks += 1
                if allowed:
                    assert [h["body"] for h in answers["search"].json()["results"]] == [SECRET]
                    shown = next(m for m in answers["messages"].json()["messages"] if m["seq"] == secrets[room])
                    assert shown["body"] == SECRET and shown["edited_at"]
                checks += 2
                leaks += (room in listed) != allowed
                if room == public and user is outsider:
                    assert room not in mine  # listed, but not joined yet
                else:
                    leaks += (room in mine) != allowed
                for server in (server_a, server_b):
                    client, answer = await subscribe(server, user, room)
                    checks += 1
                    if allowed:
                        assert answer["type"] == "ready", answer
                        assert [m["body"] for f in client.frames if f["type"] == "messages" for m in f["messages"]]
                    else:
                        leaks += answer != {
                            "type": "error",
                            "code": "no_such_room",
                            "detail": "no such room",
                            "room": room,
                        }
                        leaks += any(f["type"] in ("message", "messages") for f in client.frames)
                    # Changes (issue 12): a member's are taken; a non-member's are answered exactly as
                    # for a room that does not exist, and nothing of the room reaches them.
                    changes = await change_frames(client, room, secrets[room], allowed=allowed, missing=missing)
                    checks += len(changes)
                    leaks += sum(not ok for ok in changes)
                    if not allowed:
                        leaks += any(
                            f.get("room") == room and f["type"] in ("message", "messages") for f in client.frames
                        )
                    await client.close()
                    checks += 1
                    try:
                        async with await RoomClient.open(server.ws(f"/rooms/{room}/ws"), user.token) as ws:
                            await ws.ready()
                            leaks += not allowed
                    except InvalidStatus as exc:
                        leaks += allowed or exc.response.status_code != 404
        print(f"access matrix: {checks} checks, {leaks} leaks")
        assert leaks == 0
        assert checks == 3 * 3 * (5 + 2 * (1 + len(CHANGES) + 1))
        # Joining the public room made the outsider a member; the private rooms are still theirs alone.
        assert set(await my_rooms(outsider)) == {public}
        # Nobody else may take a DM's name, or a private room's.
        refused = await outsider.api.post("/rooms", json={"name": dm["name"]})
        assert refused.status_code == 409
        client, answer = await subscribe(server_a, outsider, unique("dm.1"))
        await client.close()
        assert answer["code"] == "no_such_room"


async def test_only_the_owner_changes_the_room(server_a: Server, make_token: MakeToken) -> None:
    async with users(server_a, make_token, "owner", "member") as (owner, member):
        room = unique("own")
        assert (await owner.api.post("/rooms", json={"name": room, "visibility": "private"})).status_code == 201
        await owner.api.post(f"/rooms/{room}/members", json={"user": member.name})
        refused = await member.api.post(f"/rooms/{room}/members", json={"user": owner.name})
        assert refused.status_code == 403
        assert (await member.api.patch(f"/rooms/{room}", json={"topic": "mine"})).status_code == 403
        assert (await member.api.delete(f"/rooms/{room}/members/{owner.name}")).status_code == 403
        changed = await owner.api.patch(f"/rooms/{room}", json={"topic": "plans"})
        assert changed.status_code == 200
        assert (await my_rooms(member))[room]["topic"] == "plans"
        unknown = await owner.api.post(f"/rooms/{room}/members", json={"user": unique("ghost")})
        assert unknown.status_code == 404
        # Each change is a notice in the room's stream.
        page = (await owner.api.get(f"/rooms/{room}/messages")).json()["messages"]
        assert [(m["kind"], m["body"]) for m in page] == [
            ("notice", f"{owner.name} added {member.name}"),
            ("notice", f"{owner.name} set the topic: plans"),
        ]
        # A member may leave.
        left = await member.api.delete(f"/rooms/{room}/members/{member.name}")
        assert left.json()["changed"] is True
        assert (await member.api.get(f"/rooms/{room}/messages")).status_code == 404


async def test_a_removed_member_leaves_at_once_on_every_process(
    server_a: Server, server_b: Server, make_token: MakeToken
) -> None:
    async with users(server_a, make_token, "owner", "member") as (owner, member):
        room, other = unique("rm"), unique("rm")
        for name in (room, other):
            await owner.api.post("/rooms", json={"name": name, "visibility": "private"})
            await owner.api.post(f"/rooms/{name}/members", json={"user": member.name})
        multi = await RoomClient.open(server_b.ws("/socket"), member.token)
        for name in (room, other):
            await send(multi, type="subscribe", room=name)
            await multi.until("ready", room=name)
        single = await RoomClient.open(server_a.ws(f"/rooms/{room}/ws"), member.token)
        await single.ready()
        async with await RoomClient.open(server_a.ws(f"/rooms/{room}/ws"), owner.token) as speaker:
            await speaker.ready()
            removed = await owner.api.delete(f"/rooms/{room}/members/{member.name}")
            assert removed.json()["changed"] is True
            error = await multi.until("error", code="removed")
            assert error["room"] == room
            assert await single.wait_closed() == 4003
            await speaker.send("after the removal", client_id="after")
            await speaker.until("ack", client_id="after")
            await speaker.until("message", body="after the removal")
            # The socket's other room goes on; the removed one hears nothing more.
            async with await RoomClient.open(server_a.ws(f"/rooms/{other}/ws"), owner.token) as there:
                await there.ready()
                await there.send("still in this one", client_id="still")
                await multi.until("message", room=other, body="still in this one")
            assert not [f for f in multi.frames if f.get("room") == room and f["type"] == "message"]
            assert "after the removal" not in single.bodies()
        await multi.close()
        assert (await member.api.get(f"/rooms/{room}/messages")).status_code == 404
        assert room not in await my_rooms(member)


async def test_read_positions_and_unread_across_two_processes(
    server_a: Server, server_b: Server, make_token: MakeToken, engine: AsyncEngine
) -> None:
    async with users(server_a, make_token, "reader", "writer") as (reader, writer):
        room = unique("rd")
        await writer.api.post("/rooms", json={"name": room})
        laptop, ready = await subscribe(server_a, reader, room)
        phone, _ = await subscribe(server_b, reader, room)
        assert ready["type"] == "ready"
        async with await RoomClient.open(server_a.ws(f"/rooms/{room}/ws"), writer.token) as w:
            await w.ready()
            for i, body in enumerate(["one", f"two for @{reader.name}", f"three @{writer.name} @nobody"]):
                await w.send(body, client_id=str(i))
                await w.until("ack", client_id=str(i))
        await laptop.until("message", room=room, seq=3)
        await send(laptop, type="send", room=room, body="my own", client_id="own")
        await laptop.until("ack", client_id="own")
        listed = (await my_rooms(reader))[room]
        assert (listed["last_seq"], listed["read_seq"], listed["unread"], listed["mentions"]) == (4, 0, 3, 1)
        assert listed["last_message"]["body"] == "my own"
        assert (await my_rooms(writer))[room]["unread"] == 1  # the reader's; its own are never unread

        await send(laptop, type="read", room=room, seq=2)
        assert (await phone.until("read", room=room))["seq"] == 2
        await laptop.until("read", room=room, seq=2)
        listed = (await my_rooms(reader))[room]
        assert (listed["read_seq"], listed["unread"], listed["mentions"]) == (2, 1, 0)
        # Never backwards; never past the head.
        await send(phone, type="read", room=room, seq=1)
        await send(phone, type="read", room=room, seq=10**12)
        assert (await laptop.until("read", room=room))["seq"] == 4
        listed = (await my_rooms(reader))[room]
        assert (listed["read_seq"], listed["unread"], listed["mentions"]) == (4, 0, 0)
        assert not [f for f in laptop.frames + phone.frames if f["type"] == "read" and f["seq"] < 2]
        await send(phone, type="read", room=room, seq=-1)
        assert (await phone.until("error"))["code"] == "invalid_frame"
        await laptop.close()
        await phone.close()


async def test_mentions_resolve_to_members_and_survive_a_rename(
    server_a: Server, make_token: MakeToken, engine: AsyncEngine
) -> None:
    async with users(server_a, make_token, "owner", "bob", "carol") as (owner, bob, carol):
        room = unique("mn")
        await owner.api.post("/rooms", json={"name": room, "visibility": "private"})
        await owner.api.post(f"/rooms/{room}/members", json={"user": bob.name})
        async with await RoomClient.open(server_a.ws(f"/rooms/{room}/ws"), owner.token) as ws:
            await ws.ready()
            # carol is a user but not a member; @nobody is no user; the author is not mentioned.
            await ws.send(f"@{bob.name}, @{carol.name} @nobody and @{owner.name}: see @{bob.name}", client_id="m")
            seq = (await ws.until("ack", client_id="m"))["seq"]
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT u.name FROM mentions m JOIN users u ON u.id = m.user_id "
                    "JOIN rooms r ON r.id = m.room_id WHERE r.name = :r AND m.seq = :s"
                ),
                {"r": room, "s": seq},
            )
            assert [r.name for r in rows] == [bob.name]
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE users SET name = :n WHERE name = :o"), {"n": bob.name + "-x", "o": bob.name}
            )
        assert (await my_rooms(bob))[room]["mentions"] == 1  # stored resolved: the rename breaks nothing


async def test_mentions_follow_edits_and_deletes_and_changes_are_not_unread(
    server_a: Server, make_token: MakeToken
) -> None:
    """Issue 12's changes under issue 11's counts: an edit re-reads its message's mentions, a
    delete drops them; edits, reactions and deletes are not unread messages, and the room
    list's last message is the last one still there."""
    async with users(server_a, make_token, "owner", "bob") as (owner, bob):
        room = unique("mc")
        await owner.api.post("/rooms", json={"name": room})
        await owner.api.post(f"/rooms/{room}/members", json={"user": bob.name})
        async with await RoomClient.open(server_a.ws(f"/rooms/{room}/ws"), owner.token) as ws:
            await ws.ready()
            plain = await acked(ws, {"type": "send", "body": "nobody named"})
            named = await acked(ws, {"type": "send", "body": f"hi @{bob.name}"})

            async def counts() -> tuple[int, int, str | None]:
                listed = (await my_rooms(bob))[room]
                return listed["unread"], listed["mentions"], (listed["last_message"] or {}).get("body")

            # The invitation's notice, and two messages.
            assert await counts() == (3, 1, f"hi @{bob.name}")
            await acked(ws, {"type": "edit", "target_seq": named, "body": "hi all"})
            assert await counts() == (3, 0, "hi all")
            await acked(ws, {"type": "edit", "target_seq": plain, "body": f"now @{bob.name}"})
            await acked(ws, {"type": "react", "target_seq": plain, "emoji": "👍"})
            assert await counts() == (3, 1, "hi all")
            await acked(ws, {"type": "delete", "target_seq": plain})
            await acked(ws, {"type": "delete", "target_seq": named})
            assert await counts() == (1, 0, f"{owner.name} added {bob.name}")


async def test_the_room_list_is_one_query_of_index_scans_for_1000_rooms(
    engine: AsyncEngine, make_token: MakeToken
) -> None:
    name = unique("many")
    await make_token(name)
    async with engine.begin() as conn:
        user_id = await conn.scalar(text("SELECT id FROM users WHERE name = :n"), {"n": name})
        prefix = {"p": f"{name}-"}
        await conn.execute(text("INSERT INTO rooms (name) SELECT :p || g FROM generate_series(1, 1000) g"), prefix)
        await conn.execute(
            text("INSERT INTO memberships (user_id, room_id) SELECT :u, id FROM rooms WHERE name LIKE :p || '%'"),
            {**prefix, "u": user_id},
        )
        await conn.execute(
            text(
                "INSERT INTO messages (room_id, author, body) SELECT id, 'bot', 'hello' "
                "FROM rooms, generate_series(1, 3) WHERE name LIKE :p || '%'"
            ),
            prefix,
        )
        for table in ("rooms", "memberships", "messages", "mentions"):
            await conn.execute(text(f"ANALYZE {table}"))

    async def call(conn: Any) -> object:
        return await membership.my_rooms(conn, user_id=user_id, limit=1000)

    async with engine.connect() as conn:
        listed = await membership.my_rooms(conn, user_id=user_id, limit=1000)
    assert len(listed) == 1000 and {r.unread for r in listed} == {3}
    plan = await explain(engine, call)
    scans = {(n["Node Type"], n.get("Relation Name")) for n in nodes(plan)}
    # Per room, messages are read by primary-key ranges only (the unread count, bounded, and the
    # last message). Memberships and mentions are small here: the planner may read them whole.
    assert ("Seq Scan", "messages") not in scans, scans
    assert ("Index Scan", "messages") in scans or ("Index Only Scan", "messages") in scans, scans


@pytest.mark.parametrize("bad", [{"name": "-bad"}, {"name": "x", "visibility": "secret"}, {"name": "a" * 65}])
async def test_bad_rooms_are_refused(server_a: Server, make_token: MakeToken, bad: dict[str, str]) -> None:
    async with api_of(server_a, await make_token()) as api:
        assert (await api.post("/rooms", json=bad)).status_code == 422


async def removed_while_entering(
    engine: AsyncEngine, owner: User, member: User, room: str, speaker: RoomClient, join: Callable[[], Awaitable[None]]
) -> None:
    """`join` starts a join of `member` while presence writes are held (a table lock); once its
    presence enter waits, the member is removed and the removal's event reaches this process (at
    `speaker`), and only then does the enter go on."""
    async with engine.connect() as conn:
        lock = await conn.begin()
        await conn.execute(text("LOCK TABLE presence IN EXCLUSIVE MODE"))  # writes wait, reads do not
        await join()
        waiting = text(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "WHERE c.relname = 'presence' AND NOT l.granted"
        )
        async with asyncio.timeout(15), engine.connect() as look:  # authorised and joined: waiting on our lock
            while not await look.scalar(waiting):
                await asyncio.sleep(0.05)
        removed = await owner.api.delete(f"/rooms/{room}/members/{member.name}")
        assert removed.json()["changed"] is True
        await speaker.until("removed", user=member.name)  # the event has come to this process
        await lock.rollback()


async def test_a_subscribe_under_way_when_its_removal_commits_does_not_stay(
    server_a: Server, make_token: MakeToken, engine: AsyncEngine
) -> None:
    """The subscribe-during-removal race: a subscribe authorised just before the removal commits,
    and still under way when the removal's event comes (held here on its presence write by a
    table lock), ends refused and leaves nothing subscribed; the socket's other room goes on."""
    async with users(server_a, make_token, "owner", "member") as (owner, member):
        room, other = unique("race"), unique("race")
        for name in (room, other):
            await owner.api.post("/rooms", json={"name": name, "visibility": "private"})
            await owner.api.post(f"/rooms/{name}/members", json={"user": member.name})
        multi = await RoomClient.open(server_a.ws("/socket"), member.token)
        await send(multi, type="subscribe", room=other)
        await multi.until("ready", room=other)
        async with await RoomClient.open(server_a.ws(f"/rooms/{room}/ws"), owner.token) as speaker:
            await speaker.ready()  # the room's feed is up in this process
            await removed_while_entering(
                engine, owner, member, room, speaker, lambda: send(multi, type="subscribe", room=room)
            )
            answer = await multi.until("error", room=room)
            assert answer["code"] == "removed", answer
            assert not any(f.get("room") == room and f["type"] == "ready" for f in multi.frames)
            await speaker.send("after the removal", client_id="after")
            await speaker.until("message", body="after the removal")
            await send(multi, type="typing", room=room)
            assert (await multi.until("error", code="not_subscribed"))["room"] == room
            async with await RoomClient.open(server_a.ws(f"/rooms/{other}/ws"), owner.token) as there:
                await there.ready()
                await there.send("the other room goes on", client_id="on")
                await multi.until("message", room=other, body="the other room goes on")
            assert not [f for f in multi.frames if f.get("room") == room and f["type"] in ("message", "messages")]
        await multi.close()


async def test_room_socket_joins_removed_while_their_replay_began_send_nothing_and_free_its_slot(
    server_a: Server, make_token: MakeToken, engine: AsyncEngine
) -> None:
    """A room socket's replay takes its slot and reads its first page beside the presence enter.
    A member removed while that enter waits (held here by a table lock) hears the removal (close
    4003) and no history; more such joins than CHAT_REPLAYS_PER_USER (4) leave none of the user's
    replay slots held: the next join replays at once instead of closing with 1013."""
    async with users(server_a, make_token, "owner", "member") as (owner, member):
        room = unique("early")
        await owner.api.post("/rooms", json={"name": room, "visibility": "private"})
        async with await RoomClient.open(server_a.ws(f"/rooms/{room}/ws"), owner.token) as speaker:
            await speaker.ready()
            await speaker.send("history", client_id="history")
            await speaker.until("ack")
            joins: list[asyncio.Task[RoomClient]] = []

            async def join() -> None:
                joins.append(asyncio.create_task(RoomClient.open(server_a.ws(f"/rooms/{room}/ws"), member.token)))

            for _ in range(5):
                await owner.api.post(f"/rooms/{room}/members", json={"user": member.name})
                await removed_while_entering(engine, owner, member, room, speaker, join)
                gone = await joins.pop()
                assert await gone.wait_closed() == 4003
                assert [f["type"] for f in gone.frames] == [], gone.frames
            await owner.api.post(f"/rooms/{room}/members", json={"user": member.name})
            async with await RoomClient.open(server_a.ws(f"/rooms/{room}/ws"), member.token) as joined:
                await joined.ready()
                assert "history" in [f["body"] for f in joined.frames if f["type"] == "message"]
    log = server_a.log()
    assert "Traceback" not in log and "never retrieved" not in log, log[-2000:]


async def test_the_users_sockets_hear_that_their_room_list_changed(
    server_a: Server, server_b: Server, make_token: MakeToken
) -> None:
    """An invitation, a new DM and a removal each send `{"type":"rooms"}` to the user's /socket
    connections on every process (the page then reads GET /api/me/rooms), and to nobody else."""
    async with users(server_a, make_token, "owner", "member") as (owner, member):
        theirs = await RoomClient.open(server_b.ws("/socket"), member.token)
        owners = await RoomClient.open(server_a.ws("/socket"), owner.token)
        room = unique("told")
        await owner.api.post("/rooms", json={"name": room, "visibility": "private"})

        async def told(count: int) -> None:
            async with asyncio.timeout(15):
                while sum(f["type"] == "rooms" for f in theirs.frames) < count:
                    await asyncio.sleep(0.05)

        await owner.api.post(f"/rooms/{room}/members", json={"user": member.name})
        await told(1)
        assert room in await my_rooms(member)
        assert (await owner.api.post("/dms", json={"user": member.name})).status_code == 200
        await told(2)
        assert (await owner.api.post("/dms", json={"user": member.name})).status_code == 200  # found: no news
        await owner.api.delete(f"/rooms/{room}/members/{member.name}")
        await told(3)
        await owners.ws.send(json.dumps({"type": "ping"}))
        await owners.until("pong")
        await theirs.ws.send(json.dumps({"type": "ping"}))
        await theirs.until("pong")
        assert sum(f["type"] == "rooms" for f in theirs.frames) == 3
        assert not [f for f in owners.frames if f["type"] == "rooms"]
        await theirs.close()
        await owners.close()


async def test_every_socket_of_a_user_hears_it_however_they_open_and_close(
    server_a: Server, make_token: MakeToken
) -> None:
    """Several /socket connections of one user in one process, opened at once, share one
    subscription to the user's channel: each hears every change, also after some have closed and
    others opened again (the process subscribes once per user, not once per socket)."""
    async with users(server_a, make_token, "owner", "member") as (owner, member):

        async def opened() -> RoomClient:
            socket = await RoomClient.open(server_a.ws("/socket"), member.token)
            for _ in range(5):  # LISTENs of new rooms queue on the listener beside the user's channel
                await socket.ws.send(json.dumps({"type": "subscribe", "room": unique("busy")}))
            return socket

        first = await asyncio.gather(*(opened() for _ in range(12)))

        async def invited(sockets: list[RoomClient], count: int) -> None:
            room = unique("many")
            await owner.api.post("/rooms", json={"name": room, "visibility": "private"})
            await owner.api.post(f"/rooms/{room}/members", json={"user": member.name})
            async with asyncio.timeout(15):
                for socket in sockets:
                    while sum(f["type"] == "rooms" for f in socket.frames) < count:
                        await asyncio.sleep(0.05)

        await invited(first, 1)
        await asyncio.gather(*(socket.close() for socket in first[:11]))
        again = await asyncio.gather(*(opened() for _ in range(4)))
        await invited([first[11]], 2)
        await invited(again, 2)  # the second and third invitations both reached the new sockets
        for socket in [first[11], *again]:
            await socket.close()
    # Feeds cancelled while their LISTEN waited (sockets closed right after subscribing) end,
    # quietly: none takes the cancellation for a failure and resubscribes.
    log = server_a.log()
    assert "resubscribing" not in log and "Traceback" not in log, log[-2000:]


async def test_a_room_sockets_token_and_room_in_one_read_answer_as_the_two_reads(
    engine: AsyncEngine, make_token: MakeToken
) -> None:
    """A room socket's join reads its token and the room in one statement (one round trip less):
    for every kind of room and token it answers as identity_for_token and access one after the
    other, and refuses the same tokens for the same reasons."""
    owner_name, other_name = unique("owner"), unique("other")
    owner, other = await make_token(owner_name), await make_token(other_name)
    private, public, missing = unique("private"), unique("public"), unique("missing")
    async with engine.connect() as conn:
        owner_id = await membership.user_id(conn, name=owner_name)
        assert owner_id is not None
        for name, visibility in ((private, "private"), (public, "public")):
            made = await membership.create(
                conn, name=name, creator_id=owner_id, visibility=visibility, topic="", max_per_user=10
            )
            assert made is not None
        for raw in (owner, other):
            for room in (private, public, missing, None):
                who = await store.identity_for_token(conn, raw=raw)
                seen = None if room is None else await membership.access(conn, room=room, user_id=who.user_id)
                assert await membership.token_and_access(conn, raw=raw, room=room) == (who, seen)
        # Seen by the owner (a member) and by the other user (public only, not a member).
        assert (await membership.token_and_access(conn, raw=owner, room=private))[1] is not None
        assert (await membership.token_and_access(conn, raw=other, room=private))[1] is None
        public_seen = (await membership.token_and_access(conn, raw=other, room=public))[1]
        assert public_seen is not None and not public_seen.member
        expired = await make_token(unique("late"), ttl=timedelta(seconds=-1))
        revoked = await make_token(unique("gone"))
        await store.revoke_tokens(conn, user_name=(await store.identity_for_token(conn, raw=revoked)).name)
        for raw, reason in ((expired, "token expired"), (revoked, "token revoked"), ("chat_nothing", "invalid token")):
            with pytest.raises(store.TokenRefused, match=reason):
                await membership.token_and_access(conn, raw=raw, room=public)
