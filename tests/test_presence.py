"""Presence across processes (also after one is killed), and typing, which is never stored."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import NamedTuple

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from chat import membership, notify, store
from chat.config import libpq_url
from chat.presence import Presence
from chat.store import Identity
from tests.conftest import MakeToken, unique
from tests.roomclient import RoomClient
from tests.servers import Server

FAST_PRESENCE = {"CHAT_PRESENCE_BEAT_SECONDS": "0.3", "CHAT_PRESENCE_STALE_SECONDS": "1.5"}


def events(client: RoomClient, user: str) -> list[str]:
    return [f["type"] for f in client.frames if f["type"] in ("join", "leave") and f["user"] == user]


async def test_online_list_and_join_leave_across_processes(
    server_a: Server, server_b: Server, make_token: MakeToken
) -> None:
    alice, bob = unique("alice"), unique("bob")
    path = f"/rooms/{unique('r')}/ws"
    a = await RoomClient.open(server_a.ws(path), await make_token(alice))
    assert (await a.ready())["online"] == [alice]
    bob_token = await make_token(bob)
    b1 = await RoomClient.open(server_b.ws(path), bob_token)
    assert sorted((await b1.ready())["online"]) == sorted([alice, bob])
    await a.until("join", user=bob)

    # A second socket of bob's, on the other process: bob was online already, so no event.
    b2 = await RoomClient.open(server_a.ws(path), bob_token)
    await b2.ready()
    await b1.close()  # still online through b2: no leave
    await b2.send("marker")  # everything before this reached alice first? not guaranteed: so
    await a.until_seq(1)  # wait for the message, then for the leave of bob's last socket:
    await b2.close()
    await a.until("leave", user=bob)
    assert events(a, bob) == ["join", "leave"]
    carol = await RoomClient.open(server_b.ws(path), await make_token(unique("carol")))
    assert bob not in (await carol.ready())["online"]
    await carol.close()
    await a.close()


async def test_a_reload_is_no_leave_and_join(server_a: Server, server_b: Server, make_token: MakeToken) -> None:
    """Bob reloads the page (his socket closes, a new one opens on either process) within the
    linger: alice hears no leave and no join, and bob's message after it still reaches her."""
    alice, bob = unique("alice"), unique("bob")
    path = f"/rooms/{unique('r')}/ws"
    a = await RoomClient.open(server_a.ws(path), await make_token(alice))
    await a.ready()
    bob_token = await make_token(bob)
    b = await RoomClient.open(server_b.ws(path), bob_token)
    await b.ready()
    await a.until("join", user=bob)
    await b.close()
    await asyncio.sleep(0.3)  # a reload takes a moment: long enough for a leave to have been sent
    b = await RoomClient.open(server_b.ws(path), bob_token)  # the reload
    assert sorted((await b.ready())["online"]) == sorted([alice, bob])
    await b.send("back")
    await a.until_seq(1)  # a leave or join would have been sent before the message was stored
    assert events(a, bob) == ["join"]
    await b.close()
    await a.until("leave", user=bob)  # gone for good: after the linger
    assert events(a, bob) == ["join", "leave"]
    await a.close()


@pytest.fixture
def doomed(database_url: str, tmp_root: Path) -> Iterator[tuple[Server, Server]]:
    servers = (Server(database_url, tmp_root, env=FAST_PRESENCE), Server(database_url, tmp_root, env=FAST_PRESENCE))
    yield servers
    for server in servers:
        server.stop()


async def test_a_killed_process_users_leave_by_themselves(doomed: tuple[Server, Server], make_token: MakeToken) -> None:
    survivor, victim = doomed
    path = f"/rooms/{unique('r')}/ws"
    watcher = await RoomClient.open(survivor.ws(path), await make_token())
    await watcher.ready()
    dave = unique("dave")
    d = await RoomClient.open(victim.ws(path), await make_token(dave))
    await d.ready()
    await watcher.until("join", user=dave)

    victim.proc.kill()  # kill -9: no goodbye, no clean-up of its own
    victim.proc.wait()
    leave = await watcher.until("leave", user=dave, timeout=30)  # reaped by the survivor
    assert leave["room"] == path.split("/")[2]
    late = await RoomClient.open(survivor.ws(path), await make_token())
    assert dave not in (await late.ready())["online"]
    await late.close()
    await watcher.close()


