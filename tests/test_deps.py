"""chat/deps.py: routes reach the app's shared objects through typed dependencies only."""

from __future__ import annotations

import asyncio
import inspect
import re
from pathlib import Path

from fastapi.routing import APIWebSocketRoute
from starlette.requests import HTTPConnection

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


def test_every_getter_is_a_coroutine_function() -> None:
    """FastAPI runs a plain `def` dependency in a worker thread: a hop per dependency on every
    join, and anyio keeps state for the socket's task (about 170 bytes) as long as it lives."""
    getters = [value for name, value in vars(deps).items() if name.startswith("get_")]
    assert len(getters) >= 7
    assert [g.__name__ for g in getters if not inspect.iscoroutinefunction(g)] == []


def test_socket_routes_keep_few_dependencies_and_come_first() -> None:
    """An open socket keeps its route's solved dependencies (values and cache) until it closes,
    and a dict in its scope for every included router it was matched against before its own
    route: the room sockets take the shared objects as one dependency, and come first."""
    app = create_app(Settings(database_url="postgresql://nobody@localhost/none"))
    sockets = {route.path: route for route in app.routes if isinstance(route, APIWebSocketRoute)}
    for path in ("/rooms/{room}/ws", "/socket"):
        names = [dep.name for dep in sockets[path].dependant.dependencies]
        assert names == ["user", "shared"], (path, names)
    kinds = [type(route).__name__ for route in app.routes]
    last_socket = max(i for i, kind in enumerate(kinds) if kind == "APIWebSocketRoute")
    assert all(kind != "APIWebSocketRoute" for kind in kinds[last_socket + 1 :])
    assert "_IncludedRouter" not in kinds[:last_socket]
