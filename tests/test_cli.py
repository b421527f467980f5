"""The `chat` command: tokens, and the embedded Postgres's lifecycle under `chat serve`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import MakeToken, unique
from tests.roomclient import RoomClient
from tests.servers import Server, free_port, pids_serving
from tests.test_auth import refusal


def chat(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chat", *args], env=env, capture_output=True, text=True, timeout=60, check=True
    )


def answered(answer: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `chat` with `answer` typed at its prompt; may fail."""
    return subprocess.run(
        [sys.executable, "-m", "chat", *args], env=env, input=answer, capture_output=True, text=True, timeout=60
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_") and k != "DATABASE_URL"}
    env["CHAT_ENV_FILE"] = ""  # no developer's .env either
    env.update(extra)
    return env


async def test_token_create_list_revoke(server_a: Server, database_url: str) -> None:
    env = clean_env(DATABASE_URL=database_url)
    name = unique("cli")
    created = chat("token", "create", name, "--ttl", "2h", "--label", "laptop", env=env)
    raw = created.stdout.strip().splitlines()[-1]
    assert raw.startswith("chat_") and len(raw) >= 40  # 256 random bits, URL-safe
    async with await RoomClient.open(server_a.ws(f"/rooms/{unique('r')}/ws"), raw) as client:
        assert (await client.ready())["user"] == name

    listing = chat("token", "list", "--user", name, env=env).stdout
    assert name in listing and "laptop" in listing and "active" in listing
    assert raw not in listing and raw[5:15] not in listing  # never the value
    token_id = re.search(rf"^\s*(\d+)\s+{re.escape(name)}", listing, re.M)
    assert token_id
    assert "revoked 1" in chat("token", "revoke", token_id.group(1), env=env).stdout
    assert "revoked" in chat("token", "list", "--user", name, env=env).stdout
    assert await refusal(server_a.ws(f"/rooms/general/ws?token={raw}")) == (401, "token revoked")

    with pytest.raises(subprocess.CalledProcessError):
        chat("token", "create", name, "--ttl", "soon", env=env)


def postgres_pid(data_dir: Path) -> int:
    return int((data_dir / "pgdata" / "postmaster.pid").read_text().split("\n", 1)[0])


def gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


async def test_room_list_and_delete(server_a: Server, database_url: str, make_token: MakeToken) -> None:
    """Issue 14 item 9: rooms, who made them, and their deletion from the command line."""
    env = clean_env(DATABASE_URL=database_url)
    maker = unique("maker")
    room, kept = unique("doomed"), unique("kept")
    token = await make_token(maker)
    for name in (room, kept):
        async with await RoomClient.open(server_a.ws(f"/rooms/{name}/ws"), token) as client:
            await client.ready()
            await client.send("hello")
            await client.until("ack")
    listing = chat("room", "list", env=env).stdout
    line = next(line for line in listing.splitlines() if line.startswith(room))
    assert line.split()[1] == "1" and line.split()[-1] == maker  # last seq, creator

    refused = answered("n\n", "room", "delete", room, env=env)
    assert refused.returncode != 0 and "Aborted" in refused.stderr  # asks first; no means no
    assert room in chat("room", "list", env=env).stdout

    assert f"deleted 1 room(s): {room}" in chat("room", "delete", room, "--yes", env=env).stdout
    listing = chat("room", "list", env=env).stdout
    assert room not in listing and kept in listing
    async with httpx.AsyncClient(base_url=server_a.http, headers={"Authorization": f"Bearer {token}"}) as http:
        assert (await http.get(f"/api/rooms/{room}/messages")).status_code == 404  # messages gone too
        assert (await http.get(f"/api/rooms/{kept}/messages")).status_code == 200
    with pytest.raises(subprocess.CalledProcessError) as missing:
        chat("room", "delete", room, "--yes", env=env)
    assert f"no such room: {room}" in missing.value.stderr


class EmbeddedServe:
    """`chat serve` with no DATABASE_URL: the embedded Postgres in `data_dir`."""

    def __init__(self, data_dir: Path, log_dir: Path) -> None:
        self.port = free_port()
        self.log_path = log_dir / f"embedded-{self.port}.log"
        self.link_path = log_dir / f"embedded-{self.port}.link"  # stdout is no terminal: no link there
        env = clean_env(CHAT_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
        command = ["serve", "--port", str(self.port), "--link-file", str(self.link_path)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "chat", *command], env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError(self.log_path.read_text())

    def token(self) -> str:
        match = re.search(r"#token=(chat_[\w-]+)", self.link_path.read_text())
        assert match, self.link_path.read_text()
        return match.group(1)

    def ws(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"


async def test_embedded_serve_survives_kill_and_restart(tmp_root: Path) -> None:
    data_dir = tmp_root / unique("embedded")
    first = EmbeddedServe(data_dir, tmp_root)
    assert first.link_path.read_text().startswith(f"http://127.0.0.1:{first.port}/#token=chat_")
    assert first.link_path.stat().st_mode & 0o777 == 0o600
    assert "#token=" not in first.log_path.read_text() and first.token() not in first.log_path.read_text()
    room = f"/rooms/{unique('r')}/ws"
    async with await RoomClient.open(first.ws(room), first.token()) as client:
        await client.ready()
        await client.send("survives restarts")
        await client.until_seq(1)

    # kill -9 of `chat serve`: the kernel stops its Postgres (no server left running forever).
    pid = postgres_pid(data_dir)
    first.proc.kill()
    first.proc.wait()
    assert gone(pid), "postgres outlived its parent"

    # A pid file naming a live process that is not our server (as after a reboot) is no obstacle.
    (data_dir / "pgdata" / "postmaster.pid").write_text(f"{os.getpid()}\n{data_dir}\n")
    second = EmbeddedServe(data_dir, tmp_root)
    assert second.token() == first.token()  # the sign-in link survives restarts
    async with await RoomClient.open(second.ws(room), second.token()) as client:
        await client.ready()
        assert client.bodies() == ["survives restarts"]

    # SIGTERM: a clean stop, Postgres included.
    pid = postgres_pid(data_dir)
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(30) in (0, 128 + signal.SIGTERM)
    assert gone(pid)
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()


async def test_serve_with_workers_shares_rooms(database_url: str, tmp_root: Path) -> None:
    server = Server(database_url, tmp_root, workers=2)
    try:
        workers = psutil.Process(server.proc.pid).children(recursive=True)
        assert len([p for p in workers if "python" in p.name()]) >= 2
        room = unique("r")
        path = f"/rooms/{room}/ws"
        env = clean_env(DATABASE_URL=database_url)
        token = chat("token", "create", unique("w"), env=env).stdout.strip().splitlines()[-1]
        clients: list[RoomClient] = []
        # The kernel picks the worker for each connection: open sockets until both have some.
        while len(clients) < 6 or len(await pids_serving(database_url, room)) < 2:
            assert len(clients) < 30, "every socket landed on one worker"
            clients.append(await RoomClient.open(server.ws(path), token))
            await clients[-1].ready()
        assert await pids_serving(database_url, room) <= {w.pid for w in workers}
        await clients[0].send("to every worker")
        for client in clients:
            await client.until_seq(1)
            await client.close()
        # kill -9 of the supervisor: the workers notice and exit instead of serving alone.
        server.proc.kill()
        server.proc.wait()
        for worker in workers:
            assert gone(worker.pid), f"worker {worker.pid} outlived its supervisor"
    finally:
        server.stop()


async def test_embedded_postgres_crash_is_recovered(tmp_root: Path) -> None:
    """kill -9 of the embedded Postgres under `chat serve`: it is restarted with crash recovery,
    and nothing committed is lost."""
    data_dir = tmp_root / unique("crash")
    serve = EmbeddedServe(data_dir, tmp_root)
    room = f"/rooms/{unique('r')}/ws"
    try:
        async with await RoomClient.open(serve.ws(room), serve.token()) as client:
            await client.ready()
            for i in range(20):
                await client.send(f"m{i}")
            await client.until_seq(20)
        crashed = postgres_pid(data_dir)
        os.kill(crashed, signal.SIGKILL)
        assert gone(crashed)
        async with httpx.AsyncClient() as http, asyncio.timeout(30):
            while True:  # until a new Postgres serves and the app is ready again
                with contextlib.suppress(OSError, ValueError, httpx.HTTPError):
                    ready = (await http.get(f"http://127.0.0.1:{serve.port}/readyz")).status_code == 200
                    if ready and postgres_pid(data_dir) != crashed:
                        break
                await asyncio.sleep(0.1)
        async with await RoomClient.open(serve.ws(room), serve.token(), after=0) as client:
            await client.until_seq(20)
            assert client.bodies() == [f"m{i}" for i in range(20)]
            await client.send("after the crash")
            await client.until_seq(21)
        assert "restarting it" in serve.log_path.read_text()
    finally:
        serve.proc.send_signal(signal.SIGTERM)
        serve.proc.wait(30)


def test_data_folder_and_postgres_log_are_private(tmp_root: Path) -> None:
    """Issue 14 item 12: a folder made by an older version (0755, log 0644) is made private."""
    from chat.embedded import EmbeddedPostgres

    data_dir = tmp_root / unique("modes")
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    (data_dir / "postgres.log").write_text("")
    (data_dir / "postgres.log").chmod(0o644)
    pg = EmbeddedPostgres(data_dir, durable=False)
    pg.start()
    try:
        # Root runs postgres as another account, which must pass through (group x, nothing else).
        expected = 0o710 if os.geteuid() == 0 else 0o700
        assert data_dir.stat().st_mode & 0o777 == expected
        assert (data_dir / "postgres.log").stat().st_mode & 0o777 == 0o600
        assert (data_dir / "pgdata").stat().st_mode & 0o077 == 0
    finally:
        pg.stop()


def test_sign_in_link_is_printed_only_to_a_terminal(tmp_root: Path) -> None:
    """Issue 14 item 23: the link went to stdout, which journald or docker keep in their logs."""
    data_dir = tmp_root / unique("link")
    port = free_port()
    env = clean_env(CHAT_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
    log_path = tmp_root / f"link-{port}.log"
    with open(log_path, "wb") as log:  # a file, as under systemd or docker: no link
        proc = subprocess.Popen([sys.executable, "-m", "chat", "serve", "--port", str(port)], env=env, stdout=log)
    try:
        deadline = time.monotonic() + 60
        while "chat is running" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(30)
    assert "sign-in link not shown" in log_path.read_text()
    assert "#token=" not in log_path.read_text() and "chat_" not in log_path.read_text()

    controller, terminal = pty.openpty()  # a terminal: the link is shown
    proc = subprocess.Popen(
        [sys.executable, "-m", "chat", "serve", "--port", str(free_port())], env=env, stdout=terminal, stderr=terminal
    )
    os.close(terminal)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"#token=chat_" not in seen:
            assert proc.poll() is None and time.monotonic() < deadline, seen
            if select.select([controller], [], [], 0.5)[0]:
                seen += os.read(controller, 4096)
    finally:
        proc.terminate()
        proc.wait(30)
        os.close(controller)


async def test_room_create_invite_remove(server_a: Server, database_url: str, make_token: MakeToken) -> None:
    """Issue 11: private rooms and their members from the command line; a removal ends the
    member's socket at once."""
    env = clean_env(DATABASE_URL=database_url)
    owner, member = unique("boss"), unique("staff")
    await make_token(owner)
    token = await make_token(member)
    room = unique("board")
    assert "created private room" in chat("room", "create", room, "--owner", owner, "--private", env=env).stdout
    line = next(line for line in chat("room", "list", env=env).stdout.splitlines() if line.startswith(room))
    assert line.split()[1:4] == ["0", "private", "1"] and line.split()[-1] == owner
    with pytest.raises(RoomClient.refused()):
        await RoomClient.open(server_a.ws(f"/rooms/{room}/ws"), token)
    assert f"{member}: added" in chat("room", "invite", room, member, env=env).stdout
    async with await RoomClient.open(server_a.ws(f"/rooms/{room}/ws"), token) as client:
        await client.ready()
        assert f"{member}: removed" in chat("room", "remove", room, member, env=env).stdout
        assert await client.wait_closed() == 4003
    assert [(m["kind"], m["body"]) for m in client.frames if m["type"] == "message"] == [
        ("notice", f"{member} was added by an administrator")
    ]
    with pytest.raises(subprocess.CalledProcessError) as missing:
        chat("room", "invite", room, unique("ghost"), env=env)
    assert "no such user" in missing.value.stderr
