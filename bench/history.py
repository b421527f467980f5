"""Scenario 5's database side: a room of N messages, and its history pages measured in SQL.

The SQL measured is the server's own: we call chat.store.messages_before and capture the
statement it sends, then EXPLAIN (ANALYZE, BUFFERS) exactly that."""

from __future__ import annotations

import random
import secrets
import time
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import create_async_engine

from bench.stats import describe
from chat.db import explain, statements_sent


async def fill_room(dsn: str, *, name: str, rows: int) -> dict[str, Any]:
    """Create room `name` holding seqs 1..rows (unless it already does).

    Inserted in one statement with session_replication_role = replica, which skips the per-row
    triggers: the rows are what the triggers would have made (seq 1..N, rooms.last_seq = N), but
    without 1,000,000 NOTIFYs in Postgres's queue and 1,000,000 versions of the room's row."""
    conn = await asyncpg.connect(dsn)
    try:
        room_id = await conn.fetchval(
            "INSERT INTO rooms (name) VALUES ($1) ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
            name,
        )
        head = await conn.fetchval("SELECT last_seq FROM rooms WHERE id = $1", room_id)
        started = time.monotonic()
        if head != rows:
            async with conn.transaction():
                await conn.execute("DELETE FROM messages WHERE room_id = $1", room_id)
                await conn.execute("SET LOCAL session_replication_role = replica")
                await conn.execute(
                    "INSERT INTO messages (room_id, seq, author, body, created_at) "
                    "SELECT $1, g, 'bench', 'message ' || g || ' of the history room', "
                    "       now() - ($2 - g) * interval '1 second' "
                    "FROM generate_series(1, $2::bigint) g",
                    room_id,
                    rows,
                )
                await conn.execute("UPDATE rooms SET last_seq = $2 WHERE id = $1", room_id, rows)
            await conn.execute("VACUUM (ANALYZE) messages")
            await conn.execute("VACUUM (ANALYZE) rooms")
        size = await conn.fetchrow(
            "SELECT pg_relation_size('messages') AS heap, pg_indexes_size('messages') AS indexes, "
            "current_setting('shared_buffers') AS shared_buffers"
        )
    finally:
        await conn.close()
    return {
        "room_id": int(room_id),
        "rows": rows,
        "load_seconds": round(time.monotonic() - started, 1),
        "table_mb": round(size["heap"] / 2**20, 1),
        "indexes_mb": round(size["indexes"] / 2**20, 1),
        "shared_buffers": size["shared_buffers"],
    }


async def measure_sql(url: str, *, room_id: int, head: int, samples: int, limit: int = 50) -> dict[str, Any]:
    """Latest page (join: no `before`; a history request: before = head + 1), an old page
    (before = 1001) and random pages, through chat.store.messages_before as the server calls it."""
    from chat import store

    engine = create_async_engine(url)

    old = min(1001, head + 1)
    pages: dict[str, list[int | None]] = {
        "latest (join replay)": [None] * samples,
        "latest (history request)": [head + 1] * samples,
        "old (seq 951-1000)": [old] * samples,
        "random": [random.randint(limit + 1, head + 1) for _ in range(samples)],
    }
    results: dict[str, Any] = {}
    try:
        async with engine.connect() as conn:
            for label, befores in pages.items():
                timings = []
                for before in befores:
                    t = time.perf_counter()
                    rows = await store.messages_before(conn, room_id=room_id, before=before, limit=limit)
                    timings.append((time.perf_counter() - t) * 1000)
                    assert len(rows) == min(limit, head if before is None else before - 1)
                async with statements_sent(conn) as sent:
                    await store.messages_before(conn, room_id=room_id, before=befores[0], limit=limit)
                statement = sent[-1].sql
                plan = "\n".join(str(r[0]) for r in await explain(conn, sent[-1], "ANALYZE, BUFFERS"))
                results[label] = {
                    "before": befores[0] if label != "random" else "random",
                    "roundtrip_ms": describe(timings),
                    "sql": statement,
                    "explain": plan,
                    "execution_ms": _execution_ms(plan),
                    "index_only": _page_scan(plan).startswith("Index Only Scan"),
                    "node": _page_scan(plan),
                }
                await conn.rollback()
    finally:
        await engine.dispose()
    return results


def _execution_ms(plan: str) -> float | None:
    for line in plan.splitlines():
        if line.strip().startswith("Execution Time:"):
            return float(line.split(":")[1].split()[0])
    return None


def reread_plans(result: dict[str, Any]) -> None:
    """Name each page's scan again from its stored EXPLAIN (a run's JSON rendered again)."""
    for page in result.get("sql", {}).values():
        if isinstance(page, dict) and "explain" in page:
            page["node"] = _page_scan(page["explain"])
            page["index_only"] = page["node"].startswith("Index Only Scan")


def _page_scan(plan: str) -> str:
    """The node that reads the page's rows: the scan of `messages` itself (not of the rooms row
    the head comes from, nor a subplan's: a reply's original, the reactions)."""
    for line in plan.splitlines():
        text = line.strip().lstrip("-> ").strip().split("  (")[0]
        if "Scan" in text and text.endswith(" on messages"):
            return text
    return ""


COVERING_INDEX = (
    "CREATE INDEX IF NOT EXISTS bench_messages_covering ON messages (room_id, seq) "
    "INCLUDE (author, body, kind, author_id, client_id, created_at)"
)


async def add_covering_index(dsn: str, room_id: int) -> dict[str, Any]:
    """Only for the experiment: a covering index, so that the page can be an index-only scan.
    Also tries (and rolls back) a 6,000-character message: a B-tree entry holds at most about
    2,700 bytes, so a covering index that includes the body refuses long messages."""
    conn = await asyncpg.connect(dsn)
    try:
        started = time.monotonic()
        await conn.execute(COVERING_INDEX)
        await conn.execute("VACUUM (ANALYZE) messages")
        size = await conn.fetchval("SELECT pg_relation_size('bench_messages_covering')")
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute(
                "INSERT INTO messages (room_id, author, body) VALUES ($1, 'bench', $2)",
                room_id,
                secrets.token_urlsafe(4500),
            )
            long_message = "stored"
        except asyncpg.PostgresError as exc:
            long_message = f"refused: {exc}"
        finally:
            await transaction.rollback()
        return {
            "long_message_6000_chars": long_message,
            "sql": COVERING_INDEX,
            "build_seconds": round(time.monotonic() - started, 1),
            "mb": round(size / 2**20, 1),
        }
    finally:
        await conn.close()


async def drop_covering_index(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP INDEX IF EXISTS bench_messages_covering")
    finally:
        await conn.close()
