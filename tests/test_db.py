"""The engine (chat/db.py): connect options for a transaction-mode pooler (pure; the pooler itself
is tests/test_pgbouncer.py), and a pooled connection whose backend is gone is not handed out again."""

from __future__ import annotations

import asyncio

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from chat.config import Settings, libpq_url
from chat.db import connect_args, create_engine, drop_dead_connections, reading, statement_name


def test_direct_connections_keep_asyncpgs_statement_cache() -> None:
    args = connect_args(Settings(database_pooler="none"))
    assert args == {"server_settings": {"application_name": "chat"}}


def test_transaction_pooler_gets_unique_names_and_no_caches() -> None:
    args = connect_args(Settings(database_pooler="transaction"))
    assert args["statement_cache_size"] == 0 and args["prepared_statement_cache_size"] == 0
    name = args["prepared_statement_name_func"]
    names = {name() for _ in range(1000)}
    assert len(names) == 1000 and all(n.startswith("__asyncpg_") for n in names)
    assert statement_name() not in names


async def pooled_backend(engine: AsyncEngine) -> tuple[int, asyncpg.Connection]:
    """Check a connection out and back in; its backend's pid and its asyncpg connection."""
    async with engine.connect() as conn:
        pid = await conn.scalar(text("SELECT pg_backend_pid()"))
        raw = await conn.get_raw_connection()
        driver: asyncpg.Connection = raw.driver_connection
    assert isinstance(pid, int)
    return pid, driver


async def terminate(admin: asyncpg.Connection, pid: int, driver: asyncpg.Connection) -> None:
    """pg_terminate_backend, as a failover or a pooler restart does, then wait until the pooled
    connection has seen its close (asyncpg reads it as it comes, with no statement running)."""
    assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    async with asyncio.timeout(10):
        while not driver.is_closed():
            await asyncio.sleep(0.01)


async def test_a_connection_terminated_while_pooled_is_replaced_at_checkout(database_url: str) -> None:
    """The next checkout notices the dead connection without a round trip and opens a fresh
    one, so the statement works."""
    engine = create_engine(Settings(pool_size=1, _env_file=None), database_url)  # type: ignore[call-arg]
    admin = await asyncpg.connect(libpq_url(database_url))
    try:
        first, driver = await pooled_backend(engine)
        await terminate(admin, first, driver)
        second, _ = await pooled_backend(engine)
        assert second != first
    finally:
        await admin.close()
        await engine.dispose()


async def test_without_the_check_the_dead_connection_fails_a_statement(database_url: str) -> None:
    """The same without drop_dead_connections: what the check saves a client from."""
    engine = create_async_engine(database_url, pool_size=1)
    admin = await asyncpg.connect(libpq_url(database_url))
    failed = False
    try:
        first, driver = await pooled_backend(engine)
        await terminate(admin, first, driver)
        try:
            async with engine.connect() as conn:
                await conn.scalar(text("SELECT 1"))
        except Exception:
            failed = True
        assert failed
        drop_dead_connections(engine)  # and with it, from now on
        first, driver = await pooled_backend(engine)
        await terminate(admin, first, driver)
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT 1")) == 1
    finally:
        await admin.close()
        await engine.dispose()


async def test_reading_runs_each_statement_on_its_own_without_begin(database_url: str) -> None:
    """`reading` is autocommit: no BEGIN before the first statement (each statement is its own
    transaction, so two get two transaction ids), and the next plain checkout of the same pooled
    connection is in a transaction again."""
    engine = create_engine(Settings(pool_size=1, _env_file=None), database_url)  # type: ignore[call-arg]
    xact = text("SELECT pg_current_xact_id()::text")
    try:
        async with reading(engine) as conn:
            first, second = await conn.scalar(xact), await conn.scalar(xact)
            assert first != second
        async with engine.connect() as conn:  # the same pooled connection, back to transactions
            first, second = await conn.scalar(xact), await conn.scalar(xact)
            assert first == second
    finally:
        await engine.dispose()
