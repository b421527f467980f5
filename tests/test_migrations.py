from __future__ import annotations

import asyncio

import asyncpg
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from chat.cli import ROOT, run_migrations
from chat.config import libpq_url
from chat.models import Base
from tests.conftest import Database


def _config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["url"] = url
    config.attributes["configure_logging"] = False
    return config


def _inspect(url: str) -> tuple[set[str], list[object]]:
    def look(conn: Connection) -> tuple[set[str], list[object]]:
        tables = set(inspect(conn).get_table_names())
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        return tables, diff

    async def run() -> tuple[set[str], list[object]]:
        engine = create_async_engine(url)
        async with engine.connect() as conn:
            result = await conn.run_sync(look)
        await engine.dispose()
        return result

    return asyncio.run(run())


def test_upgrade_downgrade_upgrade_without_drift(postgres: Database) -> None:
    url = postgres.create("chat_migrations")
    run_migrations(url)
    tables, diff = _inspect(url)
    assert {"users", "tokens", "rooms", "messages"} <= tables
    assert diff == [], f"models and migrations differ: {diff}"

    command.downgrade(_config(url), "base")
    tables, _ = _inspect(url)
    assert tables == {"alembic_version"}

    run_migrations(url)
    tables, diff = _inspect(url)
    assert {"users", "tokens", "rooms", "messages"} <= tables
    assert diff == []


def test_message_changes_go_down_and_up_with_data(postgres: Database) -> None:
    """Migration 0008 with change events stored: down to 0007 keeps the messages (as they are
    now) and drops the events and reactions; up again works on what is left."""
    url = postgres.create("chat_migrations_changes")
    run_migrations(url)

    async def fill() -> None:
        conn = await asyncpg.connect(libpq_url(url))
        try:
            await conn.execute("INSERT INTO users (name) VALUES ('u')")
            await conn.execute("INSERT INTO rooms (name) VALUES ('r')")
            await conn.execute(
                "INSERT INTO messages (room_id, author_id, author, body)"
                " SELECT r.id, u.id, 'u', 'one' FROM rooms r, users u"
            )
            await conn.execute("UPDATE messages SET body = 'one, edited' WHERE seq = 1")
            await conn.execute(
                "INSERT INTO messages (room_id, author_id, author, kind, body, target_seq)"
                " SELECT r.id, u.id, 'u', 'react', '👍', 1 FROM rooms r, users u"
            )
            kinds = [r["kind"] for r in await conn.fetch("SELECT kind FROM messages ORDER BY seq")]
            assert kinds == ["text", "edit", "react"]
        finally:
            await conn.close()

    async def check() -> list[tuple[int, str, str]]:
        conn = await asyncpg.connect(libpq_url(url))
        try:
            rows = await conn.fetch("SELECT seq, kind, body FROM messages ORDER BY seq")
            return [(r["seq"], r["kind"], r["body"]) for r in rows]
        finally:
            await conn.close()

    asyncio.run(fill())
    command.downgrade(_config(url), "0007")
    assert asyncio.run(check()) == [(1, "text", "one, edited")]
    run_migrations(url)
    _, diff = _inspect(url)
    assert diff == []
    assert asyncio.run(check()) == [(1, "text", "one, edited")]


def test_membership_migration_on_a_filled_database(postgres: Database) -> None:
    """0009 on data written by 0008: rooms become public, writers and creators become members
    (read up to the head), and the downgrade gives the old schema back with the data."""
    url = postgres.create("chat_membership")
    run_migrations(url, "0008")

    async def fill() -> None:
        engine = create_async_engine(url)
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO users (name) VALUES ('ann'), ('ben'), ('cat')"))
            await conn.execute(
                text(
                    "INSERT INTO rooms (name, created_by) VALUES "
                    "('general', (SELECT id FROM users WHERE name = 'cat')), ('quiet', NULL)"
                )
            )
            for author, room in (("ann", "general"), ("ann", "general"), ("ben", "quiet"), ("ann", "quiet")):
                await conn.execute(
                    text(
                        "INSERT INTO messages (room_id, author_id, author, body) SELECT r.id, u.id, u.name, 'hi @ben' "
                        "FROM rooms r, users u WHERE r.name = :r AND u.name = :a"
                    ),
                    {"r": room, "a": author},
                )
        await engine.dispose()

    async def look() -> tuple[list[tuple[str, str]], list[tuple[str, str, int]]]:
        engine = create_async_engine(url)
        async with engine.connect() as conn:
            rooms = [
                (r.name, r.visibility)
                for r in await conn.execute(text("SELECT name, visibility FROM rooms ORDER BY name"))
            ]
            members = [
                (r.name, r.room, r.read_seq)
                for r in await conn.execute(
                    text(
                        "SELECT u.name, r.name AS room, m.read_seq FROM memberships m "
                        "JOIN users u ON u.id = m.user_id JOIN rooms r ON r.id = m.room_id ORDER BY 2, 1"
                    )
                )
            ]
        await engine.dispose()
        return rooms, members

    asyncio.run(fill())
    run_migrations(url)
    rooms, members = asyncio.run(look())
    assert rooms == [("general", "public"), ("quiet", "public")]
    assert members == [("ann", "general", 2), ("cat", "general", 2), ("ann", "quiet", 2), ("ben", "quiet", 2)]

    command.downgrade(_config(url), "0008")
    tables, _ = _inspect(url)
    assert "memberships" not in tables and "mentions" not in tables and "messages" in tables
    run_migrations(url)
    assert asyncio.run(look())[0] == rooms


def test_search_index_has_no_pending_list(postgres: Database) -> None:
    """Migration 0012: the search index takes entries at once (fastupdate off; its pending list's
    flush stalled the writer's INSERT), and what was pending before it is merged, not left for
    every search to read."""
    url = postgres.create("chat_migrations_search")
    command.upgrade(_config(url), "0011")
    index = "messages_room_search_idx"

    async def fill(name: str) -> None:
        conn = await asyncpg.connect(libpq_url(url))
        try:
            user_id = await conn.fetchval("INSERT INTO users (name) VALUES ($1) RETURNING id", name)
            room_id = await conn.fetchval("INSERT INTO rooms (name) VALUES ($1) RETURNING id", name)
            await conn.execute(
                "INSERT INTO messages (room_id, author_id, author, body)"
                " SELECT $1, $2, $3, 'word ' || i FROM generate_series(1, 200) i",
                room_id,
                user_id,
                name,
            )
        finally:
            await conn.close()

    async def look() -> tuple[list[str] | None, int, int]:
        conn = await asyncpg.connect(libpq_url(url))
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
            options = await conn.fetchval("SELECT reloptions FROM pg_class WHERE relname = $1", index)
            pending = await conn.fetchval("SELECT n_pending_tuples FROM gin_metapage_info(get_raw_page($1, 0))", index)
            found = await conn.fetchval("SELECT count(*) FROM messages WHERE search @@ to_tsquery('simple', 'word')")
            return options, pending, found
        finally:
            await conn.close()

    asyncio.run(fill("before"))
    options, pending, found = asyncio.run(look())
    assert options is None and pending == 200 and found == 200  # before: the 200 rows are pending
    run_migrations(url)
    options, pending, found = asyncio.run(look())
    assert options == ["fastupdate=off"] and pending == 0 and found == 200
    asyncio.run(fill("after"))  # new rows go into the index itself
    options, pending, found = asyncio.run(look())
    assert pending == 0 and found == 400
