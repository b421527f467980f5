"""Through Debian's PgBouncer in transaction mode (README: Production), with the listener direct:
the CLI, and a 2-worker server doing everything a room does, with no prepared-statement error."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

from tests.conftest import Database, unique
from tests.daemons import PgBouncer
from tests.roomclient import RoomClient
from tests.servers import Server

POOLED = {"CHAT_DATABASE_POOLER": "transaction"}


class Pooled(NamedTuple):
    server: Server  # 2 workers, DATABASE_URL through PgBouncer, the listener direct
    token: str
    url: str  # the database through PgBouncer


@pytest.fixture(scope="module")
def pgbouncer(postgres: Database, tmp_root: Path) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(postgres.admin_url, tmp_root / "pgbouncer")
    yield bouncer
    bouncer.stop()


def chat(*args: str, url: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    environment.update({"DATABASE_URL": url, **env})
    return subprocess.run(
        [sys.executable, "-m", "chat", *args], env=environment, capture_output=True, text=True, timeout=120
    )


def test_without_the_setting_asyncpg_names_collide(postgres: Database, pgbouncer: PgBouncer) -> None:
    """The failure of issue 15: proves the pooler really shares server connections."""
    url = pgbouncer.url(postgres.create("chat_pgb_plain"))
    runs = [chat("migrate", url=url, env={}) for _ in range(3)]
    errors = "".join(run.stderr for run in runs)
    assert any(run.returncode != 0 for run in runs), errors
    assert "prepared statement" in errors and "already exists" in errors


@pytest.fixture(scope="module")
def pooled(postgres: Database, pgbouncer: PgBouncer, tmp_root: Path) -> Iterator[Pooled]:
    direct = postgres.create("chat_pgb")
    url = pgbouncer.url(direct)
    for _ in range(2):
        run = chat("migrate", url=url, env=POOLED)
        assert run.returncode == 0, run.stderr
    run = chat("token", "create", "alice", url=url, env=POOLED)
    assert run.returncode == 0, run.stderr
    token = run.stdout.strip().splitlines()[-1]
    server = Server(url, tmp_root, workers=2, env={**POOLED, "CHAT_LISTEN_DATABASE_URL": direct})
    yield Pooled(server, token, url)
    server.stop()


async def test_a_room_through_the_pooler(pooled: Pooled) -> None:
    server, token, _ = pooled
    room = unique("pgb")
    path = f"/rooms/{room}/ws"
    # Eight sockets over two workers, sending at once: many more clients than PgBouncer has
    # server connections (4), so statements of different clients meet on the same ones.
    clients = [await RoomClient.open(server.ws(path), token) for _ in range(8)]
    for client in clients:
        await client.ready()
    per_client = 15
    await asyncio.gather(
        *(c.send(f"word{i} from {n}", client_id=f"{n}-{i}") for n, c in enumerate(clients) for i in range(per_client))
    )
    total = per_client * len(clients)
    for client in clients:
        try:
            await client.until_seq(total)
        except TimeoutError:
            pytest.fail(f"missing messages; the server's log:\n{server.log()[-6000:]}")
        assert client.seqs() == list(range(1, total + 1))
    acks = [await clients[0].until("ack", client_id=f"0-{i}") for i in range(per_client)]
    assert all(ack["seq"] >= 1 for ack in acks)

    # Replay from a cursor, on a new socket.
    async with await RoomClient.open(server.ws(path), token, after=total - 5) as late:
        ready = await late.ready()
        assert late.seqs() == list(range(total - 4, total + 1))
        assert ready["online"] == ["alice"]  # presence, read through the pooler

    # The history API and search.
    async with httpx.AsyncClient(base_url=f"{server.http}/api", headers={"Authorization": f"Bearer {token}"}) as api:
        response = await api.get(f"/rooms/{room}/messages", params={"after": 0, "limit": 200})
        assert response.status_code == 200, (response.text, server.log()[-3000:])
        page = response.json()
        assert [m["seq"] for m in page["messages"]] == list(range(1, total + 1))
        found = (await api.get(f"/rooms/{room}/search", params={"q": "word3"})).json()
        assert len(found["results"]) == len(clients)

    for client in clients:
        await client.close()


def test_no_prepared_statement_errors_in_any_log(pooled: Pooled, pgbouncer: PgBouncer) -> None:
    server = pooled.server
    logs = server.log() + pgbouncer.log()
    assert "prepared statement" not in logs.lower()
    assert "Traceback" not in server.log()


def test_the_pooler_setting_needs_a_direct_listen_url(pooled: Pooled, tmp_root: Path) -> None:
    """LISTEN through a transaction-mode pooler would miss notifications: refuse to start."""
    with pytest.raises(RuntimeError, match="needs CHAT_LISTEN_DATABASE_URL"):
        Server(pooled.url, tmp_root, env=POOLED)
