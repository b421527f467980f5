"""`chat prune`: retention by age, in batches, without reusing seqs."""

from __future__ import annotations

import subprocess
import sys

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import MakeToken, unique
from tests.roomclient import RoomClient
from tests.servers import Server
from tests.test_cli import chat, clean_env


async def room_with(engine: AsyncEngine, *, count: int, old: int, days: int) -> str:
    """A room of `count` messages whose first `old` were written `days` ago."""
    name = unique("prune")
    async with engine.begin() as conn:
        room_id = await conn.scalar(text("INSERT INTO rooms (name) VALUES (:n) RETURNING id"), {"n": name})
        await conn.execute(
            text(
                "INSERT INTO messages (room_id, author, body) SELECT :r, 'bot', 'm' || g FROM generate_series(1, :c) g"
            ),
            {"r": room_id, "c": count},
        )
        await conn.execute(
            text("UPDATE messages SET created_at = now() - make_interval(days => :d) WHERE room_id = :r AND seq <= :o"),
            {"r": room_id, "o": old, "d": days},
        )
    return name


async def seqs(engine: AsyncEngine, room: str) -> list[int]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT seq FROM messages JOIN rooms ON rooms.id = room_id WHERE name = :n ORDER BY seq"), {"n": room}
        )
        return [r.seq for r in rows]


async def test_prune_a_room_in_batches(
    server_a: Server, engine: AsyncEngine, database_url: str, make_token: MakeToken
) -> None:
    env = clean_env(DATABASE_URL=database_url)
    room, other = await room_with(engine, count=30, old=20, days=100), await room_with(engine, count=5, old=5, days=100)

    dry = chat("prune", "--older-than", "90d", "--room", room, "--dry-run", env=env).stdout
    assert dry.startswith(f"would delete 20 message(s) in {room} older than ")
    assert await seqs(engine, room) == list(range(1, 31))

    done = chat("prune", "--older-than", "90d", "--room", room, "--batch-size", "7", env=env).stdout
    assert done.startswith(f"deleted 20 message(s) in {room} older than ")
    assert await seqs(engine, room) == list(range(21, 31))
    assert await seqs(engine, other) == [1, 2, 3, 4, 5]  # --room means only that room
    assert "deleted 0 message(s)" in chat("prune", "--older-than", "90d", "--room", room, env=env).stdout

    # Seqs are never reused, and cursors stay valid: "after 5" gets what is left, then new ones.
    token = await make_token()
    async with await RoomClient.open(server_a.ws(f"/rooms/{room}/ws"), token, after=5) as client:
        assert (await client.ready())["last_seq"] == 30
        await client.send("after the prune")
        await client.until_seq(31)
        assert client.seqs() == list(range(21, 32))


async def test_prune_every_room_across_batches(engine: AsyncEngine, database_url: str) -> None:
    env = clean_env(DATABASE_URL=database_url)
    # Older than anything the other tests write, so that pruning every room touches only these.
    rooms = [await room_with(engine, count=8, old=old, days=2000) for old in (5, 8, 0, 3)]
    out = chat("prune", "--older-than", "1999d", "--batch-size", "3", env=env).stdout
    assert out.startswith("deleted 16 message(s) older than ")  # batches of 3 spanning rooms
    assert [await seqs(engine, r) for r in rooms] == [[6, 7, 8], [], list(range(1, 9)), [4, 5, 6, 7, 8]]
    async with engine.connect() as conn:
        heads = await conn.execute(text("SELECT last_seq FROM rooms WHERE name = ANY(:n)"), {"n": rooms})
        assert {h.last_seq for h in heads} == {8}


def test_prune_refuses_bad_arguments(database_url: str) -> None:
    env = clean_env(DATABASE_URL=database_url)
    for args, code, message in [
        (["--older-than", "0"], 2, "give an age such as 90d"),
        (["--older-than", "soon"], 2, "use a number and a unit"),
        ([], 2, "Missing option '--older-than'"),
        (["--older-than", "1d", "--batch-size", "0"], 2, "--batch-size"),
        (["--older-than", "1d", "--room", unique("nowhere")], 1, "no such room"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "chat", "prune", *args], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == code and message in done.stderr, (args, done.stderr)
