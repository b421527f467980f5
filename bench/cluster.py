"""What the benchmark runs against: a Postgres, chat server processes, the in-memory baseline,
and the CPU and memory accounting of every process involved."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from chat.config import Settings, asyncpg_url, libpq_url

ROOT = Path(__file__).resolve().parent.parent


def _die_with_parent() -> None:
    """In the child between fork and exec: on Linux, get SIGTERM when the bench dies, even by -9."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


class Database:
    """An embedded Postgres in `work_dir` (durable: fsync and synchronous_commit on), or the
    server behind `url`. With `fresh`, a new database on that server, dropped at the end."""

    def __init__(self, work_dir: Path, *, url: str | None = None, fresh: bool = False) -> None:
        self.work_dir = work_dir
        self.given_url = asyncpg_url(url) if url else None
        self.fresh = fresh
        self.embedded: Any = None
        self.url = ""
        self.created: str | None = None  # the database we made (and drop)

    def start(self) -> str:
        if self.given_url is None:
            from chat.embedded import EmbeddedPostgres

            # Observability only: slow statements and checkpoints go to its log, which the run keeps.
            settings = {"log_min_duration_statement": "50", "log_checkpoints": "on", "log_autovacuum_min_duration": "0"}
            self.embedded = EmbeddedPostgres(self.work_dir / "pg", durable=True, settings=settings)
            self.url = self.embedded.start()
        else:
            self.url = self.given_url
            if self.fresh:
                name = f"bench_{uuid.uuid4().hex[:8]}"
                try:
                    asyncio.run(self._admin(f'CREATE DATABASE "{name}"'))
                    self.url, self.created = _with_database(self.given_url, name), name
                except (OSError, asyncpg.PostgresError):
                    pass  # no right to create databases: use the one we were given
        from chat.cli import run_migrations

        run_migrations(self.url)
        return self.url

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(libpq_url(self.given_url or self.url))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    @property
    def dsn(self) -> str:
        return libpq_url(self.url)

    @property
    def pid(self) -> int | None:
        proc = getattr(self.embedded, "process", None)
        return None if proc is None else int(proc.pid)

    def keep_log(self, log_dir: Path) -> Path | None:
        source = getattr(self.embedded, "log_path", None)
        if source is None or not Path(source).exists():
            return None
        target = log_dir / "postgres.log"
        target.write_bytes(Path(source).read_bytes())
        return target

    def stop(self) -> None:
        if self.created is not None:
            with contextlib.suppress(Exception):
                asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{self.created}" WITH (FORCE)'))
        if self.embedded is not None:
            self.embedded.stop()

    async def checkpoint(self) -> int | None:
        """CHECKPOINT now, and return how many checkpoints Postgres has started so far (None if
        it cannot tell). A run that follows bulk writes (the history room's million rows, the
        machine-limit loops) would otherwise meet their checkpoint in its measured window: on
        this disk the sync at its end, or the first WAL segment it has to create, holds a
        commit for 150-300 ms. A database we may not CHECKPOINT is measured as it is."""
        conn = await asyncpg.connect(self.dsn)
        try:
            with contextlib.suppress(asyncpg.PostgresError):  # not a superuser nor pg_checkpoint
                await conn.execute("CHECKPOINT")
            return await self._checkpoints(conn)
        finally:
            await conn.close()

    async def checkpoints(self) -> int | None:
        """How many checkpoints Postgres has started so far (timed and requested)."""
        conn = await asyncpg.connect(self.dsn)
        try:
            return await self._checkpoints(conn)
        finally:
            await conn.close()

    @staticmethod
    async def _checkpoints(conn: asyncpg.Connection) -> int | None:
        for sql in (
            "SELECT num_timed + num_requested FROM pg_stat_checkpointer",  # Postgres 17 and later
            "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter",
        ):
            with contextlib.suppress(asyncpg.PostgresError):
                return int(await conn.fetchval(sql))
        return None

    async def make_tokens(self, count: int, prefix: str = "bench") -> list[str]:
        from sqlalchemy.ext.asyncio import create_async_engine

        from chat import store

        engine = create_async_engine(self.url)
        tokens = []
        try:
            async with engine.connect() as conn:
                for i in range(count):
                    _, raw = await store.create_token(conn, user_name=f"{prefix}-{i}", ttl=timedelta(days=1))
                    tokens.append(raw)
        finally:
            await engine.dispose()
        return tokens

    async def settings(self) -> dict[str, str]:
        names = (
            "server_version",
            "fsync",
            "synchronous_commit",
            "wal_sync_method",
            "full_page_writes",
            "shared_buffers",
            "max_connections",
            "commit_delay",
        )
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch(
                "SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1::text[])", list(names)
            )
        finally:
            await conn.close()
        return {r["name"]: f"{r['setting']}{' x ' + r['unit'] if r['unit'] else ''}" for r in rows}


