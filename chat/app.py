"""The app factory and its lifespan: engine, broadcaster with our backend, hub."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import WebSocketRequestValidationError
from fastapi.routing import APIWebSocketRoute
from fastapi.staticfiles import StaticFiles

from chat import api, deps, http, roomapi, ws
from chat.auth import Refused, refuse
from chat.broadcast import Broadcast
from chat.config import Settings, get_settings
from chat.db import create_engine
from chat.hub import Hub
from chat.limits import Limits
from chat.presence import Presence
from chat.pubsub import PostgresBackend
from chat.reads import ReadPositions
from chat.redisbus import RedisBackend
from chat.relay import Relay
from chat.revocation import watch_tokens
from chat.writer import Writer

log = logging.getLogger("chat.app")

SHUTDOWN_GRACE_SECONDS = 5.0  # sockets get this long to flush and close with 1001


def _drain_before_exit(hub: Hub, grace: float) -> Callable[[], None]:
    """Put our drain in front of uvicorn's SIGTERM/SIGINT handling.

    uvicorn closes every socket with 1012 the moment it starts shutting down. We first stop
    taking sockets and let each one finish its frame in hand, flush its queue and close with
    1001 (bounded by `grace`), then pass the signal on to uvicorn. A second signal goes straight
    through. Returns a function that puts uvicorn's handlers back."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous: dict[int, Any] = {int(sig): signal.getsignal(sig) for sig in signals}
    if threading.current_thread() is not threading.main_thread() or not all(map(callable, previous.values())):
        return lambda: None
    draining: list[asyncio.Task[None]] = []

    async def drain_then_exit(signum: int) -> None:
        await hub.going_away(grace)
        handler = previous[signum]
        if callable(handler):
            handler(signum, None)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        handler = previous[signum]
        if draining and callable(handler):
            handler(signum, frame)
        else:
            loop.call_soon_threadsafe(lambda: draining.append(loop.create_task(drain_then_exit(signum))))

    for sig in signals:
        signal.signal(sig, on_signal)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


