"""Presence across processes (also after one is killed), and typing, which is never stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from chat.config import libpq_url
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


async def table_state(database_url: str) -> list[tuple[str, int]]:
    conn = await asyncpg.connect(libpq_url(database_url))
    try:
        rows = await conn.fetch(
            "SELECT 'messages', count(*) FROM messages UNION ALL SELECT 'presence', count(*) FROM presence"
            " UNION ALL SELECT 'rooms', sum(last_seq) FROM rooms UNION ALL SELECT 'users', count(*) FROM users"
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
    before = await table_state(database_url)
    for _ in range(10):
        await t.ws.send('{"type": "typing"}')
    typing = await watcher.until("typing", user=typist)  # across processes
    assert typing["room"] == path.split("/")[2]
    await t.ws.send('{"type": "ping"}')
    await t.until("pong")  # the server has handled all ten
    assert await table_state(database_url) == before  # nothing written anywhere
    assert [f for f in t.frames if f["type"] == "error"] == []  # typing is a valid frame
    # Throttled: ten frames within the interval give one event (the rest are dropped quietly).
    await t.send("done typing")
    await watcher.until_seq(1)
    assert len([f for f in watcher.frames if f["type"] == "typing"]) == 1
    await t.close()
    await watcher.close()
