"""Never lose or duplicate a message: for each fault, several clients send a few hundred
messages across two server processes while it happens, and every client must end with exactly
the room's seq 1..N, once each, in order."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest
from sqlalchemy.ext.asyncio import create_async_engine
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from chat import store
from chat.cli import run_migrations
from chat.config import libpq_url
from chat.embedded import EmbeddedPostgres
from tests.conftest import Database, MakeToken, unique
from tests.resilient import ResilientClient
from tests.roomclient import RoomClient
from tests.servers import Endpoint, Server

TOTAL = 300
CLIENTS = 4
# Quick failure detection for the tests; production defaults are 2 s and 3 s.
FAST_LISTENER = {"CHAT_LISTEN_HEARTBEAT_SECONDS": "0.5", "CHAT_LISTEN_TIMEOUT_SECONDS": "1"}
Fault = Callable[[list[ResilientClient]], Awaitable[None]]


MID_STREAM_ACKS = 5  # each client has this many acks (of its 75) when the fault strikes


async def mid_stream(clients: Sequence[ResilientClient], runs: Sequence[asyncio.Task[None]]) -> None:
    """Until every client is connected and sending (a few of its messages acked), however
    loaded the machine: a fault that strikes before some client has joined tests less."""
    async with asyncio.timeout(60):
        while not all(len(c.acked_ids) >= MID_STREAM_ACKS for c in clients):
            if any(run.done() for run in runs):
                return  # a client ended early: its result (an exception) is raised below
            await asyncio.sleep(0.02)


async def run_with_fault(
    servers: Sequence[Endpoint],
    make_token: MakeToken,
    database_url: str,
    fault: Fault,
    *,
    label: str,
    body: int = 0,
    pace: float = 0.03,
) -> list[ResilientClient]:
    room = unique("fault")
    urls = [s.ws(f"/rooms/{room}/ws") for s in servers]
    per_client = TOTAL // CLIENTS
    clients = [
        ResilientClient(
            f"c{i}",
            urls,
            await make_token(),
            [f"c{i}-{n} " + "x" * body for n in range(per_client)],
            pace=pace,
            first=i,
        )
        for i in range(CLIENTS)  # spread over the servers
    ]
    runs = [asyncio.create_task(c.run(TOTAL, timeout=90)) for c in clients]
    await mid_stream(clients, runs)
    await fault(clients)
    await asyncio.gather(*runs)

    for client in clients:
        print(f"{label}: {client.name} saw {len(client.seqs)} messages, {client.stats}")
        assert client.violations == [], client.violations
        assert client.seqs == list(range(1, TOTAL + 1))
    conn = await asyncpg.connect(libpq_url(database_url))
    try:
        stored = await conn.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT client_id) AS ids, max(seq) AS head"
            " FROM messages JOIN rooms ON rooms.id = room_id WHERE name = $1",
            room,
        )
    finally:
        await conn.close()
    assert (stored["n"], stored["ids"], stored["head"]) == (TOTAL, TOTAL, TOTAL)  # each once
    print(f"{label}: {TOTAL} sent, {TOTAL} stored once each, 0 lost, 0 duplicated")
    return clients


@pytest.fixture
async def pair(database_url: str, tmp_root: Path, request: pytest.FixtureRequest) -> AsyncIterator[list[Server]]:
    env = dict(FAST_LISTENER)
    if getattr(request, "param", "notify") == "redis":  # fan-out through Redis (tests/test_redisbus.py)
        env["CHAT_FANOUT_URL"] = request.getfixturevalue("redis_server").url
    servers = [Server(database_url, tmp_root, env=env) for _ in range(2)]
    yield servers
    for server in servers:
        server.stop()


async def listener_pids(database_url: str, servers: list[Server]) -> list[int]:
    """The Postgres backends serving these servers' LISTEN connections."""
    names = [f"chat-listener-{s.proc.pid}" for s in servers]
    conn = await asyncpg.connect(libpq_url(database_url))
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = ANY($1::text[])", names)
    finally:
        await conn.close()
    return [r["pid"] for r in rows]


async def test_listener_backend_killed(pair: list[Server], make_token: MakeToken, database_url: str) -> None:
    async def fault(clients: list[ResilientClient]) -> None:
        pids = await listener_pids(database_url, pair)
        assert len(pids) == 2
        conn = await asyncpg.connect(libpq_url(database_url))
        try:
            for pid in pids:
                assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await conn.close()

    await run_with_fault(pair, make_token, database_url, fault, label="pg_terminate_backend(listener)")
    assert all("listener reconnected" in server.log() for server in pair)


