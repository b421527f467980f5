"""The app's shared objects as typed dependencies: a route names what it needs
(`settings: deps.Settings`, `hub: deps.Hub`) instead of reaching into untyped `app.state`.

The app factory (chat/app.py) sets `app.state.settings`; its lifespan builds everything else and
puts it on `app.state`. This module is the one place that reads them back.

Every getter is `async def`: FastAPI runs a sync dependency in its thread pool, a thread hop per
dependency per request, and anyio then keeps state for the socket's task while it is open
(tests/test_deps.py refuses sync ones anywhere in the app).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import HTTPConnection

from chat import config, hub, limits, presence, writer
from chat.pubsub import PostgresBackend
from chat.redisbus import RedisBackend


async def get_settings(conn: HTTPConnection) -> config.Settings:
    settings: config.Settings = conn.app.state.settings
    return settings


async def get_engine(conn: HTTPConnection) -> AsyncEngine:
    engine: AsyncEngine = conn.app.state.engine
    return engine


async def get_backend(conn: HTTPConnection) -> PostgresBackend | RedisBackend:
    backend: PostgresBackend | RedisBackend = conn.app.state.backend
    return backend


async def get_hub(conn: HTTPConnection) -> hub.Hub:
    found: hub.Hub = conn.app.state.hub
    return found


async def get_limits(conn: HTTPConnection) -> limits.Limits:
    found: limits.Limits = conn.app.state.limits
    return found


async def get_writer(conn: HTTPConnection) -> writer.Writer:
    found: writer.Writer = conn.app.state.writer
    return found


async def get_presence(conn: HTTPConnection) -> presence.Presence:
    found: presence.Presence = conn.app.state.presence
    return found


@dataclass(frozen=True, slots=True)
class SharedObjects:
    """The app's shared objects a socket route uses, as one dependency. FastAPI keeps a route's
    solved values and dependency cache until the route returns, which for a socket is when it
    closes: six dependencies instead of one cost every open socket about 700 bytes."""

    settings: config.Settings
    engine: AsyncEngine
    hub: hub.Hub
    limits: limits.Limits
    presence: presence.Presence
    writer: writer.Writer


async def get_shared(conn: HTTPConnection) -> SharedObjects:
    found: SharedObjects = conn.app.state.shared
    return found


Settings = Annotated[config.Settings, Depends(get_settings)]
Engine = Annotated[AsyncEngine, Depends(get_engine)]
Backend = Annotated[PostgresBackend | RedisBackend, Depends(get_backend)]
Hub = Annotated[hub.Hub, Depends(get_hub)]
Limits = Annotated[limits.Limits, Depends(get_limits)]
Writer = Annotated[writer.Writer, Depends(get_writer)]
Presence = Annotated[presence.Presence, Depends(get_presence)]
Shared = Annotated[SharedObjects, Depends(get_shared)]
