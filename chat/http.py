"""HTTP routes: the page, sign-in, and health."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Cookie, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from chat import deps, metrics
from chat.auth import Refused, check_origin, identity_of

router = APIRouter()
STATIC = Path(__file__).parent / "static"
# No inline script, no third-party anything: the page works offline on a LAN.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
SESSION_MAX_AGE = 30 * 24 * 3600


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC / name, headers=PAGE_HEADERS)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return _page("index.html")


@router.get("/chapter/{example}", include_in_schema=False)
async def chapter_page(settings: deps.Settings, example: int) -> FileResponse:
    """The FastAPI chapter's three example pages (1: echo, 2: items with a token, 3: clients)."""
    if example not in (1, 2, 3) or not settings.chapter_routes:
        raise Refused(404, "no such example")
    return _page(f"chapter{example}.html")


class SessionIn(BaseModel):
    token: str


class Me(BaseModel):
    user: str
    expires_at: datetime | None
    socket_rooms_max: int  # CHAT_SOCKET_ROOMS_MAX: the page subscribes to at most this many rooms


@router.post("/api/session", responses={401: {"description": "the token is missing, unknown, expired or revoked"}})
async def sign_in(
    body: SessionIn, request: Request, response: Response, settings: deps.Settings, engine: deps.Engine
) -> Me:
    """Check a token and keep it in the `session` cookie (HttpOnly), so it stays out of URLs."""
    check_origin(request, settings)
    who = await identity_of(engine, body.token)
    max_age = SESSION_MAX_AGE
    if who.expires_at is not None:
        max_age = max(0, min(max_age, int((who.expires_at - datetime.now(UTC)).total_seconds())))
    response.set_cookie(
        "session",
        body.token,
        max_age=max_age,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return Me(user=who.name, expires_at=who.expires_at, socket_rooms_max=settings.socket_rooms_max)


@router.delete("/api/session", status_code=204)
async def sign_out(response: Response) -> Response:
    response.delete_cookie("session")
    response.status_code = 204
    return response


@router.get("/api/me", responses={401: {"description": "no valid session"}})
async def me(engine: deps.Engine, settings: deps.Settings, session: Annotated[str | None, Cookie()] = None) -> Me:
    if not session:
        raise Refused(401, "missing token")
    who = await identity_of(engine, session)
    return Me(user=who.name, expires_at=who.expires_at, socket_rooms_max=settings.socket_rooms_max)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", include_in_schema=False)
async def metrics_endpoint() -> Response:
    """Prometheus metrics; with several workers, the sum over all of them."""
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)


@router.get("/readyz")
async def readyz(engine: deps.Engine, backend: deps.Backend, hub: deps.Hub) -> JSONResponse:
    """Ready when the database answers and this process's listener is connected."""
    try:
        async with engine.connect() as conn:  # connected here, not in a dependency: a failure means 503
            await conn.execute(text("SELECT 1"))
        database = True
    except Exception:
        database = False
    listener = bool(backend.connected)
    ok = database and listener and not hub.closing
    body = {"database": database, "listener": listener, "notify_queue_usage": backend.queue_usage}
    return JSONResponse(body, status_code=200 if ok else 503)
