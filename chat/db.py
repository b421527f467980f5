"""The async engine."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.requests import HTTPConnection

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


def create_engine(settings: Settings, url: str) -> AsyncEngine:
    engine = create_async_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.pool_size,
        # No pre-ping: it costs three round trips on every checkout. A connection that died
        # while pooled is found at checkout without one (drop_dead_connections); one that dies
        # mid-statement fails that statement once, and is dropped from the pool.
        pool_recycle=1800,
        connect_args={"server_settings": {"application_name": "chat"}},
    )
    drop_dead_connections(engine)
    return engine


def engine_of(conn: HTTPConnection) -> AsyncEngine:
    engine: AsyncEngine = conn.app.state.engine
    return engine
