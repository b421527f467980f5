"""chat behind Debian's nginx with the shipped deploy/nginx.conf (README: Production): two
instances in its upstream, the page, sign-in and sockets through it, the Origin check, the
cookie's Secure flag from X-Forwarded-Proto, the client's address in chat's logs, and no token in
nginx's logs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.typing import Origin

from tests.conftest import MakeToken, unique
from tests.daemons import Nginx
from tests.roomclient import RoomClient
from tests.servers import Server
from tests.test_auth import refusal

# Clients come from another loopback address than nginx's, so that "the client's address" and
# "the proxy's address" differ (Linux answers on all of 127.0.0.0/8).
CLIENT_ADDRESS = "127.0.0.2"
TRUST_NGINX = {"FORWARDED_ALLOW_IPS": "127.0.0.1"}


@pytest.fixture(scope="module")
def instances(database_url: str, tmp_root: Path) -> Iterator[list[Server]]:
    servers = [Server(database_url, tmp_root, env=TRUST_NGINX) for _ in range(2)]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def nginx(instances: list[Server], tmp_root: Path) -> Iterator[Nginx]:
    proxy = Nginx(tmp_root / "nginx", [s.port for s in instances])
    yield proxy
    proxy.stop()


def http_client(base_url: str) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=CLIENT_ADDRESS, verify=False)
    return httpx.AsyncClient(base_url=base_url, transport=transport, timeout=30)


async def sign_in(base_url: str, token: str) -> httpx.Response:
    async with http_client(base_url) as http:
        return await http.post("/api/session", json={"token": token}, headers={"Origin": base_url})


async def test_page_sign_in_and_room_socket_through_the_proxy(nginx: Nginx, make_token: MakeToken) -> None:
    name = unique("web")
    token = await make_token(name)
    async with http_client(nginx.http) as http:
        page = await http.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    signed_in = await sign_in(nginx.http, token)
    assert signed_in.status_code == 200, signed_in.text
    cookie = signed_in.headers["set-cookie"]
    assert "secure" not in cookie.lower()  # plain http: a Secure cookie would never come back
    session = cookie.split(";")[0]

    # The browser's way: the cookie, and an Origin that matches Host:port through the proxy.
    path = f"/rooms/{unique('px')}/ws"
    browser = RoomClient(
        await connect(
            nginx.ws(path),
            additional_headers={"Cookie": session},
            origin=Origin(nginx.http),
            local_addr=(CLIENT_ADDRESS, 0),
        )
    )
    # A program's way: Authorization: Bearer.
    program = RoomClient(
        await connect(
            nginx.ws(path), additional_headers={"Authorization": f"Bearer {token}"}, local_addr=(CLIENT_ADDRESS, 0)
        )
    )
    assert (await browser.ready())["user"] == name
    await program.ready()
    await program.send("through nginx", client_id="n1")
    await program.until("ack", client_id="n1")
    assert (await browser.until("message"))["body"] == "through nginx"
    await browser.close()
    await program.close()


async def test_foreign_origin_is_refused(nginx: Nginx, make_token: MakeToken) -> None:
    token = await make_token()
    headers = {"Cookie": f"session={token}"}
    assert await refusal(
        nginx.ws("/rooms/general/ws"), additional_headers=headers, origin=Origin("http://evil.example")
    ) == (403, "origin not allowed")
    # The same port through the proxy is the same origin: Host keeps the port ($http_host).
    async with connect(nginx.ws("/rooms/general/ws"), additional_headers=headers, origin=Origin(nginx.http)) as ws:
        assert json.loads(await ws.recv())["type"] in ("message", "ready")


async def test_cookie_is_secure_when_the_trusted_proxy_says_https(
    nginx: Nginx, instances: list[Server], make_token: MakeToken
) -> None:
    token = await make_token()
    over_tls = await sign_in(nginx.https, token)
    assert over_tls.status_code == 200, over_tls.text
    assert "secure" in [part.strip().lower() for part in over_tls.headers["set-cookie"].split(";")]
    # A client that is not the trusted proxy cannot claim https for itself.
    async with http_client(instances[0].http) as http:
        spoofed = await http.post(
            "/api/session",
            json={"token": token},
            headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"},
        )
    assert spoofed.status_code == 200
    assert "secure" not in spoofed.headers["set-cookie"].lower()


async def test_client_address_in_chats_logs(nginx: Nginx, instances: list[Server], make_token: MakeToken) -> None:
    user = unique("addr")
    token = await make_token(user)
    for _ in range(2):  # nginx takes turns: both instances see a socket
        async with await RoomClient.open(
            nginx.ws(f"/rooms/{unique('a')}/ws"), token, local_addr=(CLIENT_ADDRESS, 0)
        ) as c:
            await c.ready()
    async with asyncio.timeout(15):
        while sum(f"user={user} " in s.log() and "event=close" in s.log() for s in instances) < 2:
            await asyncio.sleep(0.05)
    for server in instances:
        lines = [line for line in server.log().splitlines() if "event=open room=" in line and f"user={user} " in line]
        assert lines and all(line.endswith(f"client={CLIENT_ADDRESS} pid={server.proc.pid}") for line in lines), lines


async def test_no_token_in_nginx_logs(nginx: Nginx, make_token: MakeToken) -> None:
    """Runs last: every token above went in a cookie or a header, as the README says. And even a
    client that puts its token in the URL does not get it into the access log."""
    token = await make_token()
    async with connect(nginx.ws(f"/rooms/{unique('q')}/ws?token={token}&after=0")) as ws:
        assert json.loads(await ws.recv())["type"] in ("message", "ready")
    async with http_client(nginx.http) as http:
        assert (await http.get(f"/api/rooms?token={token}")).status_code == 200
    async with asyncio.timeout(10):
        while "/api/rooms" not in nginx.access_log.read_text():
            await asyncio.sleep(0.05)
    logs = nginx.logs()
    assert "/rooms/" in logs and "chat_" not in logs and "token=" not in logs