async def test_listener_backend_frozen(pair: list[Server], make_token: MakeToken, database_url: str) -> None:
    """SIGSTOP the listeners' Postgres backends for longer than the heartbeat timeout."""

    async def fault(clients: list[ResilientClient]) -> None:
        pids = await listener_pids(database_url, pair)
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:  # frozen until each heartbeat has noticed, however long a busy machine takes
            async with asyncio.timeout(30):
                while not all("listener heartbeat failed" in server.log() for server in pair):
                    await asyncio.sleep(0.05)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    await run_with_fault(pair, make_token, database_url, fault, label="SIGSTOP(listener backend)")
    assert all("listener reconnected" in server.log() for server in pair)


@pytest.fixture
def idle_database(postgres: Database) -> str:
    """A database whose sessions are cut after 300 ms idle."""
    url = postgres.create("chat_idle")
    run_migrations(url)
    name = url.split("?")[0].rsplit("/", 1)[1]
    postgres.execute(f"ALTER DATABASE \"{name}\" SET idle_session_timeout = '300ms'")
    return url


def token_maker(url: str) -> MakeToken:
    async def make() -> str:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as db:
                return (await store.create_token(db, user_name=unique("u"), ttl=None))[1]
        finally:
            await engine.dispose()

    return make


async def test_idle_session_timeout(idle_database: str, tmp_root: Path) -> None:
    servers = [Server(idle_database, tmp_root) for _ in range(2)]  # default heartbeat 2 s, far over 300 ms
    try:

        async def fault(clients: list[ResilientClient]) -> None:
            await asyncio.sleep(1.0)  # idle connections are being cut all along

        await run_with_fault(servers, token_maker(idle_database), idle_database, fault, label="idle_session_timeout")
        # The listener opts out of idle_session_timeout, so it never even had to reconnect.
        assert not any("listener reconnected" in server.log() for server in servers)
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize("pair", ["notify", "redis"], indirect=True)
async def test_server_killed(pair: list[Server], make_token: MakeToken, database_url: str) -> None:
    async def fault(clients: list[ResilientClient]) -> None:
        pair[0].proc.kill()  # kill -9 mid-stream: its clients move to the other process

    clients = await run_with_fault(pair, make_token, database_url, fault, label="kill -9 (server)")
    assert sum(c.stats.connects > 1 for c in clients) >= 2  # the killed server's clients moved


async def test_server_terminated(pair: list[Server], make_token: MakeToken, database_url: str) -> None:
    async def fault(clients: list[ResilientClient]) -> None:
        pair[0].proc.send_signal(signal.SIGTERM)

    clients = await run_with_fault(pair, make_token, database_url, fault, label="SIGTERM (server)")
    assert pair[0].proc.wait(20) in (0, 128 + signal.SIGTERM)
    assert sum(c.stats.closes[1001] for c in clients) >= 1  # told "going away", not dropped


@pytest.mark.parametrize("pair", ["notify", "redis"], indirect=True)
async def test_client_network_drops(pair: list[Server], make_token: MakeToken, database_url: str) -> None:
    async def fault(clients: list[ResilientClient]) -> None:
        for _ in range(3):
            for client in clients:
                client.drop_network()  # no close frame: the TCP connection just goes
            await asyncio.sleep(0.3)

    await run_with_fault(pair, make_token, database_url, fault, label="client network drop")


@pytest.fixture
def own_postgres(tmp_root: Path) -> Iterator[tuple[EmbeddedPostgres, str]]:
    with EmbeddedPostgres(tmp_root / unique("restart-pg"), durable=False) as pg:
        url = Database(pg.url).create("chat_restart")
        run_migrations(url)
        yield pg, url


async def test_postgres_restarts(own_postgres: tuple[EmbeddedPostgres, str], tmp_root: Path) -> None:
    """Stop and start the (embedded) Postgres mid-stream: sends are refused as unavailable and
    resent, listeners reconnect and backfill, pools replace their dead connections."""
    pg, url = own_postgres
    servers = [Server(url, tmp_root, env=FAST_LISTENER) for _ in range(2)]
    try:

        async def fault(clients: list[ResilientClient]) -> None:
            await asyncio.to_thread(pg.stop)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(pg.start)

        clients = await run_with_fault(servers, token_maker(url), url, fault, label="Postgres restart")
        assert sum(c.stats.unavailable for c in clients) > 0  # sends really met the outage
        assert all("listener reconnected" in server.log() for server in servers)
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def small_notify_queue(tmp_root: Path) -> Iterator[str]:
    # The smallest NOTIFY queue Postgres allows (64 pages, 512 KB) instead of 8 GB.
    with EmbeddedPostgres(
        tmp_root / unique("queue-pg"), durable=False, settings={"max_notify_queue_pages": "64"}
    ) as pg:
        url = Database(pg.url).create("chat_queue")
        run_migrations(url)
        yield url


