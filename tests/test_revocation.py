"""Live sockets lose a token that is no longer good: revoked, expired, or its row deleted."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from chat import store
from tests.conftest import MakeToken, unique
from tests.roomclient import RoomClient
from tests.servers import Server


@pytest.fixture(scope="module")
def watcher(database_url: str, tmp_root: Path) -> Iterator[Server]:
    server = Server(database_url, tmp_root, env={"CHAT_TOKEN_CHECK_SECONDS": "0.5"})
    yield server
    server.stop()


async def test_deleting_a_token_row_closes_its_sockets(
    watcher: Server, engine: AsyncEngine, make_token: MakeToken
) -> None:
    """Issue 14 item 21: `DELETE FROM tokens` (by hand, or with its user) left its sockets open."""
    raw, bystander = await make_token(), await make_token()
    async with engine.connect() as conn:
        who = await store.identity_for_token(conn, raw=raw)
    room = watcher.ws(f"/rooms/{unique('r')}/ws")
    doomed = await RoomClient.open(room, raw)
    other = await RoomClient.open(room, bystander)
    await doomed.ready()
    await other.ready()
    async with connect(watcher.ws(f"/items/foo/ws?token={raw}")) as items:
        async with engine.begin() as conn:
            await conn.execute(text("DELETE FROM tokens WHERE id = :id"), {"id": who.token_id})
        assert await doomed.wait_closed(timeout=15) == 4001
        assert doomed.ws.close_reason == "token deleted"
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(15):
                while True:
                    await items.recv()
        assert (items.close_code, items.close_reason) == (4001, "token deleted")
    await other.send("still here")  # the others are untouched
    await other.until("ack")
    await other.close()
