"""Tokens are checked against the database before a socket is accepted, on every socket route."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from chat import store
from chat.auth import origin_allowed
from tests.conftest import MakeToken, unique
from tests.servers import Server

ROUTES = ["/rooms/general/ws", "/items/foo/ws", "/ws/1234"]


async def refusal(url: str, **kwargs: object) -> tuple[int, str]:
    """Connect, expecting a refusal before accept; returns the HTTP status and the reason."""
    with pytest.raises(InvalidStatus) as caught:
        async with connect(url, **kwargs):  # type: ignore[arg-type]
            pass
    response = caught.value.response
    return response.status_code, json.loads(bytes(response.body or b"{}")).get("detail", "")


async def revoked_token(engine: AsyncEngine, make_token: MakeToken) -> str:
    raw = await make_token()
    async with engine.connect() as conn:
        who = await store.identity_for_token(conn, raw=raw)
        assert await store.revoke_tokens(conn, token_ids=[who.token_id]) == 1
    return raw


@pytest.mark.parametrize("route", ROUTES)
async def test_refused_before_accept(server_a: Server, engine: AsyncEngine, make_token: MakeToken, route: str) -> None:
    expired = await make_token(ttl=timedelta(seconds=-1))
    revoked = await revoked_token(engine, make_token)
    cases = {
        "missing": (server_a.ws(route), (401, "missing token")),
        "unknown": (server_a.ws(route) + "?token=some-key-token", (401, "invalid token")),
        "expired": (server_a.ws(route) + f"?token={expired}", (401, "token expired")),
        "revoked": (server_a.ws(route) + f"?token={revoked}", (401, "token revoked")),
    }
    for name, (url, expected) in cases.items():
        assert await refusal(url) == expected, name
    # A cookie naming a bad token wins over a good query token, as in the chapter.
    good = await make_token()
    assert await refusal(
        server_a.ws(route) + f"?token={good}", additional_headers={"Cookie": "session=some-key-token"}
    ) == (401, "invalid token")


@pytest.mark.parametrize("route", ROUTES)
async def test_accepted_with_cookie_or_query(server_a: Server, make_token: MakeToken, route: str) -> None:
    raw = await make_token()
    async with connect(server_a.ws(route) + f"?token={raw}") as ws:
        await ws.send("hello")
        assert await ws.recv(decode=True)
    async with connect(server_a.ws(route), additional_headers={"Cookie": f"session={raw}"}) as ws:
        await ws.send("hello")
        assert await ws.recv(decode=True)


@pytest.mark.parametrize("route", ROUTES)
async def test_bearer_header_on_sockets(server_a: Server, make_token: MakeToken, route: str) -> None:
    """README: non-browser clients send `Authorization: Bearer`, which keeps tokens out of URLs."""
    raw = await make_token()
    async with connect(server_a.ws(route), additional_headers={"Authorization": f"Bearer {raw}"}) as ws:
        await ws.send("hello")
        assert await ws.recv(decode=True)
    # The header wins over a cookie or query token, bad or good.
    async with connect(
        server_a.ws(route) + "?token=some-key-token",
        additional_headers={"Authorization": f"bearer {raw}", "Cookie": "session=some-key-token"},
    ) as ws:
        await ws.send("hello")
        assert await ws.recv(decode=True)
    assert await refusal(server_a.ws(route), additional_headers={"Authorization": "Bearer some-key-token"}) == (
        401,
        "invalid token",
    )
    for header in (f"Basic {raw}", "Bearer ", "Bearer"):
        assert await refusal(server_a.ws(route) + f"?token={raw}", additional_headers={"Authorization": header}) == (
            401,
            "use Authorization: Bearer <token>",
        ), header


async def test_origin_check(server_a: Server, make_token: MakeToken) -> None:
    raw = await make_token()
    url = server_a.ws("/rooms/general/ws")
    cookie = {"Cookie": f"session={raw}"}
    assert await refusal(url, additional_headers=cookie, origin=Origin("http://evil.example")) == (
        403,
        "origin not allowed",
    )
    async with connect(url, additional_headers=cookie, origin=Origin(f"http://127.0.0.1:{server_a.port}")) as ws:
        assert json.loads(await ws.recv())["type"] in ("message", "ready")


async def test_session_cookie_sign_in(server_a: Server, make_token: MakeToken) -> None:
    name = unique("signin")
    raw = await make_token(name)
    async with httpx.AsyncClient(base_url=server_a.http) as http:
        bad = await http.post("/api/session", json={"token": "some-key-token"})
        assert (bad.status_code, bad.json()["detail"]) == (401, "invalid token")
        assert (await http.get("/api/me")).status_code == 401
        ok = await http.post("/api/session", json={"token": raw})
        assert ok.status_code == 200 and ok.json()["user"] == name
        assert "httponly" in ok.headers["set-cookie"].lower()
        assert (await http.get("/api/me")).json()["user"] == name
        assert (await http.delete("/api/session")).status_code == 204
        assert (await http.get("/api/me")).status_code == 401


# --- the Origin check, as a pure function --------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "scheme", "host"),
    [
        (None, "ws", "chat.example"),  # not a browser
        ("http://chat.example", "ws", "chat.example"),
        ("http://chat.example", "http", "chat.example:80"),  # default port spelled out
        ("https://chat.example", "wss", "chat.example"),
        ("https://chat.example:443", "https", "chat.example"),
        ("HTTP://Chat.Example", "ws", "chat.example"),  # case-insensitive
        ("http://127.0.0.1:8000", "ws", "127.0.0.1:8000"),
        ("https://good.example", "ws", "chat.example"),  # listed
        ("https://any.example", "ws", "chat.example"),  # "*" listed (below)
    ],
)
def test_origin_allowed(origin: str | None, scheme: str, host: str) -> None:
    listed = ["https://good.example"] + (["*"] if origin == "https://any.example" else [])
    assert origin_allowed(origin, scheme=scheme, host=host, allowed=listed)


@pytest.mark.parametrize(
    ("origin", "scheme", "host"),
    [
        ("https://chat.example", "ws", "chat.example"),  # issue 14 item 8: https origin, http server
        ("http://chat.example", "wss", "chat.example"),
        ("http://chat.example:8080", "ws", "chat.example:8000"),
        ("http://chat.example:80", "ws", "chat.example:8000"),
        ("http://evil.example", "ws", "chat.example"),
        ("http://chat.example.evil.example", "ws", "chat.example"),
        ("http://user@chat.example", "ws", "chat.example"),
        ("http://chat.example/path", "ws", "chat.example"),
        ("null", "ws", "chat.example"),
        ("chat.example", "ws", "chat.example"),
        ("file://chat.example", "ws", "chat.example"),
        ("http://chat.example:99999", "ws", "chat.example:99999"),
        ("http://chat.example", "ws", None),
        ("https://good.example.evil", "ws", "chat.example"),
    ],
)
def test_origin_refused(origin: str, scheme: str, host: str | None) -> None:
    assert not origin_allowed(origin, scheme=scheme, host=host, allowed=["https://good.example"])


async def test_https_origin_is_refused_by_an_http_server(server_a: Server, make_token: MakeToken) -> None:
    """The check on a real handshake: the right host and port, the wrong scheme."""
    token = await make_token()
    url = server_a.ws("/rooms/general/ws")
    wrong = Origin(f"https://127.0.0.1:{server_a.port}")
    cookie = {"Cookie": f"session={token}"}
    assert await refusal(url, origin=wrong, additional_headers=cookie) == (403, "origin not allowed")
    async with connect(url, origin=Origin(f"http://127.0.0.1:{server_a.port}"), additional_headers=cookie) as ws:
        assert json.loads(await ws.recv())["type"] in ("message", "ready")


async def test_scheme_behind_a_proxy_comes_only_from_trusted_proxy_headers(
    server_a: Server, database_url: str, tmp_root: Path, make_token: MakeToken
) -> None:
    """X-Forwarded-Proto makes the request https only when uvicorn trusts the proxy
    (FORWARDED_ALLOW_IPS, 127.0.0.1 by default); anyone else's header changes nothing."""
    token = await make_token()
    cookie = {"Cookie": f"session={token}", "X-Forwarded-Proto": "https"}
    https, http = Origin(f"https://127.0.0.1:{server_a.port}"), Origin(f"http://127.0.0.1:{server_a.port}")
    async with connect(server_a.ws("/rooms/general/ws"), origin=https, additional_headers=cookie) as ws:
        assert json.loads(await ws.recv())["type"] in ("message", "ready")  # a trusted proxy said https
    assert await refusal(server_a.ws("/rooms/general/ws"), origin=http, additional_headers=cookie) == (
        403,
        "origin not allowed",
    )
    untrusting = Server(database_url, tmp_root, env={"FORWARDED_ALLOW_IPS": "192.0.2.1"})
    try:
        https = Origin(f"https://127.0.0.1:{untrusting.port}")
        url = untrusting.ws("/rooms/general/ws")
        assert await refusal(url, origin=https, additional_headers=cookie) == (403, "origin not allowed")
    finally:
        untrusting.stop()
