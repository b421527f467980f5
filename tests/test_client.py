"""The outgoing side (chat/client.py, replay and history in chat/service.py), against real
servers and Postgres: issue 14 items 1-3, each as it was reproduced.

- A socket whose queue overflows during replay is closed with 4000, never left silent.
- Replay holds no pooled connection while it waits on a socket: 30 sockets that do not read
  leave the pool to everyone else.
- History replies are capped in bytes and charged to the rate limits: a process under the
  amplification attack stays small and keeps serving a calm user.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import httpx
import psutil
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from chat.client import resume as resume_send
from chat.protocol import CLOSE_SLOW_CONSUMER
from tests.conftest import MakeToken, unique
from tests.roomclient import RoomClient
from tests.servers import DEFAULT_LIMITS, Server


async def fill_room(engine: AsyncEngine, room: str, *, count: int, body: str, batch: int = 1000) -> None:
    """`count` messages of `body` in a new room, written in SQL like any client: `batch` rows per
    transaction, as the README advises (each row's seq updates the room's row, and in one
    transaction of 20,000 rows that costs seconds more)."""
    async with engine.begin() as conn:
        room_id = await conn.scalar(text("INSERT INTO rooms (name) VALUES (:n) RETURNING id"), {"n": room})
    for start in range(0, count, batch):
        async with engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO messages (room_id, author, body) SELECT :r, 'bot', :b FROM generate_series(1, :n)"),
                {"r": room_id, "b": body, "n": min(batch, count - start)},
            )


async def insert_live(engine: AsyncEngine, room: str, *, count: int, batch: int = 10, body: str = "") -> None:
    """`count` more messages, a few per transaction: each is NOTIFYed to the listening servers."""
    for start in range(0, count, batch):
        async with engine.begin() as conn:
            room_id = await conn.scalar(text("SELECT id FROM rooms WHERE name = :n"), {"n": room})
            await conn.execute(
                text("INSERT INTO messages (room_id, author, body) VALUES (:r, 'live', :b)"),
                [{"r": room_id, "b": f"live {i} {body}"} for i in range(start, min(start + batch, count))],
            )


async def open_raw(url: str, token: str, **kwargs: object) -> ClientConnection:
    # max_queue=1: the client library buffers almost nothing, so a client that does not read
    # really does not read (TCP pushes back on the server).
    return await connect(url, additional_headers={"Cookie": f"session={token}"}, max_queue=1, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def small_queue_server(database_url: str, tmp_root: Path) -> Iterator[Server]:
    server = Server(database_url, tmp_root, env={"CHAT_SOCKET_QUEUE": "64"})
    yield server
    server.stop()


async def test_overflow_during_replay_closes_4000_or_serves_everything(
    small_queue_server: Server, engine: AsyncEngine, make_token: MakeToken
) -> None:
    """Issue 14 item 3: a big room, a client joining with after=0 that reads slowly while rows
    are inserted. It got `ready`, then nothing, forever. Now it is either served every message
    in order, or closed with 4000 (then it resumes)."""
    room = unique("replay")
    replayed, live, later = 10_000, 400, 20  # 20 MB: more than the socket buffers hold
    await fill_room(engine, room, count=replayed, body="x" * 2000)
    ws = await open_raw(small_queue_server.ws(f"/rooms/{room}/ws?after=0"), await make_token())
    seqs: list[int] = []
    frames: list[str] = []
    inserted, ready = asyncio.Event(), asyncio.Event()

    async def read() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                frame = json.loads(raw)
                frames.append(frame["type"])
                if frame["type"] == "message":
                    seqs.append(frame["seq"])
                    if not inserted.is_set():
                        await asyncio.sleep(0.002)  # slow while the rows go in
                if frame["type"] == "ready":
                    ready.set()
                if seqs and seqs[-1] == replayed + live + later:
                    await ws.close()

    reader = asyncio.create_task(read())
    while not seqs:  # the replay is under way
        await asyncio.wait([reader], timeout=0.05)
        assert not reader.done(), f"closed before any message: {ws.close_code}"
    await insert_live(engine, room, count=live)
    inserted.set()
    await asyncio.wait([reader, asyncio.create_task(ready.wait())], timeout=120, return_when=asyncio.FIRST_COMPLETED)
    await insert_live(engine, room, count=later)  # after ready: live, through the queue
    await asyncio.wait_for(reader, 60)  # never silent: either served to the end, or closed
    if ws.close_code == CLOSE_SLOW_CONSUMER:
        assert seqs == list(range(1, len(seqs) + 1))  # what came before the close had no gap
        async with await RoomClient.open(
            small_queue_server.ws(f"/rooms/{room}/ws"), await make_token(), after=seqs[-1] if seqs else 0
        ) as resumed:
            await resumed.until_seq(replayed + live + later, timeout=60)
            assert seqs + resumed.seqs() == list(range(1, replayed + live + later + 1))
    else:
        assert seqs == list(range(1, replayed + live + later + 1))
        assert "ready" in frames


async def replay_hogs(server: Server, room: str, token: str, *, sockets: int = 30) -> list[ClientConnection]:
    """Item 2's attack: `sockets` sockets of one user join a big room with after=0 and do not read.
    Returned once replays are under way (the first few; the others wait for a slot of their user)."""
    hogs = [await open_raw(server.ws(f"/rooms/{room}/ws?after=0"), token) for _ in range(sockets)]
    for ws in hogs[:4]:
        await asyncio.wait_for(ws.recv(), 30)
    return hogs


async def test_replays_that_wait_on_sockets_hold_no_pooled_connection(
    server_a: Server, engine: AsyncEngine, make_token: MakeToken
) -> None:
    """Issue 14 item 2: 30 sockets of one user join a big room with after=0 and do not read.
    They once took the whole pool: another user's join timed out and /api/me answered 500."""
    room = unique("pool")
    await fill_room(engine, room, count=20_000, body="y" * 1000)
    sockets = await replay_hogs(server_a, room, await make_token())
    try:
        calm = await make_token()
        started = time.monotonic()
        async with await RoomClient.open(server_a.ws(f"/rooms/{room}/ws"), calm) as other:
            await other.ready()
            assert time.monotonic() - started < 2.0, "another user's join waited on the hog's replays"
            async with httpx.AsyncClient(timeout=10, cookies={"session": calm}) as http:
                started = time.monotonic()
                me = await http.get(f"{server_a.http}/api/me")
                assert me.status_code == 200, me.text
                assert time.monotonic() - started < 2.0
            await other.send("still served")
            await other.until("ack")
    finally:
        # At once: each close waits (up to its timeout) for a server still stuck sending to it.
        await asyncio.gather(*(ws.close() for ws in sockets))


