"""The machine's limits, measured with bare asyncpg on the same database: no Python web stack.

- NOTIFY -> LISTEN latency: one connection sends `SELECT pg_notify(...)` at a fixed rate with
  its send time in the payload, another LISTENs; plus how many bare NOTIFYs/s one connection
  commits back to back.
- INSERT + NOTIFY: W writers, each looping one autocommit transaction per message, while a
  listener receives every notification. Two variants:
  * "plain": a bare table, `WITH m AS (INSERT ...) SELECT pg_notify(...)`: the issue's
    raw loop, the ceiling the targets are measured against;
  * "schema": the chat's own `messages` table with its triggers (per-room seq under the room's
    row lock, NOTIFY of the JSON payload), i.e. the app's SQL with Python taken away, in one
    round trip (an autocommit INSERT), which is also exactly what the server sends per message.
- The same INSERT batched: R rows per statement (`unnest`), one transaction and one fsync per
  statement, as the group-commit writer does: the ceiling with the project's triggers in plain view.
- A single commit: one writer, one row per statement, paced (not back to back), so each commit
  stands alone, as a lone message's does; the ack latency target is measured against it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg

from bench.stats import describe

now_ns = time.monotonic_ns


async def notify_latency(dsn: str, *, rate: float, seconds: float) -> dict[str, Any]:
    listener = await asyncpg.connect(dsn)
    sender = await asyncpg.connect(dsn)
    latencies: list[float] = []

    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        latencies.append((now_ns() - int(payload)) / 1e6)

    try:
        await listener.add_listener("bench_ping", on_notify)
        interval = 1.0 / rate
        start = time.monotonic()
        sent = 0
        while (elapsed := time.monotonic() - start) < seconds:
            await sender.execute("SELECT pg_notify('bench_ping', $1)", str(now_ns()))
            sent += 1
            await asyncio.sleep(max(0.0, sent * interval - elapsed))
        await asyncio.sleep(0.5)
        # Back to back: how many bare NOTIFY transactions one connection commits per second.
        count = 0
        start = time.monotonic()
        while time.monotonic() - start < min(seconds, 2.0):
            await sender.execute("SELECT pg_notify('bench_flood', 'x' || $1::text)", str(count))
            count += 1
        flood_rate = count / (time.monotonic() - start)
    finally:
        await sender.close()
        await listener.close()
    return {"sent": sent, "rate": rate, "latency_ms": describe(latencies), "max_rate_1_conn": round(flood_rate)}


async def _prepare(dsn: str, rooms: int) -> tuple[list[int], int]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_raw ("
            " id bigserial PRIMARY KEY, room_id bigint NOT NULL, body text NOT NULL,"
            " created_at timestamptz NOT NULL DEFAULT now())"
        )
        user_id = await conn.fetchval(
            "INSERT INTO users (name) VALUES ('bench-raw') ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name "
            "RETURNING id"
        )
        room_ids = []
        for i in range(rooms):
            room_ids.append(
                await conn.fetchval(
                    "INSERT INTO rooms (name) VALUES ($1) ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name "
                    "RETURNING id",
                    f"raw-{i}",
                )
            )
    finally:
        await conn.close()
    return room_ids, int(user_id)


async def drop_raw_table(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP TABLE IF EXISTS bench_raw")
    finally:
        await conn.close()


async def insert_notify(dsn: str, *, table: str, writers: int, seconds: float, rooms: int = 10) -> dict[str, Any]:
    """W writers looping INSERT + NOTIFY (one transaction each) for `seconds`."""
    room_ids, user_id = await _prepare(dsn, rooms)
    listener = await asyncpg.connect(dsn)
    conns = [await asyncpg.connect(dsn) for _ in range(writers)]
    received: list[float] = []

    def on_plain(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        received.append((now_ns() - int(payload[:20])) / 1e6)

    def on_schema(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        client_id = json.loads(payload).get("client_id") or ""
        if client_id.startswith("raw-"):
            received.append((now_ns() - int(client_id[4:24])) / 1e6)

    if table == "plain":
        await listener.add_listener("bench_raw", on_plain)
        sql = (
            "WITH m AS (INSERT INTO bench_raw (room_id, body) VALUES ($1, $2) RETURNING id) "
            "SELECT pg_notify('bench_raw', $2) FROM m"
        )
    else:
        for room_id in room_ids:
            await listener.add_listener(f"room_{room_id}", on_schema)
        sql = (
            "INSERT INTO messages (room_id, author_id, author, body, client_id) "
            "VALUES ($1, $2, 'bench-raw', $3, $3) RETURNING seq"
        )
    commits: list[float] = []
    deadline = time.monotonic() + seconds

    async def writer(w: int) -> None:
        conn = conns[w]
        room_id = room_ids[w % len(room_ids)]
        n = 0
        while time.monotonic() < deadline:
            t = now_ns()
            n += 1
            if table == "plain":
                await conn.execute(sql, room_id, f"{t:020d} {w} {n}")
            else:
                await conn.fetchval(sql, room_id, user_id, f"raw-{t:020d}-{w}-{n}")
            commits.append((now_ns() - t) / 1e6)

    start = time.monotonic()
    try:
        await asyncio.gather(*(writer(w) for w in range(writers)))
        elapsed = time.monotonic() - start
        for _ in range(100):  # let the listener catch up
            if len(received) >= len(commits):
                break
            await asyncio.sleep(0.05)
    finally:
        for conn in conns:
            await conn.close()
        await listener.close()
    return {
        "table": table,
        "writers": writers,
        "seconds": round(elapsed, 2),
        "committed": len(commits),
        "committed_per_s": round(len(commits) / elapsed, 1),
        "received": len(received),
        "commit_ms": describe(commits),
        "notify_ms": describe(received),
    }


BATCH_SQL = (
    "INSERT INTO messages (room_id, author_id, author, body, client_id) "
    "SELECT $1, $2, 'bench-raw', b, b FROM unnest($3::text[]) AS b RETURNING seq"
)


async def insert_batched(dsn: str, *, writers: int, rows: int, seconds: float, rooms: int = 10) -> dict[str, Any]:
    """W writers looping one autocommit INSERT of `rows` rows into `messages` (triggers and all)."""
    room_ids, user_id = await _prepare(dsn, rooms)
    conns = [await asyncpg.connect(dsn) for _ in range(writers)]
    commits: list[float] = []
    stored = 0
    deadline = time.monotonic() + seconds

    async def writer(w: int) -> None:
        nonlocal stored
        conn = conns[w]
        room_id = room_ids[w % len(room_ids)]
        n = 0
        while time.monotonic() < deadline:
            t = now_ns()
            bodies = [f"raw-{t:020d}-{w}-{n + i}" for i in range(rows)]
            n += rows
            await conn.fetch(BATCH_SQL, room_id, user_id, bodies)
            commits.append((now_ns() - t) / 1e6)
            stored += rows

    start = time.monotonic()
    try:
        await asyncio.gather(*(writer(w) for w in range(writers)))
        elapsed = time.monotonic() - start
    finally:
        for conn in conns:
            await conn.close()
    return {
        "table": "schema",
        "writers": writers,
        "rows_per_statement": rows,
        "seconds": round(elapsed, 2),
        "committed": stored,
        "committed_per_s": round(stored / elapsed, 1),
        "statements_per_s": round(len(commits) / elapsed, 1),
        "commit_ms": describe(commits),
    }


async def single_commit(dsn: str, *, rate: float, seconds: float, warmup: float = 0.5) -> dict[str, Any]:
    """One writer, one row per autocommit INSERT into `messages`, `rate` a second: what one
    fsync'd commit costs on this disk when nothing else is committing. The first `warmup`
    seconds are not measured, as in the load runs: right after a checkpoint the first change to
    each page logs the whole page."""
    room_ids, user_id = await _prepare(dsn, 1)
    conn = await asyncpg.connect(dsn)
    sql = (
        "INSERT INTO messages (room_id, author_id, author, body, client_id) "
        "VALUES ($1, $2, 'bench-raw', $3, $3) RETURNING seq"
    )
    commits: list[float] = []
    try:
        interval = 1.0 / rate
        due = time.monotonic()
        measure_from = due + warmup
        deadline = measure_from + seconds
        n = 0
        while due < deadline:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            t = now_ns()
            n += 1
            await conn.fetchval(sql, room_ids[0], user_id, f"raw-{t:020d}-single-{n}")
            if due >= measure_from:
                commits.append((now_ns() - t) / 1e6)
            due += interval
    finally:
        await conn.close()
    return {"rate": rate, "commits": len(commits), "commit_ms": describe(commits)}
