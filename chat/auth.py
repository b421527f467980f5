"""Who is connecting: the token (`Authorization: Bearer`, cookie `session`, or query `token`)
and the Origin, checked before a socket is accepted. Refusals are HTTP responses with a JSON
reason: a close sent before accept() would reach a real client only as a bare 403."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Cookie, Depends, Header, Query
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyCookie, APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import HTTPConnection, Request
from starlette.websockets import WebSocket

from chat import config, deps, logs, membership, metrics, store
from chat.db import reading
from chat.hub import Hub
from chat.membership import RoomAccess
from chat.store import Identity, TokenRefused

log = logging.getLogger("chat.auth")


class Refused(Exception):
    """Refuse a socket before accept (or an HTTP request) with a status and a safe reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def shutting_down() -> Refused:
    return Refused(503, "server shutting down: try again")  # the client reconnects elsewhere


@contextlib.contextmanager
def reading_token(hub: Hub) -> Iterator[None]:
    """Around a socket's token read, a handshake's one await before the hub holds its socket.
    uvicorn's own shutdown answers 500 to any handshake it finds unanswered: so once shutting
    down, a handshake is refused before it awaits anything, and the drain waits for one already
    reading (which _connect then refuses)."""
    if hub.closing:
        raise shutting_down()
    with hub.handshake():
        yield


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_key(scheme: str, netloc: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin, with the scheme's default port; None if malformed."""
    scheme = {"ws": "http", "wss": "https"}.get(scheme.lower(), scheme.lower())
    if scheme not in _DEFAULT_PORTS or not netloc or "@" in netloc:
        return None
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        return None
    return (scheme, parts.hostname or "", port) if parts.hostname else None


def origin_allowed(origin: str | None, *, scheme: str, host: str | None, allowed: list[str]) -> bool:
    """Whether a request with this Origin header may use a cookie. Same origin means the same
    scheme, host and port as the request (`scheme` is the request's own: http/ws or https/wss,
    from X-Forwarded-Proto only when uvicorn trusts the proxy); else it must be listed."""
    if origin is None:
        return True  # not a browser: browsers always send Origin on WebSocket handshakes
    origin = origin.rstrip("/")
    if "*" in allowed or origin in allowed:
        return True
    parts = urlsplit(origin)
    if parts.path or parts.query or parts.fragment:
        return False
    mine = _origin_key(scheme, host or "")
    return mine is not None and _origin_key(parts.scheme, parts.netloc) == mine


def check_origin(conn: HTTPConnection, settings: config.Settings) -> None:
    origin = conn.headers.get("origin")
    # The scope's scheme, as conn.url has it, without conn.url: a socket would keep that URL
    # (cached on it) for as long as it is open.
    scheme = conn.scope.get("scheme", "http")
    if not origin_allowed(origin, scheme=scheme, host=conn.headers.get("host"), allowed=settings.allowed_origins):
        raise Refused(403, "origin not allowed")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None without the header."""
    if authorization is None:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise Refused(401, "use Authorization: Bearer <token>")
    return credentials.strip()


async def raw_token(
    websocket: WebSocket,
    settings: deps.Settings,
    session: Annotated[str | None, Cookie()] = None,
    token: Annotated[str | None, Query()] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> str:
    """A socket's token: `Authorization: Bearer` (non-browser clients: it stays out of URLs and
    so out of proxies' logs), else the `session` cookie (browsers), else `?token=` (the FastAPI
    chapter's examples; the cookie wins over it, as in the chapter)."""
    check_origin(websocket, settings)
    value = bearer_token(authorization) or session or token
    if not value:
        raise Refused(401, "missing token")
    return value


async def identity_of(engine: AsyncEngine, raw: str) -> Identity:
    async with reading(engine) as db:
        try:
            return await store.identity_for_token(db, raw=raw)
        except TokenRefused as exc:
            raise Refused(401, exc.reason) from None


async def socket_identity(shared: deps.Shared, raw: Annotated[str, Depends(raw_token)]) -> Identity:
    with reading_token(shared.hub):
        return await identity_of(shared.engine, raw)


async def room_identity(engine: AsyncEngine, raw: str, room: str | None) -> tuple[Identity, RoomAccess | None]:
    """A room socket's user and the room as they may see it, read together (one round trip);
    room None: the token alone."""
    async with reading(engine) as db:
        try:
            return await membership.token_and_access(db, raw=raw, room=room)
        except TokenRefused as exc:
            raise Refused(401, exc.reason) from None


SocketToken = Annotated[str, Depends(raw_token)]
SocketUser = Annotated[Identity, Depends(socket_identity)]


async def refuse(conn: HTTPConnection, exc: Exception) -> JSONResponse | None:
    """Exception handler for Refused, on sockets and on HTTP routes alike."""
    assert isinstance(exc, Refused)
    metrics.REFUSALS.labels(metrics.reason_label(exc.reason)).inc()
    where = {"kind": conn.scope["type"], "path": conn.url.path}
    logs.event("refused", **where, status=exc.status, reason=exc.reason, client=logs.address(conn))
    response = JSONResponse({"detail": exc.reason}, status_code=exc.status)
    if not isinstance(conn, WebSocket):
        return response
    try:
        await conn.send_denial_response(response)
    except RuntimeError:  # a server without the denial-response extension
        await conn.close(1008, exc.reason)
    return None


# --- HTTP routes (the history API) -------------------------------------------------------------

# Declared as security schemes so that the OpenAPI schema (and /docs) documents all three ways.
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer chat_…`")
_cookie = APIKeyCookie(name="session", auto_error=False, description="the cookie set by `POST /api/session`")
_query = APIKeyQuery(name="token", auto_error=False, description="`?token=chat_…` (kept out of logs)")


async def http_identity(
    request: Request,
    settings: deps.Settings,
    engine: deps.Engine,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    cookie: Annotated[str | None, Depends(_cookie)],
    query: Annotated[str | None, Depends(_query)],
) -> Identity:
    """The token of an HTTP request: the Authorization header, else the `session` cookie, else
    `?token=`. Only the cookie is sent by browsers on their own, so only it needs the Origin
    check (as on the sockets); a header or query token proves the caller holds the token."""
    if bearer is not None:
        raw = bearer.credentials
    elif cookie:
        check_origin(request, settings)
        raw = cookie
    elif query:
        raw = query
    else:
        raise Refused(401, "missing token")
    return await identity_of(engine, raw)


HttpUser = Annotated[Identity, Depends(http_identity)]
