"""The async engine and the connection dependency."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request, WebSocket
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from chat.config import Settings


def create_engine(settings: Settings, url: str) -> AsyncEngine:
    return create_async_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.pool_size,
        pool_pre_ping=True,  # a restarted Postgres leaves dead connections in the pool
        pool_recycle=1800,
    )


def engine_of(conn: Request | WebSocket) -> AsyncEngine:
    engine: AsyncEngine = conn.app.state.engine
    return engine


async def _connection(request: Request) -> AsyncIterator[AsyncConnection]:
    async with engine_of(request).connect() as conn:
        yield conn


DbConn = Annotated[AsyncConnection, Depends(_connection)]
