from __future__ import annotations

import asyncio

import asyncpg
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect
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
