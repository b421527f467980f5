"""chat/deps.py: routes reach the app's shared objects through typed dependencies only."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.requests import HTTPConnection
from starlette.routing import BaseRoute

import chat
from chat import deps
from chat.app import create_app
from chat.config import Settings

PACKAGE = Path(chat.__file__).parent
STATE = re.compile(r"\.app\.state\b|\bstate\s*=\s*\w+\.app\.state")


def test_only_the_factory_and_deps_touch_app_state() -> None:
    """Before: routes and helpers read untyped `request.app.state.x` (Any) all over. After: the
    factory and its lifespan build the objects, and chat/deps.py alone reads them back."""
    offenders = [
        f"{path.name}:{number}"
        for path in sorted(PACKAGE.glob("*.py"))
        if path.name not in ("app.py", "deps.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if STATE.search(line)
    ]
    assert offenders == []


def test_settings_come_from_the_app_they_were_given_to() -> None:
    """The app's own Settings (tests and `chat serve` pass their own), not the cached env ones."""
    settings = Settings(database_url="postgresql://nobody@localhost/none", chapter_routes=False)
    app = create_app(settings)
    conn = HTTPConnection({"type": "http", "app": app, "headers": []})
    assert asyncio.run(deps.get_settings(conn)) is settings


def _routes(routes: Sequence[BaseRoute]) -> Iterator[BaseRoute]:
    """The app's routes, with those of included routers (FastAPI keeps them in their router)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        yield from _routes(included.routes) if included is not None else (route,)


def _dependencies(dependant: Dependant) -> list[Dependant]:
    found = []
    for sub in dependant.dependencies:
        found += [sub, *_dependencies(sub)]
    return found


def _is_sync(call: Any) -> bool:
    """Whether FastAPI would run this dependency in its thread pool: a plain function, or an
    object whose __call__ is one (the security schemes are such objects, with async __call__)."""
    if asyncio.iscoroutinefunction(call):
        return False
    method = getattr(call, "__call__", None)  # noqa: B004 (instances of classes are callables too)
    return not asyncio.iscoroutinefunction(method)


def test_no_dependency_runs_in_the_thread_pool() -> None:
    """Before: the getters of chat/deps.py were sync `def`s, and FastAPI ran each one through
    run_in_threadpool, a thread hop per dependency per request (on every join, seen in its
    profile). Every dependency of every route, sockets and HTTP alike, must be `async def`."""
    app = create_app(Settings(database_url="postgresql://nobody@localhost/none", chapter_routes=True))
    routes = [r for r in _routes(app.routes) if isinstance(r, (APIRoute, APIWebSocketRoute))]
    assert any(isinstance(r, APIWebSocketRoute) for r in routes) and any(isinstance(r, APIRoute) for r in routes)
    checked = 0
    sync = set()
    for route in routes:
        for dependency in _dependencies(route.dependant):
            if dependency.call is None:
                continue
            checked += 1
            if _is_sync(dependency.call):
                sync.add(f"{route.path}: {getattr(dependency.call, '__qualname__', dependency.call)!r}")
    assert checked > 0
    assert sorted(sync) == []


def test_socket_routes_keep_few_dependencies_and_come_first() -> None:
    """An open socket keeps its route's solved dependencies (values and cache) until it closes,
    and a dict in its scope for every included router it was matched against before its own
    route: the room sockets take the shared objects as one dependency, and come first."""
    app = create_app(Settings(database_url="postgresql://nobody@localhost/none"))
    sockets = {route.path: route for route in app.routes if isinstance(route, APIWebSocketRoute)}
    # The room socket reads its token itself, with the room, in one statement.
    for path, first in (("/rooms/{room}/ws", "token"), ("/socket", "user")):
        names = [dep.name for dep in sockets[path].dependant.dependencies]
        assert names == [first, "shared"], (path, names)
    kinds = [type(route).__name__ for route in app.routes]
    last_socket = max(i for i, kind in enumerate(kinds) if kind == "APIWebSocketRoute")
    assert all(kind != "APIWebSocketRoute" for kind in kinds[last_socket + 1 :])
    assert "_IncludedRouter" not in kinds[:last_socket]