@pytest.fixture(scope="module")
def limited_server(database_url: str, tmp_root: Path) -> Iterator[Server]:
    server = Server(database_url, tmp_root, limits=DEFAULT_LIMITS)
    yield server
    server.stop()


def rss(pid: int) -> int:
    proc = psutil.Process(pid)
    return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))


class PeakRss:
    """How far a process (with its children) grows from now to its peak, sampled until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = self.peak = rss(pid)
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):  # until it is stopped, or ends
            while True:
                self.peak = max(self.peak, rss(self.pid))
                await asyncio.sleep(0.05)

    async def stop(self) -> float:
        """The growth, in MB."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        with contextlib.suppress(psutil.NoSuchProcess):
            self.peak = max(self.peak, rss(self.pid))
        return (self.peak - self.baseline) / 2**20


async def history_socket_attack(server: Server, room: str, token: str, *, sockets: int = 4, asks: int = 25) -> None:
    """Item 1 on sockets: each socket asks for the biggest history page `asks` times, never reading."""
    for _ in range(sockets):
        ws = await open_raw(server.ws(f"/rooms/{room}/ws"), token)
        try:
            for _ in range(asks):
                await ws.send(json.dumps({"type": "history", "before": 201, "limit": 200}))
        except ConnectionClosed:
            pass
        finally:
            ws.transport.abort()


async def history_http_attack(server: Server, room: str, token: str, *, requests: int = 100) -> list[int]:
    """Item 1 on the HTTP API: the biggest page, again and again. The statuses; every page served
    is capped in bytes (has_more)."""
    statuses: list[int] = []
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=server.http, headers=headers, timeout=30) as http:
        for _ in range(requests):
            try:
                response = await http.get(f"/api/rooms/{room}/messages", params={"limit": 200})
            except httpx.RemoteProtocolError:  # a kept-alive connection closed by the server: reconnect
                statuses.append(0)
                continue
            statuses.append(response.status_code)
            if response.status_code == 200:
                page = response.json()
                assert len(response.content) < 600_000
                assert page["has_more"] is True and 0 < len(page["messages"]) < 200
    return statuses


