"""The migration and fan-out tests again, on PostgreSQL 15 (Debian's postgresql-15 binaries) as
the external database: the README promises 13 or newer, and the rest of the suite runs on the
embedded 18. This module's fixtures replace the session's database and servers; the tests are
the same functions as in test_migrations.py and test_fanout.py, imported."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from chat.cli import run_migrations
from chat.config import libpq_url
from chat.embedded import EmbeddedPostgres
from tests.conftest import Database, MakeToken, token_maker
from tests.daemons import need
from tests.servers import Server
from tests.test_fanout import (  # noqa: F401 (collected here, with this module's fixtures)
    test_listener_killed_mid_stream_loses_nothing,
    test_room_messages_cross_processes_in_order,
    test_row_inserted_with_plain_sql_reaches_live_sockets,
)
from tests.test_migrations import test_upgrade_downgrade_upgrade_without_drift  # noqa: F401

PG15 = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="module")
def postgres(tmp_root: Path) -> Iterator[Database]:
    need(PG15 / "postgres", "postgresql-15")
    with EmbeddedPostgres(tmp_root / "pg15", durable=False, binaries=PG15) as pg:
        yield Database(pg.url)


@pytest.fixture(scope="module")
def database_url(postgres: Database) -> str:
    url = postgres.create("chat_pg15")
    run_migrations(url)
    return url


@pytest.fixture(scope="module")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="module")
def make_token(engine: AsyncEngine) -> MakeToken:
    return token_maker(engine)


@pytest.fixture(scope="module")
def server_a(database_url: str, tmp_root: Path) -> Iterator[Server]:
    server = Server(database_url, tmp_root)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server_b(database_url: str, tmp_root: Path) -> Iterator[Server]:
    server = Server(database_url, tmp_root)
    yield server
    server.stop()


def test_the_database_is_postgres_15(database_url: str) -> None:
    async def version() -> int:
        conn = await asyncpg.connect(libpq_url(database_url))
        try:
            return int(await conn.fetchval("SHOW server_version_num"))
        finally:
            await conn.close()

    assert asyncio.run(version()) // 10000 == 15
