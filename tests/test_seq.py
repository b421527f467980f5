"""The per-room seq: gap-free and in commit order, whoever inserts, even with rollbacks."""

from __future__ import annotations

import asyncio
import random

import asyncpg

from chat.config import libpq_url
from tests.conftest import unique


async def test_concurrent_writers_never_let_a_reader_skip(database_url: str) -> None:
    """Eight writers insert concurrently (some transactions roll back) while a reader polls
    "everything after my cursor". Every read must continue exactly at cursor + 1: a reader
    must never see seq k+1 before k is visible, or it would skip k for good."""
    dsn = libpq_url(database_url)
    admin = await asyncpg.connect(dsn)
    room_id = await admin.fetchval("INSERT INTO rooms (name) VALUES ($1) RETURNING id", unique("seq"))
    writers, per_writer = 8, 60
    committed = 0

    async def write(n: int) -> None:
        nonlocal committed
        conn = await asyncpg.connect(dsn)
        rng = random.Random(n)
        try:
            for i in range(per_writer):
                tx = conn.transaction()
                await tx.start()
                await conn.execute(
                    "INSERT INTO messages (room_id, author, body) VALUES ($1, $2, $3)", room_id, f"w{n}", str(i)
                )
                await asyncio.sleep(rng.random() / 500)  # hold the transaction open a little
                if rng.random() < 0.2:
                    await tx.rollback()
                else:
                    await tx.commit()
                    committed += 1
        finally:
            await conn.close()

    seen: list[int] = []

    async def read(stop: asyncio.Event) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            while True:
                done = stop.is_set()
                cursor = seen[-1] if seen else 0
                rows = await conn.fetch(
                    "SELECT seq FROM messages WHERE room_id = $1 AND seq > $2 ORDER BY seq", room_id, cursor
                )
                batch = [r["seq"] for r in rows]
                assert batch == list(range(cursor + 1, cursor + 1 + len(batch))), f"gap after {cursor}: {batch[:5]}"
                seen.extend(batch)
                if done:
                    return
                await asyncio.sleep(0)
        finally:
            await conn.close()

    stop = asyncio.Event()
    reader = asyncio.create_task(read(stop))
    await asyncio.gather(*(write(n) for n in range(writers)))
    stop.set()
    await reader
    assert seen == list(range(1, committed + 1))
    assert await admin.fetchval("SELECT last_seq FROM rooms WHERE id = $1", room_id) == committed
    await admin.close()


async def test_seq_cannot_be_chosen_by_the_inserter(database_url: str) -> None:
    conn = await asyncpg.connect(libpq_url(database_url))
    try:
        room_id = await conn.fetchval("INSERT INTO rooms (name) VALUES ($1) RETURNING id", unique("seq"))
        seq = await conn.fetchval(
            "INSERT INTO messages (room_id, seq, author, body) VALUES ($1, 999, 'x', 'y') RETURNING seq", room_id
        )
        assert seq == 1
    finally:
        await conn.close()