async def table_state(database_url: str, room: str) -> list[tuple[str, int]]:
    """What a stored frame would change: messages and seqs anywhere, users, and `room`'s presence
    (other rooms' presence is not this test's: the servers' heartbeats may rewrite it any time)."""
    conn = await asyncpg.connect(libpq_url(database_url))
    try:
        rows = await conn.fetch(
            "SELECT 'messages', count(*) FROM messages UNION ALL SELECT 'presence', count(*) FROM presence"
            " WHERE room_id = (SELECT id FROM rooms WHERE name = $1)"
            " UNION ALL SELECT 'rooms', sum(last_seq) FROM rooms UNION ALL SELECT 'users', count(*) FROM users",
            room,
        )
    finally:
        await conn.close()
    return [(r[0], int(r[1] or 0)) for r in rows]


async def test_typing_is_fanned_out_throttled_and_never_stored(
    server_a: Server, server_b: Server, make_token: MakeToken, database_url: str
) -> None:
    typist = unique("typist")
    path = f"/rooms/{unique('r')}/ws"
    t = await RoomClient.open(server_a.ws(path), await make_token(typist))
    watcher = await RoomClient.open(server_b.ws(path), await make_token())
    await t.ready()
    assert typist in (await watcher.ready())["online"]
    before = await table_state(database_url, path.split("/")[2])
    for _ in range(10):
        await t.ws.send('{"type": "typing"}')
    typing = await watcher.until("typing", user=typist)  # across processes
    assert typing["room"] == path.split("/")[2]
    await t.ws.send('{"type": "ping"}')
    await t.until("pong")  # the server has handled all ten
    assert await table_state(database_url, path.split("/")[2]) == before  # nothing written
    assert [f for f in t.frames if f["type"] == "error"] == []  # typing is a valid frame
    # Throttled: ten frames within the interval give one event (the rest are dropped quietly).
    await t.send("done typing")
    await watcher.until_seq(1)
    assert len([f for f in watcher.frames if f["type"] == "typing"]) == 1
    await t.close()
    await watcher.close()


# --- in this process: the heartbeat against enter and leave, on the real test Postgres -------------


async def someone_in_a_room(engine: AsyncEngine, make_token: MakeToken) -> tuple[int, Identity]:
    async with engine.connect() as conn:
        who = await store.identity_for_token(conn, raw=await make_token())
        room_id = await store.room_id(conn, name=unique("presence"))
    assert room_id is not None
    return room_id, who


async def stored_sockets(engine: AsyncEngine, presence: Presence, room_id: int, user_id: int) -> int:
    async with engine.connect() as conn:
        n = await conn.scalar(
            text("SELECT sockets FROM presence WHERE room_id = :r AND user_id = :u AND process_id = :p"),
            {"r": room_id, "u": user_id, "p": presence.process_id},
        )
    return int(n or 0)


async def waiting_for_advisory_locks(admin: asyncpg.Connection) -> int:
    return int(await admin.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"))


@pytest.mark.parametrize("change", ["enter", "leave"])
async def test_a_heartbeat_during_an_enter_or_leave_counts_sockets_once(
    engine: AsyncEngine, make_token: MakeToken, change: str
) -> None:
    """Before: a beat that came while an enter (leave) was under way saw the change here but not
    yet in the table, and applied it too: the row stored twice over, or taken out under a socket
    still open. After: it leaves that (room, user) to the next beat."""
    room_id, who = await someone_in_a_room(engine, make_token)
    key = (room_id, who.user_id)
    presence = Presence(engine, beat=3600, stale=10)  # beats only when the test says so; no linger
    await presence.start()
    admin = await asyncpg.connect(libpq_url(engine.url.render_as_string(hide_password=False)))
    try:
        if change == "leave":  # one socket, whose leave lets the (room, user) go
            await presence.enter(room_id, who)
        # Hold the (room, user) lock, so that the change stops halfway: counted here, not stored.
        await admin.execute("BEGIN")
        await admin.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1::bigint::text || ':' || $2::bigint::text, 0))",
            room_id,
            who.user_id,
        )
        halfway = asyncio.create_task(
            presence.enter(room_id, who) if change == "enter" else presence.leave(room_id, who)
        )
        async with asyncio.timeout(10):
            while await waiting_for_advisory_locks(admin) < 1:
                await asyncio.sleep(0.02)
        beat = asyncio.create_task(presence._beat())
        async with asyncio.timeout(10):  # the beat finishes, or queues behind the lock too
            while not beat.done() and await waiting_for_advisory_locks(admin) < 2:
                await asyncio.sleep(0.02)
        await admin.execute("COMMIT")
        await halfway
        await beat
        held = 1 if change == "enter" else 0
        assert presence.local.get(key, ("", 0))[1] == held
        assert await stored_sockets(engine, presence, room_id, who.user_id) == held
        await presence._beat()  # and the next beat finds nothing to correct
        assert await stored_sockets(engine, presence, room_id, who.user_id) == held
        if change == "enter":
            await presence.leave(room_id, who)
            assert await stored_sockets(engine, presence, room_id, who.user_id) == 0
    finally:
        await admin.close()
        await presence.stop()


