"""Fan-out across real server processes sharing one database."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
from typing import Any

import asyncpg
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from chat.config import libpq_url
from tests.conftest import MakeToken, unique
from tests.roomclient import RoomClient
from tests.servers import Server
from tests.test_chapter import example_3_reference_sequence


async def test_room_messages_cross_processes_in_order(
    server_a: Server, server_b: Server, make_token: MakeToken
) -> None:
    path = f"/rooms/{unique('r')}/ws"
    on_a = [await RoomClient.open(server_a.ws(path), await make_token()) for _ in range(2)]
    on_b = [await RoomClient.open(server_b.ws(path), await make_token()) for _ in range(2)]
    everyone = on_a + on_b
    for client in everyone:
        await client.ready()
    per_sender = 50
    for i in range(per_sender):  # interleaved sends from both processes
        await on_a[0].send(f"a{i}")
        await on_b[0].send(f"b{i}")
    total = 2 * per_sender
    for client in everyone:
        await client.until_seq(total)
        assert client.seqs() == list(range(1, total + 1))
    assert on_a[1].bodies() == on_b[1].bodies()
    # Join and leave notices cross processes too.
    await on_b[1].close()
    leave = await on_a[1].until("leave")
    assert leave["room"] == path.split("/")[2]
    for client in everyone:
        await client.close()


async def test_chapter_clients_broadcast_across_processes(
    server_a: Server, server_b: Server, make_token: MakeToken
) -> None:
    """The chapter's example 3 reference sequence, with the two clients on different processes."""
    token = await make_token()
    async with (
        connect(server_a.ws(f"/ws/1234?token={token}")) as c1234,
        connect(server_b.ws(f"/ws/5678?token={token}")) as c5678,
    ):
        # No wait needed: the server subscribes before it completes the handshake.
        await example_3_reference_sequence(c1234, c5678)


async def test_row_inserted_with_plain_sql_reaches_live_sockets(
    server_a: Server, server_b: Server, make_token: MakeToken, database_url: str
) -> None:
    room = unique("r")
    path = f"/rooms/{room}/ws"
    a = await RoomClient.open(server_a.ws(path), await make_token())
    b = await RoomClient.open(server_b.ws(path), await make_token())
    await a.ready()
    await b.ready()
    conn = await asyncpg.connect(libpq_url(database_url))
    try:
        await conn.execute(
            "INSERT INTO messages (room_id, author, body) SELECT id, 'bot', 'from psql' FROM rooms WHERE name = $1",
            room,
        )
        big = "x" * 9000  # over the NOTIFY limit: delivered by reference
        await conn.execute(
            "INSERT INTO messages (room_id, author, body, kind)"
            " SELECT id, 'bot', $2, 'notice' FROM rooms WHERE name = $1",
            room,
            big,
        )
    finally:
        await conn.close()
    for client in (a, b):
        await client.until_seq(2)
        first, second = (f for f in client.frames if f["type"] == "message")
        assert (first["seq"], first["author"], first["body"]) == (1, "bot", "from psql")
        assert (second["seq"], second["kind"], second["body"]) == (2, "notice", big)
        await client.close()


async def test_slow_consumer_is_cut_off_and_does_not_stall_others(
    database_url: str, tmp_root: object, make_token: MakeToken
) -> None:
    """A socket that stops reading fills its bounded queue and is closed with 4000; the others
    keep receiving everything, in order."""
    from pathlib import Path

    assert isinstance(tmp_root, Path)
    server = Server(database_url, tmp_root, env={"CHAT_SOCKET_QUEUE": "16"})
    try:
        path = f"/rooms/{unique('r')}/ws"
        token = await make_token()
        # The stalled reader: a tiny receive buffer, and it never reads.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        stalled = await connect(
            server.ws(path), sock=sock, additional_headers={"Cookie": f"session={token}"}, max_queue=1
        )
        healthy = await RoomClient.open(server.ws(path), token)
        writer = await RoomClient.open(server.ws(path), token)
        await healthy.ready()
        await writer.ready()
        # Send until the server cuts the stalled socket off: how much that takes depends on the
        # kernel's socket buffers. Incompressible bodies, or permessage-deflate shrinks them away.
        count = 0
        for _ in range(40):
            for _ in range(50):
                count += 1
                await writer.send(f"{count} {base64.b64encode(os.urandom(9000)).decode()}")
            await writer.until_seq(count)
            if "closing a slow consumer" in server.log():
                break
        assert "closing a slow consumer" in server.log(), f"no overflow after {count} messages"

        async def drain() -> list[dict[str, Any]]:
            frames = []
            with contextlib.suppress(ConnectionClosed):
                async for raw in stalled:
                    frames.append(json.loads(raw))
            return frames

        # The stalled socket gets the documented close code once it reads what it had.
        frames = await asyncio.wait_for(drain(), 30)
        assert stalled.close_code == 4000
        await healthy.until_seq(count, timeout=60)
        assert healthy.seqs() == list(range(1, count + 1))
        seen = [f["seq"] for f in frames if f["type"] == "message"]
        assert len(seen) < count and seen == list(range(1, len(seen) + 1))
        # It can come back and resume exactly where it stopped.
        resumed = await RoomClient.open(server.ws(path), token, after=seen[-1] if seen else 0)
        await resumed.until_seq(count)
        assert seen + resumed.seqs() == list(range(1, count + 1))
        for client in (healthy, writer, resumed):
            await client.close()
    finally:
        server.stop()


async def test_listener_killed_mid_stream_loses_nothing(
    server_a: Server, server_b: Server, make_token: MakeToken, database_url: str
) -> None:
    """pg_terminate_backend on every LISTEN connection while messages flow: the listeners
    reconnect, backfill from the table, and every client ends with exactly 1..N."""
    path = f"/rooms/{unique('r')}/ws"
    clients = [await RoomClient.open(s.ws(path), await make_token()) for s in (server_a, server_b)]
    for client in clients:
        await client.ready()
    admin = await asyncpg.connect(libpq_url(database_url))
    total = 200
    killed = 0
    names = [f"chat-listener-{s.proc.pid}" for s in (server_a, server_b)]  # these servers' only
    listening = "SELECT count(*) FROM pg_stat_activity WHERE application_name = ANY($1)"
    try:
        for i in range(1, total + 1):
            await clients[i % 2].send(f"m{i}", client_id=f"m{i}")
            if i in (50, 120):
                hit: set[str] = set()
                async with asyncio.timeout(30):
                    # Both listeners up (again), then each killed once in this round: one caught
                    # between connections (a reconnect of its own) is killed on the next pass.
                    while hit != set(names):
                        while await admin.fetchval(listening, names) != 2:
                            await asyncio.sleep(0.05)
                        rows = await admin.fetch(
                            "SELECT application_name, pg_terminate_backend(pid) AS done FROM pg_stat_activity"
                            " WHERE application_name = ANY($1)",
                            [name for name in names if name not in hit],
                        )
                        hit |= {row["application_name"] for row in rows if row["done"]}
                killed += len(hit)
        for client in clients:
            await client.until_seq(total, timeout=60)
            assert client.seqs() == list(range(1, total + 1))
    finally:
        await admin.close()
        for client in clients:
            await client.close()
    assert killed == 4  # both processes' listeners, both times