async def _exit_with_parent(parent: int) -> None:
    """A worker whose supervisor died (kill -9) stops itself instead of serving on alone."""
    while os.getppid() == parent:  # noqa: ASYNC110 (nothing to wait on: the kernel re-parents us)
        await asyncio.sleep(1.0)
    log.warning("supervisor %d is gone; shutting down", parent)
    os.kill(os.getpid(), signal.SIGTERM)


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel a background task and wait until it has really finished."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = settings.database_url
        if not url:
            raise RuntimeError("DATABASE_URL is not set: start the server with `chat serve`")
        if settings.database_pooler == "transaction" and not settings.listen_database_url:
            raise RuntimeError(
                "CHAT_DATABASE_POOLER=transaction needs CHAT_LISTEN_DATABASE_URL: LISTEN needs a session of its own"
            )
        listen_url = settings.listen_database_url or url
        beat, timeout = settings.listen_heartbeat_seconds, settings.listen_timeout_seconds
        # Each part is closed (in reverse order) as soon as the next fails to start, so a failed
        # start-up leaves no connection open and no task running.
        async with contextlib.AsyncExitStack() as stack:
            engine = create_engine(settings, url)
            stack.push_async_callback(engine.dispose)
            backend: PostgresBackend | RedisBackend
            if settings.fanout_url:
                backend = RedisBackend(settings.fanout_url, heartbeat=beat, timeout=timeout)
            else:
                backend = PostgresBackend(listen_url, heartbeat=beat, timeout=timeout)
            broadcast = Broadcast(backend=backend)
            await broadcast.connect()
            stack.push_async_callback(broadcast.disconnect)
            redis = isinstance(backend, RedisBackend)
            hub = Hub(
                broadcast,
                engine,
                database_notifies=not redis,
                gap_wait=settings.fanout_gap_wait_seconds if redis else 0.0,
            )
            stack.push_async_callback(hub.close)
            if isinstance(backend, RedisBackend):
                # Other SQL clients' rows reach Redis through the one process holding the lock.
                relay = Relay(listen_url, backend, heartbeat=beat, timeout=timeout, retry=settings.relay_retry_seconds)
                await relay.start()
                stack.push_async_callback(relay.stop)
            app.state.engine, app.state.backend, app.state.hub = engine, backend, hub
            app.state.limits = Limits(settings)
            writer = app.state.writer = Writer(
                engine,
                max_rows=settings.write_batch_rows,
                max_bytes=settings.write_batch_bytes,
                queue_rows=settings.write_queue_rows,
                queue_bytes=settings.write_queue_bytes,
                transactional=settings.database_pooler == "transaction",
                # Under NOTIFY the trigger fans out at commit and the writer publishes nothing.
                on_commit=None if hub.database_notifies else hub.published,
                publish_timeout=timeout,
                edit_window_seconds=settings.edit_window_seconds,
            )
            writer.start()
            stack.push_async_callback(writer.stop)  # after the sockets' drain: what they sent last is stored
            presence = app.state.presence = Presence(
                engine,
                beat=settings.presence_beat_seconds,
                stale=settings.presence_stale_seconds,
                linger=settings.presence_linger_seconds,
            )
            if not hub.database_notifies:
                presence.publish = hub.publish  # join/leave through Redis, after commit
            stack.push_async_callback(presence.stop)  # also closes its own engine after a failed start
            await presence.start()
            app.state.shared = deps.SharedObjects(settings, engine, hub, app.state.limits, presence, writer)
            reads = hub.reads = ReadPositions(engine, hub.publish, interval=settings.read_interval_seconds)
            reads.start()
            stack.push_async_callback(reads.stop)
            tokens = asyncio.create_task(watch_tokens(hub, engine, interval=settings.token_check_seconds))
            stack.push_async_callback(_cancel, tokens)
            stack.callback(_drain_before_exit(hub, grace=SHUTDOWN_GRACE_SECONDS))
            if supervisor := os.environ.get("CHAT_SUPERVISOR_PID"):
                stack.push_async_callback(_cancel, asyncio.create_task(_exit_with_parent(int(supervisor))))
            # What start-up made (modules, routes, models, pools) lives as long as the process:
            # frozen out of the collector's sight, so that its full collections walk only what
            # the sockets made since.
            gc.collect()
            gc.freeze()
            yield

    # /docs and /redoc pull Swagger UI and ReDoc from a CDN, unpinned: off unless CHAT_API_DOCS.
    docs = {} if settings.api_docs else {"docs_url": None, "redoc_url": None}
    app = FastAPI(title="chat", version="0.1.0", lifespan=lifespan, **docs)  # type: ignore[arg-type]
    app.state.settings = settings
    # Sockets first: matching a socket against an included router's routes leaves a dict in its
    # scope (FastAPI's route context), kept as long as the socket is open.
    _add_sockets(app, ws.router)
    if settings.chapter_routes:
        _add_sockets(app, ws.chapter)
    app.include_router(http.router)
    app.include_router(api.router)
    app.include_router(roomapi.router)
    app.add_exception_handler(Refused, refuse)  # type: ignore[arg-type]
    app.add_exception_handler(WebSocketRequestValidationError, ws.refuse_invalid)
    app.mount("/static", StaticFiles(directory=http.STATIC), name="static")
    return app


def _add_sockets(app: FastAPI, router: APIRouter) -> None:
    """Socket routes go on the app itself, not through include_router: an open socket keeps its
    route's call frames for its whole life, and an included router adds about 1.5 KB of them to
    every socket (measured with `python -m bench.memprobe`)."""
    for route in router.routes:
        assert isinstance(route, APIWebSocketRoute)
        app.add_api_websocket_route(route.path, route.endpoint, name=route.name)