async def room_events(engine: AsyncEngine, room_id: int) -> tuple[asyncpg.Connection, list[str]]:
    """A connection LISTENing to the room's channel, and the join/leave events it hears."""
    listener = await asyncpg.connect(libpq_url(engine.url.render_as_string(hide_password=False)))
    heard: list[str] = []

    def hear(*args: object) -> None:
        frame = json.loads(str(args[-1]))
        if frame.get("type") in ("join", "leave"):
            heard.append(frame["type"])

    await listener.add_listener(notify.room_channel(room_id), hear)
    return listener, heard


class Present(NamedTuple):
    room_id: int
    room: str
    who: Identity
    presence: Presence
    heard: list[str]  # the room's join and leave events


@asynccontextmanager
async def a_member_present(engine: AsyncEngine, make_token: MakeToken, *, linger: float) -> AsyncIterator[Present]:
    """A member of a new room with one socket entered in a Presence of its own (beating only
    when told to), and a listener of the room's join and leave events."""
    room_id, who = await someone_in_a_room(engine, make_token)
    async with engine.connect() as conn:
        await membership.enter(conn, room_id=room_id, user_id=who.user_id)
        room = str(await conn.scalar(text("SELECT name FROM rooms WHERE id = :r"), {"r": room_id}))
    presence = Presence(engine, beat=3600, stale=10, linger=linger)
    await presence.start()
    listener, heard = await room_events(engine, room_id)
    try:
        assert await presence.enter(room_id, who, members_only=True, room=room) == [who.name]
        yield Present(room_id, room, who, presence, heard)
    finally:
        await listener.close()
        await presence.stop()


async def test_a_second_socket_and_a_return_within_the_linger_change_nothing(
    engine: AsyncEngine, make_token: MakeToken
) -> None:
    """The table holds a (room, user) per process, not per socket: a second socket (another tab)
    changes nothing there and announces nothing, and the last socket's row lingers, so that the
    user coming back within the linger (a reload, a reconnect) is no leave and join to the room.
    Past the linger the user leaves as before."""
    async with a_member_present(engine, make_token, linger=0.5) as (room_id, _, who, presence, heard):
        assert await presence.enter(room_id, who, members_only=True) == [who.name]  # a second tab
        assert await stored_sockets(engine, presence, room_id, who.user_id) == 1
        await presence.leave(room_id, who)
        await presence.leave(room_id, who)  # the last socket: the row lingers
        assert await stored_sockets(engine, presence, room_id, who.user_id) == 1
        assert await presence.enter(room_id, who, members_only=True) == [who.name]  # back in time
        await asyncio.sleep(1.0)  # past the linger: the socket that came back holds the row
        assert await stored_sockets(engine, presence, room_id, who.user_id) == 1
        await presence._beat()  # nothing to correct
        assert await stored_sockets(engine, presence, room_id, who.user_id) == 1
        await presence.leave(room_id, who)
        async with asyncio.timeout(10):  # gone for good: the leave comes after the linger
            while "leave" not in heard:
                await asyncio.sleep(0.02)
        assert heard == ["join", "leave"]
        assert await stored_sockets(engine, presence, room_id, who.user_id) == 0
        assert (room_id, who.user_id) not in presence.local


