"""The async engine."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.requests import HTTPConnection

from chat.config import Settings


def create_engine(settings: Settings, url: str) -> AsyncEngine:
    return create_async_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.pool_size,
        # No pre-ping: it costs three round trips on every checkout. A connection that died with a
        # restarted Postgres fails once, is dropped from the pool, and the client resends.
        pool_recycle=1800,
        connect_args={"server_settings": {"application_name": "chat"}},
    )


def engine_of(conn: HTTPConnection) -> AsyncEngine:
    engine: AsyncEngine = conn.app.state.engine
    return engine