# The baselines' ASGI apps, by server kind.
BASELINES = {"inmemory": "bench.inmemory_app:app", "plain": "bench.plain_app:app"}
# The CpuMeter group of each system's servers.
SERVERS = {"chat": "chat_servers", "inmemory": "inmemory", "plain": "plain_servers"}


class Server:
    """One server process on 127.0.0.1:<port>: `chat serve` (kind "chat"), or a baseline under
    uvicorn with the same uvicorn WebSocket implementation: the in-memory broadcast ("inmemory")
    or the plain durable server ("plain", bench/plain_app.py)."""

    def __init__(self, kind: str, log_dir: Path, *, database_url: str = "", ws: str, env: dict[str, str] | None = None):
        self.kind = kind
        self.port = free_port()
        self.log_path = log_dir / f"{kind}-{self.port}.log"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
        environment.update({"PYTHONUNBUFFERED": "1", **(env or {})})
        if kind == "chat":
            environment.update({"DATABASE_URL": database_url, "CHAT_WS": ws})
            args = ["-m", "chat", "serve", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        else:
            if kind == "plain":
                environment["DATABASE_URL"] = database_url
            chat = Settings(database_url=None)  # the baselines get the chat server's WebSocket settings
            args = [
                "-m", "uvicorn", BASELINES[kind], "--host", "127.0.0.1", "--port", str(self.port),
                "--ws", ws, "--ws-max-size", str(chat.frame_limit),
                "--ws-per-message-deflate", str(chat.ws_deflate).lower(),
            ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *args],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ws(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, float]:
        """(status, ms) of a GET on a fresh connection."""
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            status = conn.getresponse().status
        finally:
            conn.close()
        return status, (time.perf_counter() - t0) * 1000

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self.get("/readyz", timeout=1.0)[0] == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} server not ready in {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_servers(kind: str, count: int, log_dir: Path, **kwargs: Any) -> list[Server]:
    """Start `count` servers at once (their start-up overlaps), then wait for each."""
    servers = [Server(kind, log_dir, **kwargs) for _ in range(count)]
    try:
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


class CpuMeter:
    """CPU seconds used by groups of processes, for "what used the cores during this window".

    Postgres counts as its postmaster plus every backend: the live ones, and (through the
    postmaster's children_* times) the ones that already exited."""

    def __init__(self) -> None:
        self.groups: dict[str, list[int]] = {}
        self.postgres: int | None = None
        self._procs: dict[int, psutil.Process] = {}

    def _proc(self, pid: int) -> psutil.Process | None:
        proc = self._procs.get(pid)
        if proc is None:
            try:
                proc = self._procs[pid] = psutil.Process(pid)
            except psutil.Error:
                return None
        return proc

    def _seconds(self, pid: int) -> float:
        proc = self._proc(pid)
        if proc is None:
            return 0.0
        try:
            times = proc.cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    def snapshot(self) -> dict[str, float]:
        totals = {name: sum(self._seconds(pid) for pid in pids) for name, pids in self.groups.items()}
        if self.postgres is not None and (master := self._proc(self.postgres)) is not None:
            try:
                times = master.cpu_times()
                total = times.user + times.system + times.children_user + times.children_system
                for child in master.children():
                    with contextlib.suppress(psutil.Error):
                        ct = child.cpu_times()
                        total += ct.user + ct.system
                totals["postgres"] = float(total)
            except psutil.Error:
                pass
        totals["machine_idle"] = float(psutil.cpu_times().idle)
        totals["_wall"] = time.monotonic()
        return totals

    @staticmethod
    def usage(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """Percent of one core used by each group between two snapshots (200 = both cores of a
        2-core machine); `machine_busy` is the whole machine's, on the same scale."""
        wall = after["_wall"] - before["_wall"]
        if wall <= 0:
            return {}
        usage = {
            name: round(100 * (after[name] - before.get(name, 0.0)) / wall, 1)
            for name in after
            if not name.startswith("_") and name != "machine_idle"
        }
        cores = psutil.cpu_count() or 1
        idle = (after["machine_idle"] - before["machine_idle"]) / wall
        usage["machine_busy"] = round(100 * max(0.0, cores - idle), 1)
        ours = sum(v for k, v in usage.items() if k != "machine_busy")
        usage["others"] = round(max(0.0, usage["machine_busy"] - ours), 1)  # processes that are not ours
        return usage
