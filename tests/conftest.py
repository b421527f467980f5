"""A real, ephemeral Postgres for the whole session: the embedded one in a temporary folder, or
a fresh database on the server named by DATABASE_URL. Never mocked."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from chat import store
from chat.cli import run_migrations
from chat.config import Settings, asyncpg_url, libpq_url
from chat.embedded import EmbeddedPostgres
from tests.redisserver import RedisServer
from tests.servers import Server

# Settings made in this process read no .env either (tests/servers.py does the same for servers):
# a developer's .env in the working directory must not change test results.
Settings.model_config["env_file"] = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    """Note how far each server's log had got, so that a failure can show what came after."""
    item.stash[_LOG_OFFSETS] = {s.log_path: _size(s.log_path) for s in Server.started}
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test's report carries what each server logged while it ran: a failure in CI
    is then read from its output alone."""
    report = yield
    if report.failed:
        offsets = item.stash.get(_LOG_OFFSETS, {})
        for server in Server.started:
            start, text = offsets.get(server.log_path, 0), ""
            with contextlib.suppress(OSError), open(server.log_path, "rb") as log:
                log.seek(start)
                text = log.read().decode(errors="replace")
            if text.strip():
                report.sections.append((f"server {server.port} log ({report.when})", text[-20_000:]))
    return report


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


_LOG_OFFSETS = pytest.StashKey[dict[Path, int]]()


def _with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    base = base.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{query}" if query else "")


class Database:
    """The test Postgres server, able to make fresh databases on it."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url

    def create(self, prefix: str = "chat_test") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        self.execute(f'CREATE DATABASE "{name}"')
        return _with_database(self.admin_url, name)

    def execute(self, sql: str) -> None:
        asyncio.run(self._exec(sql))

    async def _exec(self, sql: str) -> None:
        conn = await asyncpg.connect(libpq_url(self.admin_url))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()


@pytest.fixture(scope="session")
def tmp_root() -> Iterator[Path]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="chat-test-", dir=base))
    os.chmod(path, 0o755)  # the embedded server's unprivileged account must reach its folder
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(tmp_root: Path) -> Iterator[Database]:
    if url := os.environ.get("DATABASE_URL"):
        yield Database(asyncpg_url(url))
        return
    with EmbeddedPostgres(tmp_root / "pg", durable=False) as pg:
        yield Database(pg.url)


@pytest.fixture(scope="session")
def database_url(postgres: Database) -> str:
    url = postgres.create()
    run_migrations(url)
    return url


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(database_url)
    yield engine
    await engine.dispose()


MakeToken = Callable[..., Awaitable[str]]


@pytest.fixture(scope="session")
def make_token(engine: AsyncEngine) -> MakeToken:
    return token_maker(engine)


def token_maker(engine: AsyncEngine) -> MakeToken:
    async def make(name: str | None = None, *, ttl: timedelta | None = timedelta(hours=1)) -> str:
        async with engine.connect() as conn:
            _, raw = await store.create_token(conn, user_name=name or unique("user"), ttl=ttl)
        return raw

    return make


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def server_a(database_url: str, tmp_root: Path) -> Iterator[Server]:
    server = Server(database_url, tmp_root)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server_b(database_url: str, tmp_root: Path) -> Iterator[Server]:
    server = Server(database_url, tmp_root)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_root: Path) -> Iterator[RedisServer]:
    """Debian's redis-server for the whole session (tests that restart Redis start their own)."""
    server = RedisServer(tmp_root / "redis")
    yield server
    server.stop()
