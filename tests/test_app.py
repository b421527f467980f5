"""The app's lifespan (chat/app.py), run in this process on the real test Postgres: whatever
start-up got to, the way out closes every connection and finishes every task."""

from __future__ import annotations

import asyncio
import os

import asyncpg
import pytest
from sqlalchemy.exc import ProgrammingError

from chat.app import create_app
from chat.cli import run_migrations
from chat.config import Settings, libpq_url
from tests.conftest import Database


def _name(url: str) -> str:
    return url.split("?")[0].rsplit("/", 1)[1]


async def backends(admin_url: str, database: str) -> int:
    """Sessions open on `database` (the admin connection is on another one)."""
    conn = await asyncpg.connect(libpq_url(admin_url))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = $1", database))
    finally:
        await conn.close()


async def until_no_backends(admin_url: str, database: str) -> int:
    """Closed sessions leave pg_stat_activity a moment after the client hangs up."""
    async with asyncio.timeout(5):
        while (n := await backends(admin_url, database)) != 0:
            await asyncio.sleep(0.05)
    return n


def our_tasks() -> list[asyncio.Task[object]]:
    current = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t is not current and not t.done()]


@pytest.fixture
def broken_database(postgres: Database) -> str:
    """Migrated, then the presence heartbeat's table taken away: presence cannot start."""
    url = postgres.create("chat_broken")
    run_migrations(url)
    asyncio.run(_drop(url))
    return url


async def _drop(url: str) -> None:
    conn = await asyncpg.connect(libpq_url(url))
    try:
        await conn.execute("DROP TABLE chat_processes CASCADE")
    finally:
        await conn.close()


async def test_a_failed_start_up_closes_what_it_opened(broken_database: str, postgres: Database) -> None:
    """Before: presence failed to start after the engine and the LISTEN connection were open, and
    they stayed open. After: both are closed before the error comes out."""
    before = set(our_tasks())
    app = create_app(Settings(database_url=broken_database))
    with pytest.raises(ProgrammingError, match="chat_processes"):
        async with app.router.lifespan_context(app):
            pass
    assert await until_no_backends(postgres.admin_url, _name(broken_database)) == 0
    assert set(our_tasks()) <= before  # no supervisor, heartbeat or token watcher left running


async def test_shutdown_awaits_its_tasks(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Background tasks are cancelled and awaited: none is left when the lifespan returns."""
    monkeypatch.setenv("CHAT_SUPERVISOR_PID", str(os.getppid()))  # with the supervisor watchdog too
    before = set(our_tasks())
    app = create_app(Settings(database_url=database_url))
    async with app.router.lifespan_context(app):
        # listener supervisor, presence beat, token watch, watchdog
        assert len(set(our_tasks()) - before) >= 4
    assert set(our_tasks()) <= before
