"""The async engine, and the connect arguments every SQLAlchemy engine of ours shares."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.engine import Connection, Engine, ExceptionContext
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util import await_

from chat.config import Settings


def _closed(driver: Any) -> bool:
    is_closed = getattr(driver, "is_closed", None)
    return bool(is_closed()) if callable(is_closed) else False


def drop_dead_connections(engine: AsyncEngine) -> None:
    """At checkout, hand out no connection whose socket is already closed (its backend was
    terminated, Postgres restarted): asyncpg notices the close as it happens, so this costs no
    round trip, unlike pre-ping. The pool then opens a fresh connection instead."""

    @event.listens_for(engine.sync_engine, "checkout")
    def _check(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if _closed(getattr(dbapi_connection, "driver_connection", None)):
            raise DisconnectionError("connection closed while in the pool")


def statement_name() -> str:
    # Unique across every client of a transaction-mode pooler: asyncpg's default names
    # (__asyncpg_stmt_1__, …) collide on server connections that other clients prepared on.
    return f"__asyncpg_{uuid.uuid4().hex}__"


def connect_args(settings: Settings) -> dict[str, Any]:
    """asyncpg's connect arguments. Behind a transaction-mode pooler (CHAT_DATABASE_POOLER=
    transaction: PgBouncer before 1.21, or 1.21+ without max_prepared_statements) a session's
    prepared statements live on whichever server connection ran them, so nothing may be cached
    across transactions: SQLAlchemy's and asyncpg's statement caches are off, and each statement
    gets a unique name (SQLAlchemy's asyncpg dialect docs, "Prepared Statement Name with PGBouncer")."""
    args: dict[str, Any] = {"server_settings": {"application_name": "chat"}}
    if settings.database_pooler == "transaction":
        args.update(
            prepared_statement_name_func=statement_name,
            prepared_statement_cache_size=0,  # SQLAlchemy's cache of prepared statements
            statement_cache_size=0,  # asyncpg's own
        )
    return args


def create_engine(settings: Settings, url: str, **options: Any) -> AsyncEngine:
    engine_options: dict[str, Any] = {
        "pool_size": settings.pool_size,
        "max_overflow": settings.pool_size,
        # No pre-ping: it costs three round trips on every checkout. A connection that died
        # while pooled is found at checkout without one (drop_dead_connections); one that dies
        # mid-statement fails that statement once, and is dropped from the pool.
        "pool_recycle": 1800,
    }
    engine_options.update(options)
    engine = create_async_engine(url, connect_args=connect_args(settings), **engine_options)
    drop_dead_connections(engine)
    if settings.database_pooler == "transaction":
        _one_transaction_per_statement(engine)
        _TRANSACTIONAL.add(engine.sync_engine)
    return engine


# Engines behind a transaction-mode pooler: fetch() runs each statement in a transaction too.
_TRANSACTIONAL: weakref.WeakSet[Engine] = weakref.WeakSet()


_BEGAN = "chat_began"  # in Connection.info: we opened a transaction around an autocommit statement


def _one_transaction_per_statement(engine: AsyncEngine) -> None:
    """asyncpg prepares and then executes a statement: two round trips, each ending in Sync. In
    autocommit, a transaction-mode pooler may give them two different server connections, and the
    statement is not there (`prepared statement "…" does not exist`). Inside BEGIN … COMMIT the
    pooler keeps one server connection, so every autocommit statement gets its own transaction.
    Statements SQLAlchemy already runs in a transaction are left alone."""

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def begin(conn: Connection, *_: Any) -> None:
        if conn.connection.dbapi_connection.autocommit:  # type: ignore[union-attr]
            await_(conn.connection.driver_connection.execute("BEGIN"))  # type: ignore[union-attr]
            conn.info[_BEGAN] = True

    @event.listens_for(engine.sync_engine, "after_cursor_execute")
    def commit(conn: Connection, *_: Any) -> None:
        if conn.info.pop(_BEGAN, False):
            await_(conn.connection.driver_connection.execute("COMMIT"))  # type: ignore[union-attr]

    @event.listens_for(engine.sync_engine, "handle_error")
    def rollback(context: ExceptionContext) -> None:
        conn = context.connection
        if conn is not None and conn.info.pop(_BEGAN, False) and not conn.invalidated:
            driver = conn.connection.driver_connection
            if driver is not None and not driver.is_closed():
                await_(driver.execute("ROLLBACK"))


# The attribute of an engine that holds its autocommit view (same pool, same events): see
# reading(). On the engine, which the view refers to: a weak-keyed table would keep both alive.
_AUTOCOMMIT = "_chat_autocommit"


def reading(engine: AsyncEngine) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
    """A pooled connection for reads alone, in autocommit: no BEGIN before its first statement
    and no ROLLBACK when it goes back to the pool, two round trips fewer (a join makes three such
    reads). Each statement sees its own snapshot, as in a READ COMMITTED transaction anyway.
    Connected through the engine's autocommit view, which sets the mode as it connects: one
    switch into SQLAlchemy's greenlet fewer than setting it afterwards (about 25 µs)."""
    view: AsyncEngine | None = getattr(engine.sync_engine, _AUTOCOMMIT, None)
    if view is None:
        view = engine.execution_options(isolation_level="AUTOCOMMIT")
        setattr(engine.sync_engine, _AUTOCOMMIT, view)
        if engine.sync_engine in _TRANSACTIONAL:
            _TRANSACTIONAL.add(view.sync_engine)
    return view.connect()


_ASYNCPG = asyncpg_dialect.dialect()  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class DriverStatement:
    """A SQLAlchemy query compiled once for the asyncpg connection itself (see fetch): its SQL,
    the name of the parameter behind each $n, and the constants SQLAlchemy bound in it."""

    query: Any
    sql: str
    names: tuple[str, ...]
    constants: dict[str, Any]

    @classmethod
    def of(cls, query: Any) -> DriverStatement:
        compiled = query.compile(dialect=_ASYNCPG)
        sql, names = str(compiled), []
        for name in compiled.positiontup or ():
            marker = f"(__[POSTCOMPILE_{name}])"
            if marker not in sql:
                names.append(name)
                continue
            # A constant list (the message kinds): written in as literals, which also lets the
            # planner match a partial index whose predicate lists the same values.
            values = compiled.params[name]
            if not all(isinstance(v, str) and re.fullmatch(r"[a-z_]+", v) for v in values):
                raise ValueError(f"not a list of plain words: {name}={values!r}")
            sql = sql.replace(marker, "(" + ", ".join(f"'{v}'" for v in values) + ")")
        return cls(query, sql, tuple(names), dict(compiled.params))

    def args(self, values: dict[str, Any]) -> list[Any]:
        return [values[name] if name in values else self.constants[name] for name in self.names]


async def fetch(conn: AsyncConnection, statement: DriverStatement, **values: Any) -> Sequence[Any]:
    """The rows of one statement, read by position (asyncpg Records, or SQLAlchemy Rows), run on
    the asyncpg connection under `conn`, past SQLAlchemy's execution path: that path costs about
    100 µs per statement and 2.5 µs per row on a 2-core machine, and every join runs a few. Behind
    a transaction-mode pooler the statement gets a transaction of its own (as SQLAlchemy's do, see
    _one_transaction_per_statement). Inside a transaction SQLAlchemy began, it runs there, through
    SQLAlchemy: the driver's transaction may not have begun yet, and must stay SQLAlchemy's."""
    if conn.in_transaction():
        return (await conn.execute(statement.query, values)).all()
    driver = _driver(conn) or (await conn.get_raw_connection()).driver_connection
    assert driver is not None
    args = statement.args(values)
    if conn.engine.sync_engine in _TRANSACTIONAL:
        async with driver.transaction():
            return await driver.fetch(statement.sql, *args)  # type: ignore[no-any-return]
    return await driver.fetch(statement.sql, *args)  # type: ignore[no-any-return]


def _driver(conn: AsyncConnection) -> Any:
    """The asyncpg connection under `conn` without a switch into SQLAlchemy's greenlet (about
    10 µs), when it needs no I/O to reach: None if `conn` was closed or invalidated."""
    sync = conn.sync_connection
    if sync is None or sync.closed or sync.invalidated:
        return None
    return sync.connection.driver_connection


@dataclass(frozen=True, slots=True)
class Sent:
    """A statement a connection sent, with its parameters: through SQLAlchemy, or (`on_driver`)
    by fetch on the asyncpg connection itself."""

    sql: str
    parameters: Any
    on_driver: bool


@contextlib.asynccontextmanager
async def statements_sent(conn: AsyncConnection) -> AsyncIterator[list[Sent]]:
    """Every statement `conn` sends meanwhile, whichever way: to EXPLAIN exactly what a query
    function sends (the plan tests, the bench's history scenario)."""
    sent: list[Sent] = []

    def through_sqlalchemy(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append(Sent(statement, parameters, on_driver=False))

    def on_driver(query: Any) -> None:
        sent.append(Sent(query.query, query.args, on_driver=True))

    driver = (await conn.get_raw_connection()).driver_connection
    assert driver is not None
    event.listen(conn.sync_connection, "before_cursor_execute", through_sqlalchemy)
    driver.add_query_logger(on_driver)
    try:
        yield sent
    finally:
        await asyncio.sleep(0)  # the driver calls its query loggers soon after, not in the query
        driver.remove_query_logger(on_driver)
        event.remove(conn.sync_connection, "before_cursor_execute", through_sqlalchemy)


async def explain(conn: AsyncConnection, sent: Sent, options: str) -> list[Any]:
    """The rows of `EXPLAIN (options)` of a statement as it was sent, sent the same way."""
    query = f"EXPLAIN ({options}) {sent.sql}"
    if sent.on_driver:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        return list(await driver.fetch(query, *sent.parameters))
    return list((await conn.exec_driver_sql(query, sent.parameters)).all())
