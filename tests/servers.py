"""Real server processes for tests: `python -m chat serve` on a free port, on the test database."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

import asyncpg
import httpx

from chat.config import libpq_url

# Most tests blast messages to test delivery, not rate limits: they get room to do so. Tests of
# the limits start their servers with limits=DEFAULT_LIMITS.
GENEROUS_LIMITS = {
    "CHAT_RATE_PER_SECOND": "100000",
    "CHAT_RATE_BURST": "100000",
    "CHAT_USER_RATE_PER_SECOND": "100000",
    "CHAT_USER_RATE_BURST": "100000",
    "CHAT_API_RATE_PER_SECOND": "100000",
    "CHAT_API_RATE_BURST": "100000",
}
DEFAULT_LIMITS: dict[str, str] = {}


class Endpoint(Protocol):
    """Where clients connect: a server, or a proxy in front of several."""

    def ws(self, path: str) -> str: ...


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    started: list[Server] = []  # every server of this test session, for the logs of a failure

    def __init__(
        self,
        database_url: str,
        log_dir: Path,
        *,
        workers: int = 1,
        env: dict[str, str] | None = None,
        port: int | None = None,
        limits: dict[str, str] | None = None,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.log_path = log_dir / f"server-{self.port}.log"
        Server.started.append(self)
        environment = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
        # CHAT_ENV_FILE="": no .env from the working directory (a developer's) changes the servers.
        environment.update({"DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1", "CHAT_ENV_FILE": ""})
        environment.update(GENEROUS_LIMITS if limits is None else limits)
        environment.update(env or {})
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chat", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", str(workers)],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.wait_ready()

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.http}/readyz", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


async def pids_serving(database_url: str, room: str) -> set[int]:
    """The server processes holding sockets in `room`, from their presence rows (a process id is
    `host:pid:nonce`): how a test knows that its clients landed on different workers."""
    conn = await asyncpg.connect(libpq_url(database_url))
    try:
        rows = await conn.fetch(
            "SELECT DISTINCT p.process_id FROM presence p JOIN rooms r ON r.id = p.room_id WHERE r.name = $1", room
        )
    finally:
        await conn.close()
    return {int(row["process_id"].split(":")[1]) for row in rows}