async def test_a_rejoin_within_the_linger_still_rechecks_membership(engine: AsyncEngine, make_token: MakeToken) -> None:
    """A join that finds its (room, user) held writes nothing, but still rechecks the membership
    (a removal that raced it): a removed user is refused, and counted nowhere; leaving at once
    (`linger=False`, as a removal's sockets do) announces the leave without waiting."""
    async with a_member_present(engine, make_token, linger=3600) as (room_id, _, who, presence, heard):
        await presence.leave(room_id, who)  # lingers (for an hour)
        async with engine.begin() as conn:
            await conn.execute(
                text("DELETE FROM memberships WHERE room_id = :r AND user_id = :u"), {"r": room_id, "u": who.user_id}
            )
        assert await presence.enter(room_id, who, members_only=True) is None
        assert (room_id, who.user_id) not in presence.sockets
        assert await presence.enter(room_id, who) == [who.name]  # the server's own check: held, counted
        await presence.leave(room_id, who, linger=False)
        assert await stored_sockets(engine, presence, room_id, who.user_id) == 0
        async with asyncio.timeout(10):
            while "leave" not in heard:
                await asyncio.sleep(0.02)
        assert heard == ["join", "leave"]


async def test_a_rejoin_by_the_rooms_name_is_confirmed_in_its_look(engine: AsyncEngine, make_token: MakeToken) -> None:
    """held() gives the id of a room by the name it was entered with, while this process holds
    the (room, user); rejoin() counts the socket only once its look has found the room still so
    named and the user still a member. Unconfirmed: None, and nothing counted."""
    async with a_member_present(engine, make_token, linger=3600) as (room_id, name, who, presence, heard):
        assert presence.held(name, who.user_id) == room_id
        assert presence.held(name + "x", who.user_id) is None
        assert presence.held(name, who.user_id + 1) is None
        await presence.leave(room_id, who)  # lingers: still held
        assert presence.held(name, who.user_id) == room_id
        assert await presence.rejoin(room_id, name, who) == [who.name]
        assert presence.sockets[(room_id, who.user_id)] == 1
        await presence.leave(room_id, who)
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE rooms SET name = :n WHERE id = :r"), {"n": name + "-renamed", "r": room_id})
        assert await presence.rejoin(room_id, name, who) is None
        assert (room_id, who.user_id) not in presence.sockets
        assert await presence.rejoin(room_id, name + "-renamed", who) == [who.name]
        await presence.leave(room_id, who, linger=False)  # let go: not held any more
        assert presence.held(name + "-renamed", who.user_id) is None
        assert await presence.rejoin(room_id, name + "-renamed", who) is None
        assert await stored_sockets(engine, presence, room_id, who.user_id) == 0
        async with asyncio.timeout(10):
            while "leave" not in heard:
                await asyncio.sleep(0.02)
        assert heard == ["join", "leave"]  # no leave and join for the rejoins within the linger


async def test_the_heartbeat_does_not_wait_for_the_shared_pool(database_url: str, make_token: MakeToken) -> None:
    """Before: reaping a dead process (and reconciling) went through the shared pool, so a pool
    held by busy sockets held up the beat. After: the beat's own connection does all of it."""
    shared = create_async_engine(database_url, pool_size=1, max_overflow=0, pool_timeout=30)
    presence = Presence(shared, beat=3600, stale=1)
    await presence.start()
    try:
        room_id, who = await someone_in_a_room(shared, make_token)
        dead = f"dead:{unique('p')}"
        async with shared.begin() as conn:  # a process that stopped beating, with a user online
            await conn.execute(
                text("INSERT INTO chat_processes (id, beat_at) VALUES (:id, now() - interval '1 hour')"), {"id": dead}
            )
            await conn.execute(
                text(
                    "INSERT INTO presence (room_id, user_id, process_id, user_name, sockets) VALUES (:r, :u, :p, :n, 1)"
                ),
                {"r": room_id, "u": who.user_id, "p": dead, "n": who.name},
            )
        async with shared.connect() as busy:  # every connection of the shared pool is taken
            await busy.execute(text("SELECT 1"))
            async with asyncio.timeout(10):
                await presence._beat()
        async with shared.connect() as conn:
            assert await conn.scalar(text("SELECT count(*) FROM chat_processes WHERE id = :id"), {"id": dead}) == 0
    finally:
        await presence.stop()
        await shared.dispose()


