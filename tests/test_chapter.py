"""The FastAPI chapter's examples, as its reference sequences, with real tokens."""

from __future__ import annotations

import httpx
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import MakeToken
from tests.servers import Server
from tests.test_auth import refusal


async def test_example_1_echo(server_a: Server) -> None:
    async with connect(server_a.ws("/ws")) as ws:
        for text in ("hello", "", "ünïcode ✓"):
            await ws.send(text)
            assert await ws.recv() == f"Message text was: {text}"


async def test_example_2_items_with_token(server_a: Server, make_token: MakeToken) -> None:
    token = await make_token()
    masked = f"chat_…{token[-4:]}"  # never the raw token: the cookie is HttpOnly (issue 14 item 6)
    async with connect(server_a.ws(f"/items/foo/ws?token={token}&q=3")) as ws:
        await ws.send("hi")
        assert [await ws.recv() for _ in range(3)] == [
            f"Session cookie or query token value is: {masked}",
            "Query parameter q is: 3",
            "Message text was: hi, for item ID: foo",
        ]
    async with connect(server_a.ws("/items/bar/ws"), additional_headers={"Cookie": f"session={token}"}) as ws:
        await ws.send("again")
        assert await ws.recv() == f"Session cookie or query token value is: {masked}"
        assert await ws.recv() == "Message text was: again, for item ID: bar"  # no q: no q line
    # q must be an int: a validation error refuses the socket before accept, with its reason.
    status, reason = await refusal(server_a.ws(f"/items/foo/ws?token={token}&q=bar"))
    assert status == 400 and reason.startswith("invalid q:")
    assert await refusal(server_a.ws("/items/foo/ws?token=some-key-token")) == (401, "invalid token")


async def example_3_reference_sequence(c1234: ClientConnection, c5678: ClientConnection) -> None:
    await c1234.send("Hello from 1234")
    assert await c1234.recv() == "You wrote: Hello from 1234"
    assert await c1234.recv() == "Client #1234 says: Hello from 1234"
    assert await c5678.recv() == "Client #1234 says: Hello from 1234"
    await c5678.close()
    assert await c1234.recv() == "Client #5678 left the chat"


async def test_example_3_reference_sequence(server_a: Server, make_token: MakeToken) -> None:
    token = await make_token()
    async with (
        connect(server_a.ws(f"/ws/1234?token={token}")) as c1234,
        connect(server_a.ws(f"/ws/5678?token={token}")) as c5678,
    ):
        await example_3_reference_sequence(c1234, c5678)


async def test_example_pages_are_served(server_a: Server) -> None:
    async with httpx.AsyncClient(base_url=server_a.http) as http:
        for example, socket_path in ((1, "/ws"), (2, "/items/"), (3, "/ws/")):
            page = await http.get(f"/chapter/{example}")
            assert page.status_code == 200
            assert "<title>Chat</title>" in page.text and "<h1>WebSocket Chat</h1>" in page.text
            script = await http.get(f"/static/chapter{example}.js")
            assert socket_path in script.text
        index = await http.get("/")
        assert index.status_code == 200
        assert "script-src 'self'" in index.headers["content-security-policy"]
        assert "<script>" not in index.text  # no inline script: the CSP forbids it