async def test_full_notify_queue_is_detected_and_recovered(small_notify_queue: str, tmp_root: Path) -> None:
    """A session that LISTENs and then sits in an open transaction pins Postgres's NOTIFY queue.
    The server reports it filling; sends fail as unavailable once it is full (stored nothing);
    when the session lets go, resent messages go through and nothing is lost."""
    url = small_notify_queue
    servers = [Server(url, tmp_root, env=FAST_LISTENER)]
    stuck = await asyncpg.connect(libpq_url(url))
    await stuck.execute("LISTEN anything")
    await stuck.execute("BEGIN; SELECT 1")  # idle in transaction: it never reads again
    try:

        async def fault(clients: list[ResilientClient]) -> None:
            async with httpx.AsyncClient() as http:
                for _ in range(300):  # until the heartbeat has seen the queue fill up
                    ready = (await http.get(f"{servers[0].http}/readyz")).json()
                    if ready["notify_queue_usage"] >= 0.5:
                        break
                    await asyncio.sleep(0.05)
            assert ready["notify_queue_usage"] >= 0.5
            async with asyncio.timeout(30):  # hold on until the full queue refuses sends
                while not any(c.stats.unavailable for c in clients):
                    await asyncio.sleep(0.05)
            await stuck.execute("ROLLBACK")
            await stuck.close()

        # Big messages fill 512 KB quickly.
        clients = await run_with_fault(servers, token_maker(url), url, fault, label="NOTIFY queue full", body=3000)
        # The warning itself, not the "back to" line that recovery also logs.
        assert "% full: a listening session has stopped reading" in servers[0].log()
        assert sum(c.stats.unavailable for c in clients) > 0  # the full queue really refused sends
    finally:
        if not stuck.is_closed():
            await stuck.close()
        for server in servers:
            server.stop()


@pytest.fixture
def durable_postgres(tmp_root: Path) -> Iterator[tuple[EmbeddedPostgres, str]]:
    """Postgres as production runs it: fsync and synchronous_commit on (every other test runs
    without them, for speed)."""
    with EmbeddedPostgres(tmp_root / unique("durable-pg"), durable=True) as pg:
        url = Database(pg.url).create("chat_durable")
        run_migrations(url)
        yield pg, url