async def test_a_joins_enter_rechecks_membership_in_the_same_statement(
    engine: AsyncEngine, make_token: MakeToken
) -> None:
    """A join's presence enter is also its recheck of a removal that raced it (one round trip,
    under the (room, user) lock): for a user who is no longer a member it answers None and counts
    nothing, here or in the table, and sends no join event; for a member it counts the socket."""
    room_id, who = await someone_in_a_room(engine, make_token)  # a room without members
    presence = Presence(engine, beat=3600, stale=10)
    await presence.start()
    listener = await asyncpg.connect(libpq_url(engine.url.render_as_string(hide_password=False)))
    heard: list[str] = []
    await listener.add_listener(notify.room_channel(room_id), lambda *args: heard.append(args[-1]))
    try:
        assert await presence.enter(room_id, who, members_only=True) is None
        assert (room_id, who.user_id) not in presence.local
        assert await stored_sockets(engine, presence, room_id, who.user_id) == 0
        # Not a member, without the recheck (the server's own rooms): counted, and announced.
        assert await presence.enter(room_id, who) == [who.name]
        assert await stored_sockets(engine, presence, room_id, who.user_id) == 1
        async with asyncio.timeout(10):
            while not heard:
                await asyncio.sleep(0.02)
        assert [json.loads(h)["type"] for h in heard] == ["join"]  # one: the refused enter sent none
        await presence.leave(room_id, who)
        async with engine.connect() as conn:
            await membership.enter(conn, room_id=room_id, user_id=who.user_id)
        assert await presence.enter(room_id, who, members_only=True) == [who.name]
        assert presence.local[(room_id, who.user_id)][1] == 1
        assert await stored_sockets(engine, presence, room_id, who.user_id) == 1
        await presence.leave(room_id, who)
        assert await stored_sockets(engine, presence, room_id, who.user_id) == 0
        assert (room_id, who.user_id) not in presence.local
    finally:
        await listener.close()
        await presence.stop()


async def _lock_waiters(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"))


async def test_a_change_holds_its_process_row_against_a_reaper(
    database_url: str, engine: AsyncEngine, make_token: MakeToken
) -> None:
    """Before (0010): the change looked for its process's row, and a reaper's DELETE that
    committed after the look failed the presence row's foreign key (the enter was lost until the
    next beat; a join's was an error). Now (0011) the change holds the row: it waits for the
    DELETE under way, finds the row gone, and puts it back."""
    presence = Presence(engine, beat=3600, stale=30)
    await presence.start()
    reaper = await asyncpg.connect(libpq_url(database_url))
    try:
        room_id, who = await someone_in_a_room(engine, make_token)
        transaction = reaper.transaction()
        await transaction.start()
        assert await reaper.execute("DELETE FROM chat_processes WHERE id = $1", presence.process_id) == "DELETE 1"
        entering = asyncio.create_task(presence.enter(room_id, who))
        async with asyncio.timeout(30):  # the enter waits for the reaper's transaction
            while await _lock_waiters(reaper) == 0:
                await asyncio.sleep(0.05)
        await transaction.commit()
        async with asyncio.timeout(30):
            assert await entering == [who.name]
        assert await stored_sockets(engine, presence, room_id, who.user_id) == 1
        async with engine.connect() as conn:
            found = await conn.scalar(
                text("SELECT count(*) FROM chat_processes WHERE id = :id"), {"id": presence.process_id}
            )
        assert found == 1
    finally:
        await reaper.close()
        await presence.stop()


async def test_a_process_that_beat_again_is_not_reaped(engine: AsyncEngine, make_token: MakeToken) -> None:
    """A process found stale by one beat may beat again before the reaping: the reaping looks
    again under the row's lock and leaves a live process and its users alone."""
    presence = Presence(engine, beat=3600, stale=30)
    await presence.start()
    try:
        room_id, who = await someone_in_a_room(engine, make_token)
        back = f"back:{unique('p')}"
        async with engine.begin() as conn:  # found stale, then it beat again
            await conn.execute(text("INSERT INTO chat_processes (id) VALUES (:id)"), {"id": back})
            await conn.execute(
                text(
                    "INSERT INTO presence (room_id, user_id, process_id, user_name, sockets) VALUES (:r, :u, :p, :n, 1)"
                ),
                {"r": room_id, "u": who.user_id, "p": back, "n": who.name},
            )
        await presence._reap([back])
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT count(*) FROM chat_processes WHERE id = :id"), {"id": back}) == 1
            assert await conn.scalar(text("SELECT count(*) FROM presence WHERE process_id = :id"), {"id": back}) == 1
            await conn.execute(
                text("UPDATE chat_processes SET beat_at = now() - interval '1 hour' WHERE id = :id"), {"id": back}
            )
            await conn.commit()
        await presence._reap([back])  # stale for real now: reaped with its rows
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT count(*) FROM chat_processes WHERE id = :id"), {"id": back}) == 0
            assert await conn.scalar(text("SELECT count(*) FROM presence WHERE process_id = :id"), {"id": back}) == 0
    finally:
        await presence.stop()
