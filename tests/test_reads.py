"""Read positions coalesced (chat/reads.py) against the real database: however many read
frames arrive, each (user, room) gets at most one write per interval, never backwards."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from chat import membership
from chat.reads import ReadPositions
from tests.conftest import MakeToken, unique


async def member_of_new_room(engine: AsyncEngine, make_token: MakeToken, messages: int) -> tuple[int, int, str]:
    name = unique("reader")
    await make_token(name)
    async with engine.begin() as conn:
        user_id = await conn.scalar(text("SELECT id FROM users WHERE name = :n"), {"n": name})
        room_id = await conn.scalar(text("INSERT INTO rooms (name) VALUES (:n) RETURNING id"), {"n": unique("rr")})
        await conn.execute(
            text("INSERT INTO messages (room_id, author, body) SELECT :r, 'bot', 'm' FROM generate_series(1, :n)"),
            {"r": room_id, "n": messages},
        )
        await conn.execute(
            text("INSERT INTO memberships (user_id, room_id) VALUES (:u, :r)"), {"u": user_id, "r": room_id}
        )
    assert user_id is not None and room_id is not None
    return int(user_id), int(room_id), name


async def test_many_read_frames_make_one_write_per_interval(engine: AsyncEngine, make_token: MakeToken) -> None:
    user_id, room_id, name = await member_of_new_room(engine, make_token, 200)
    published: list[tuple[int, dict[str, Any]]] = []
    heard = asyncio.Event()

    async def publish(room: int, kind: str, user: str, **extra: int) -> None:  # as Hub.publish
        published.append((room, {"type": kind, "user": user, **extra}))
        heard.set()

    reads = ReadPositions(engine, publish, interval=3600)  # the second round never comes by itself
    reads.start()
    try:
        for seq in range(1, 101):  # a burst, as a client scrolling would send
            assert reads.advance(user_id=user_id, user=name, room_id=room_id, seq=seq)
        await asyncio.wait_for(heard.wait(), 30)
        assert published == [(room_id, {"type": "read", "user": name, "user_id": user_id, "read_seq": 100})]
        for seq in (150, 120, 10):  # within the interval: only noted
            reads.advance(user_id=user_id, user=name, room_id=room_id, seq=seq)
        async with engine.connect() as conn:
            assert await membership.read_seq(conn, user_id=user_id, room_id=room_id) == 100
    finally:
        await reads.stop()  # a clean stop writes what is pending
    assert [e["read_seq"] for _, e in published] == [100, 150]
    async with engine.connect() as conn:
        assert await membership.read_seq(conn, user_id=user_id, room_id=room_id) == 150


async def test_positions_never_move_back_nor_past_the_head(engine: AsyncEngine, make_token: MakeToken) -> None:
    user_id, room_id, _ = await member_of_new_room(engine, make_token, 5)
    async with engine.connect() as conn:
        moved = await membership.advance_reads(conn, positions={(user_id, room_id): 10**12})
        assert moved == [(user_id, room_id, 5)]
        assert await membership.advance_reads(conn, positions={(user_id, room_id): 3}) == []
        assert await membership.read_seq(conn, user_id=user_id, room_id=room_id) == 5
        # Not a member: nothing is written.
        assert await membership.advance_reads(conn, positions={(user_id, room_id + 10**9): 1}) == []


async def test_pending_positions_are_bounded(engine: AsyncEngine) -> None:
    async def publish(room: int, kind: str, user: str, **extra: int) -> None:
        pass

    reads = ReadPositions(engine, publish, max_pending=2)
    assert reads.advance(user_id=1, user="a", room_id=1, seq=1)
    assert reads.advance(user_id=1, user="a", room_id=2, seq=1)
    assert reads.advance(user_id=1, user="a", room_id=1, seq=5)  # an existing key: still taken
    assert not reads.advance(user_id=1, user="a", room_id=3, seq=1)