async def test_history_amplification_stays_bounded(
    limited_server: Server, engine: AsyncEngine, make_token: MakeToken
) -> None:
    """Issue 14 item 1: 200 messages of 16,000 control characters make a 19.7 MB history
    reply. A socket asking for it 25 times without reading took a process from 128 MB to
    597 MB, and the HTTP API served the same pages with no limit. Now both are capped in bytes
    (has_more), charged to the rate limits by size, and the process grows by < 128 MB while a
    calm user is served."""
    server = limited_server
    room = unique("amp")
    await fill_room(engine, room, count=200, body="\x01" * 16000)
    attacker, calm = await make_token(), await make_token()
    memory = PeakRss(server.proc.pid)
    attacks = asyncio.gather(history_socket_attack(server, room, attacker), history_http_attack(server, room, attacker))
    async with await RoomClient.open(server.ws(f"/rooms/{room}/ws"), calm) as user:
        await user.ready()
        for i in range(5):
            await user.send(f"calm {i}", client_id=f"c{i}")
            await user.until("ack", client_id=f"c{i}", timeout=10)
        await user.ws.send(json.dumps({"type": "history", "before": 201, "limit": 200}))
        page = await user.until("history", timeout=10)
        assert page["has_more"] is True and 0 < len(page["messages"]) < 200
        assert page["messages"][-1]["seq"] == 200  # the newest of the page are kept
    _, statuses = await attacks
    growth = await memory.stop()
    assert 429 in statuses, "the HTTP API has no per-user limit"
    assert growth < 128, f"the server grew by {growth:.0f} MB"


# --- sends started in offer(): what happens when one has to wait (chat/client.py resume) ------------


async def test_a_send_stepped_by_hand_finishes_in_a_task_with_its_result() -> None:
    waited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def send() -> int:
        return await waited + 1

    coroutine = send()
    pending = coroutine.send(None)  # suspends on `waited`
    assert pending is waited
    task = asyncio.create_task(resume_send(coroutine, pending))
    await asyncio.sleep(0)
    assert not task.done()
    waited.set_result(41)
    assert await asyncio.wait_for(task, 10) == 42


async def test_a_send_stepped_by_hand_passes_errors_and_cancellation_through() -> None:
    loop = asyncio.get_running_loop()
    failing: asyncio.Future[None] = loop.create_future()
    cleaned: list[str] = []

    async def send(waited: asyncio.Future[None]) -> None:
        try:
            await waited
        finally:
            cleaned.append("done")

    coroutine = send(failing)
    task = asyncio.create_task(resume_send(coroutine, coroutine.send(None)))
    failing.set_exception(OSError("gone"))
    with pytest.raises(OSError, match="gone"):
        await asyncio.wait_for(task, 10)

    hanging: asyncio.Future[None] = loop.create_future()
    coroutine = send(hanging)
    task = asyncio.create_task(resume_send(coroutine, coroutine.send(None)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert hanging.cancelled() and cleaned == ["done", "done"]


WSPROTO = pytest.param(
    "wsproto", marks=pytest.mark.skipif(find_spec("wsproto") is None, reason="wsproto is not installed (optional)")
)


@pytest.fixture(scope="module", params=["websockets-sansio", "websockets", WSPROTO])
def roomy_server(request: pytest.FixtureRequest, database_url: str, tmp_root: Path) -> Iterator[Server]:
    """Each of uvicorn's websocket implementations, with queues big enough to hold what the
    kernel's socket buffers cannot."""
    env = {"CHAT_WS": request.param, "CHAT_SOCKET_QUEUE": "100000", "CHAT_SOCKET_QUEUE_BYTES": str(256 * 1024 * 1024)}
    server = Server(database_url, tmp_root, env=env)
    yield server
    server.stop()


async def test_a_paused_transport_gets_every_frame_in_order(
    roomy_server: Server, engine: AsyncEngine, make_token: MakeToken
) -> None:
    """A client that stops reading while 16 MB of live messages arrive: the kernel's buffers fill,
    the transport pauses, sends that offer() began suspend and the rest queue behind them. Once
    it reads again it gets every message, once each, in seq order."""
    room = unique("paused")
    count = 4000
    await fill_room(engine, room, count=0, body="")
    ws = await open_raw(roomy_server.ws(f"/rooms/{room}/ws"), await make_token())
    try:
        while json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] != "ready":
            pass
        await insert_live(engine, room, count=count, batch=100, body="y" * 4000)
        seqs: list[int] = []
        while len(seqs) < count:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if frame["type"] == "message":
                seqs.append(frame["seq"])
        assert seqs == list(range(1, count + 1))
    finally:
        await ws.close()


async def test_a_live_overflow_still_closes_the_socket_4000(
    small_queue_server: Server, engine: AsyncEngine, make_token: MakeToken
) -> None:
    """Live messages to a socket that does not read: past the queue's bound (64 frames here) it
    is closed with 4000, and what it got before the close has no gap."""
    room = unique("overflow")
    await fill_room(engine, room, count=0, body="")
    ws = await open_raw(small_queue_server.ws(f"/rooms/{room}/ws"), await make_token())
    while json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] != "ready":
        pass
    await insert_live(engine, room, count=4000, batch=100, body="z" * 4000)
    seqs: list[int] = []
    with contextlib.suppress(ConnectionClosed):
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if frame["type"] == "message":
                seqs.append(frame["seq"])
    assert ws.close_code == CLOSE_SLOW_CONSUMER
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < 4000
