from __future__ import annotations

import asyncio

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect
from sqlalchemy.ext.asyncio import create_async_engine

from chat.cli import ROOT, run_migrations
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