def crash(pg: EmbeddedPostgres) -> None:
    """kill -9 of the postmaster and all its processes at once: a crash, not a shutdown. Whatever
    was only in Postgres's memory (WAL buffers not yet written) is gone."""
    assert pg.process is not None
    postmaster = psutil.Process(pg.process.pid)
    for proc in [postmaster, *postmaster.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    pg.process.wait()


async def stored_client_ids(url: str, ids: list[str]) -> set[str]:
    conn = await asyncpg.connect(libpq_url(url))
    try:
        rows = await conn.fetch("SELECT client_id FROM messages WHERE client_id = ANY($1::text[])", ids)
    finally:
        await conn.close()
    return {row["client_id"] for row in rows}


async def test_acknowledged_means_on_disk(durable_postgres: tuple[EmbeddedPostgres, str], tmp_root: Path) -> None:
    """README: "a message is acknowledged once it is committed". With durability on, Postgres is
    killed with -9 while 4 clients on 2 processes send: after crash recovery every message that
    had been acknowledged is in the table, and every client resumes to exactly seq 1..N."""
    pg, url = durable_postgres
    servers = [Server(url, tmp_root, env=FAST_LISTENER) for _ in range(2)]
    acked_before: list[str] = []
    try:

        async def fault(clients: list[ResilientClient]) -> None:
            await asyncio.to_thread(crash, pg)
            # Taken after the kill: any ack a client holds now was sent before the crash.
            acked_before.extend(i for c in clients for i in c.acked_ids)
            await asyncio.to_thread(pg.start)  # crash recovery replays the WAL
            # Checked before the clients could resend anything: they never resend an acked id.
            assert await stored_client_ids(url, acked_before) == set(acked_before)

        clients = await run_with_fault(servers, token_maker(url), url, fault, label="kill -9 (durable Postgres)")
        assert len(acked_before) > 0  # messages really were acknowledged before the crash
        assert sum(c.stats.unavailable + c.stats.connects - 1 for c in clients) > 0  # the crash was felt
        print(f"kill -9 (durable Postgres): {len(acked_before)} acked before the crash, all on disk after it")
    finally:
        for server in servers:
            server.stop()


async def test_sigterm_drains_without_losing_an_ack(database_url: str, tmp_root: Path, make_token: MakeToken) -> None:
    """README, "Graceful shutdown": on SIGTERM a process refuses new sockets with 503, lets each
    socket finish its frame, flushes its acks and closes it with 1001, all within 5 seconds.
    The clients here never resend, so an ack the drain dropped would show as a stored message
    its sender was never told about."""
    server = Server(database_url, tmp_root)
    room = unique("drain")
    url = server.ws(f"/rooms/{room}/ws")
    token = await make_token()
    stuck: ClientConnection | None = None
    try:
        # A socket that never reads, behind more than its buffers hold: it keeps the drain busy
        # for the whole grace period, so the drain is long enough to be watched.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        stuck = await connect(url, sock=sock, additional_headers={"Cookie": f"session={token}"}, max_queue=1)
        filler = await RoomClient.open(url, token)
        await filler.ready()
        for i in range(450):  # 7 MB: more than the kernel's socket buffers (4 MB at most here)
            await filler.send(f"fill {i} " + "x" * 16000, client_id=f"fill-{i}")
        await filler.until("ack", client_id="fill-449", timeout=60)
        await filler.close()

        senders = [await RoomClient.open(url, await make_token()) for _ in range(4)]
        for sender in senders:
            await sender.ready()

        async def send_until_closed(n: int, sender: RoomClient) -> None:
            with contextlib.suppress(ConnectionClosed):
                for i in range(100_000):
                    await sender.send(f"s{n}-{i}", client_id=f"s{n}-{i}")
                    await asyncio.sleep(0.005)

        sending = [asyncio.create_task(send_until_closed(n, s)) for n, s in enumerate(senders)]
        async with asyncio.timeout(30):  # mid-stream
            while not all(any(f["type"] == "ack" for f in s.frames) for s in senders):
                await asyncio.sleep(0.02)

        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        answers: Counter[int] = Counter()
        async with asyncio.timeout(60):
            while True:  # new sockets during the drain: 503 each, until the drain is over
                try:
                    async with connect(url, additional_headers={"Cookie": f"session={token}"}, open_timeout=5):
                        answers[101] += 1
                except InvalidStatus as exc:
                    if exc.response.status_code != 503:
                        # The drain waits for a handshake reading its token (test_ws.py), but one
                        # that uvicorn read in the very step its shutdown began, before the app
                        # saw it, is still answered 500 by uvicorn: the drain is over.
                        assert exc.response.status_code == 500, exc
                        break
                    answers[503] += 1
                except (OSError, InvalidMessage):  # refused, or cut unanswered: uvicorn is shutting down
                    break
                await asyncio.sleep(0.02)
        drained = time.monotonic() - started
        assert answers[503] > 0 and set(answers) == {503}, answers
        assert drained < 5.0 + 5.0, f"the drain took {drained:.1f}s"  # documented bound, generous slack
        assert server.proc.wait(30) in (0, 128 + signal.SIGTERM)
        exited = time.monotonic() - started
        assert exited < 5.0 + 10.0 + 10.0  # README: uvicorn's own shutdown finishes within 10 more
        await asyncio.gather(*sending)
        for sender in senders:
            assert await sender.wait_closed() == 1001

        conn = await asyncpg.connect(libpq_url(database_url))
        try:
            rows = await conn.fetch(
                "SELECT client_id FROM messages JOIN rooms ON rooms.id = room_id"
                " WHERE name = $1 AND client_id LIKE 's%'",
                room,
            )
        finally:
            await conn.close()
        stored = {row["client_id"] for row in rows}
        acked = {f["client_id"] for s in senders for f in s.frames if f["type"] == "ack"}
        assert acked == stored  # every stored message was acked, every ack was stored
        print(
            f"SIGTERM: drained in {drained:.1f}s, exited after {exited:.1f}s,"
            f" {answers[503]} new sockets refused with 503, {len(acked)} acks, all stored"
        )
    finally:
        if stuck is not None:
            stuck.transport.abort()
        server.stop()
