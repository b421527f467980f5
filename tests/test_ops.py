"""Operations: /metrics counts what happened (summed over workers), /readyz follows the
listener, and every connection event is one structured log line without a token."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chat.cli import run_migrations
from chat.config import libpq_url
from tests.conftest import Database, MakeToken, unique
from tests.roomclient import RoomClient
from tests.servers import Server, pids_serving
from tests.test_auth import refusal


async def scrape(server: Server) -> dict[str, float]:
    """Every sample of /metrics, keyed by name and labels."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{server.http}/metrics")).text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "pid")
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            samples[key] = samples.get(key, 0.0) + sample.value
    return samples


@pytest.fixture
def fresh_server(database_url: str, tmp_root: Path) -> Iterator[Server]:
    server = Server(database_url, tmp_root)  # its counters start at zero
    yield server
    server.stop()


async def test_metrics_count_what_was_sent(fresh_server: Server, make_token: MakeToken) -> None:
    path = f"/rooms/{unique('r')}/ws"
    sender = await RoomClient.open(fresh_server.ws(path), await make_token())
    reader = await RoomClient.open(fresh_server.ws(path), await make_token())
    await sender.ready()
    await reader.ready()
    assert (await scrape(fresh_server))["chat_open_sockets"] == 2
    for i in range(10):
        await sender.send(f"m{i}", client_id=f"m{i}")
    await sender.send("m0", client_id="m0")  # a resend: not a new message
    await sender.ws.send("not json")
    await sender.until("error")
    for client in (sender, reader):
        await client.until_seq(10)
    for _ in range(2):
        await refusal(fresh_server.ws(f"{path}?token=some-key-token"))

    m = await scrape(fresh_server)
    assert m["chat_messages_in_total"] == 10
    assert m["chat_messages_out_total"] == 20  # ten messages, two sockets
    assert m["chat_fanout_delay_seconds_count"] == 10  # every live message, once per process
    assert m["chat_refusals_total{reason=invalid token}"] == 2
    assert m["chat_refusals_total{reason=invalid_json}"] == 1
    assert m["chat_listener_reconnects_total"] == 0
    assert 0 <= m["chat_notify_queue_usage"] < 0.5
    await sender.close()
    await reader.close()
    async with asyncio.timeout(10):
        while (await scrape(fresh_server))["chat_open_sockets"] != 0:
            await asyncio.sleep(0.05)


async def test_metrics_add_up_over_workers(database_url: str, tmp_root: Path, make_token: MakeToken) -> None:
    server = Server(database_url, tmp_root, workers=2)
    try:
        room = unique("r")
        path = f"/rooms/{room}/ws"
        clients: list[RoomClient] = []
        # The kernel picks the worker for each connection: open sockets until both have some.
        while len(clients) < 8 or len(await pids_serving(database_url, room)) < 2:
            assert len(clients) < 40, "every socket landed on one worker"
            clients.append(await RoomClient.open(server.ws(path), await make_token()))
            await clients[-1].ready()
        n = len(clients)
        for i, client in enumerate(clients[:5]):
            await client.send(f"from {i}")
        for client in clients:
            await client.until_seq(5)
        for _ in range(6):  # whichever worker answers, it reports the whole server
            m = await scrape(server)
            assert m["chat_open_sockets"] == n
            assert m["chat_messages_in_total"] == 5
            assert m["chat_messages_out_total"] == 5 * n
        for client in clients:
            await client.close()
    finally:
        server.stop()


@pytest.fixture
def own_database(postgres: Database) -> str:
    url = postgres.create("chat_ready")
    run_migrations(url)
    return url


async def test_readyz_follows_the_listener(own_database: str, postgres: Database, tmp_root: Path) -> None:
    server = Server(own_database, tmp_root, env={"CHAT_LISTEN_HEARTBEAT_SECONDS": "0.3"})
    name = own_database.split("?")[0].rsplit("/", 1)[1]
    admin = await asyncpg.connect(libpq_url(postgres.admin_url))
    try:
        async with httpx.AsyncClient() as http:

            async def ready() -> tuple[int, dict[str, object]]:
                response = await http.get(f"{server.http}/readyz")
                return response.status_code, response.json()

            assert (await ready())[0] == 200
            # Keep the listener from coming back: no new connections to this database.
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                f"chat-listener-{server.proc.pid}",
            )
            async with asyncio.timeout(15):
                while (status := await ready())[0] != 503:
                    await asyncio.sleep(0.05)
            assert status[1]["listener"] is False
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            async with asyncio.timeout(15):
                while (status := await ready())[0] != 200:
                    await asyncio.sleep(0.1)
            assert status[1]["listener"] is True
        assert (await scrape(server))["chat_listener_reconnects_total"] >= 1
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
        server.stop()


async def test_connection_events_are_structured_log_lines(fresh_server: Server, make_token: MakeToken) -> None:
    alice = unique("alice")
    token = await make_token(alice)
    room = unique("r")
    client = await RoomClient.open(fresh_server.ws(f"/rooms/{room}/ws"), token)
    await client.ready()
    await client.close()
    await refusal(fresh_server.ws(f"/rooms/{room}/ws?token=some-key-token"))
    async with asyncio.timeout(10):
        while "event=close" not in fresh_server.log():
            await asyncio.sleep(0.05)
    lines = [line for line in fresh_server.log().splitlines() if "event=" in line]
    assert any(f"event=open room={room} user={alice}" in line for line in lines)
    assert any(f"event=close room={room} user={alice} code=1000" in line for line in lines)
    assert any(
        "event=refused kind=websocket path=/rooms/" in line and 'reason="invalid token"' in line for line in lines
    )
    assert all(token not in line and "some-key-token" not in line for line in lines)
    # Who and which process: every event line ends with the client's address and the pid.
    events = [line for line in lines if "event=open" in line or "event=close" in line or "event=refused" in line]
    assert events and all(line.endswith(f" client=127.0.0.1 pid={fresh_server.proc.pid}") for line in events)
