"""Deploys without downtime (README: Production): 4 clients send through nginx while the
instances are replaced, and every client ends with the room's seq 1..N, each once."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from tests.conftest import MakeToken
from tests.daemons import Nginx
from tests.resilient import ResilientClient
from tests.servers import Server
from tests.test_faults import run_with_fault

# Slow enough that the sends span every restart.
PACE = 0.12


async def test_rolling_restart_of_two_instances_behind_nginx(
    database_url: str, tmp_root: Path, make_token: MakeToken
) -> None:
    servers = [Server(database_url, tmp_root) for _ in range(2)]
    nginx = Nginx(tmp_root / "nginx-deploy", [s.port for s in servers])
    restarted: list[int] = []

    async def fault(clients: list[ResilientClient]) -> None:
        # The README's procedure: one instance at a time, the next once this one is ready.
        for i, old in enumerate(servers):
            await asyncio.to_thread(old.stop)  # SIGTERM: its sockets get 1001 and reconnect
            servers[i] = await asyncio.to_thread(Server, database_url, tmp_root, port=old.port)  # waits for /readyz
            restarted.append(old.proc.returncode)
            await nginx.routes_to(old.port)

    try:
        clients = await run_with_fault([nginx], make_token, database_url, fault, label="rolling restart", pace=PACE)
    finally:
        nginx.stop()
        for server in servers:
            server.stop()
    assert len(restarted) == 2
    # Both restarts cut live sockets, which came back through nginx at once: no handshake was
    # refused, since one instance was always up and nginx knew which.
    assert sum(c.stats.closes[1001] for c in clients) >= 2
    assert [c.stats.refused_with for c in clients] == [{}] * len(clients)
    assert sum(c.stats.connects for c in clients) >= len(clients) + 2


async def test_hup_replaces_the_workers_of_one_instance(
    database_url: str, tmp_root: Path, make_token: MakeToken
) -> None:
    """`kill -HUP` on `chat serve --workers 2`: uvicorn starts each new worker, waits until it
    serves, then stops the old one (which closes its sockets with 1001)."""
    server = Server(database_url, tmp_root, workers=2)

    async def fault(clients: list[ResilientClient]) -> None:
        os.kill(server.proc.pid, signal.SIGHUP)
        async with asyncio.timeout(60):
            while server.log().count("Terminated child process") < 2:
                await asyncio.sleep(0.1)

    try:
        clients = await run_with_fault([server], make_token, database_url, fault, label="kill -HUP", pace=PACE)
        assert server.proc.poll() is None  # the instance itself kept running
    finally:
        server.stop()
    assert sum(c.stats.closes[1001] for c in clients) >= 1
