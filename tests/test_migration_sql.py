"""migrations/sql.py: a downgrade restores an earlier migration's function, read from its file."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from alembic import command
from alembic.config import Config

from chat.cli import ROOT, run_migrations
from chat.config import libpq_url
from migrations.sql import earlier_definition, earlier_function
from tests.conftest import Database


def test_a_create_function_becomes_create_or_replace() -> None:
    original = earlier_definition("0001_initial", "NOTIFY_FUNCTION")
    assert original.lstrip().startswith("CREATE FUNCTION chat_message_notify()")
    restored = earlier_function("0001_initial", "NOTIFY_FUNCTION")
    assert restored == original.lstrip().replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
    # Already CREATE OR REPLACE (0007's): left as it is.
    assert (
        earlier_function("0007_redis_fanout", "NOTIFY_FUNCTION")
        == earlier_definition("0007_redis_fanout", "NOTIFY_FUNCTION").lstrip()
    )


def test_what_is_not_a_function_is_refused() -> None:
    with pytest.raises(ValueError, match="does not define a function"):
        earlier_function("0008_message_changes", "MESSAGE_KINDS")
    with pytest.raises(FileNotFoundError):
        earlier_function("0099_nothing", "NOTIFY_FUNCTION")


def _notify_body(url: str) -> str:
    """The trigger function's body as the database holds it."""

    async def read() -> str:
        conn = await asyncpg.connect(libpq_url(url))
        try:
            body: str = await conn.fetchval("SELECT prosrc FROM pg_proc WHERE proname = 'chat_message_notify'")
            return body
        finally:
            await conn.close()

    return asyncio.run(read())


def _body_of(migration: str) -> str:
    return earlier_definition(migration, "NOTIFY_FUNCTION").split("$$")[1]


def test_downgrades_restore_the_earlier_notify_functions(postgres: Database) -> None:
    """0008 down puts back 0007's trigger function, and 0007 down puts back 0001's, exactly."""
    url = postgres.create("chat_migration_sql")
    run_migrations(url)
    config = Config()
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["url"] = url
    config.attributes["configure_logging"] = False
    assert "reply_to" in _notify_body(url)  # 0008's

    command.downgrade(config, "0007")
    assert _notify_body(url) == _body_of("0007_redis_fanout")

    command.downgrade(config, "0006")
    assert _notify_body(url) == _body_of("0001_initial")
    assert "chat_relay" not in _notify_body(url)
