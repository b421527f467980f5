"""Where an idle socket's memory goes: the server under tracemalloc, N idle sockets, a diff.

    python -m bench.memprobe [--sockets 2000] [--app chat|inmemory] [--no-deflate] [--ws wsproto]
    python -m bench.memprobe --sockets 1000 --frames 12 --group traceback   # who allocated it
    python -m bench.memprobe --sockets 100 --socket-rooms 50                # /socket, 50 rooms each

It starts a Postgres (embedded, or --database-url), then the app in a child process with
tracemalloc on (`python -m bench.memprobe serve ...`, same uvicorn settings as `chat serve`),
opens the sockets from a load generator process, and prints the RSS growth per socket beside
the Python allocations per socket (tracemalloc sees the interpreter's allocators, zlib's
included; not libuv's or the kernel's socket buffers), grouped by source line.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import click
import psutil


@click.group(invoke_without_command=True)
@click.option("--sockets", default=2000, show_default=True)
@click.option("--room-size", default=20, show_default=True)
@click.option("--app", "app_kind", type=click.Choice(["chat", "inmemory"]), default="chat", show_default=True)
@click.option("--ws", default="websockets-sansio", show_default=True)
@click.option("--deflate/--no-deflate", default=True, show_default=True, help="Client offers permessage-deflate.")
@click.option("--top", default=25, show_default=True)
@click.option("--database-url", default=None)
@click.option("--frames", default=1, show_default=True, help="tracemalloc frames kept per allocation.")
@click.option("--group", type=click.Choice(["lineno", "traceback"]), default="lineno", show_default=True)
@click.option(
    "--socket-rooms",
    default=0,
    show_default=True,
    help="Open /socket clients subscribed to this many rooms each (0: room sockets).",
)
@click.pass_context
def main(
    ctx: click.Context,
    sockets: int,
    room_size: int,
    app_kind: str,
    ws: str,
    deflate: bool,
    top: int,
    database_url: str | None,
    frames: int,
    group: str,
    socket_rooms: int,
) -> None:
    """Measure where the memory of idle sockets goes."""
    if ctx.invoked_subcommand is not None:
        return
    from bench.cluster import Database, free_port
    from bench.config import SERVER_ENV
    from bench.loadgen import LoadGen

    work = Path(tempfile.mkdtemp(prefix="chat-memprobe-", dir="/tmp"))
    os.chmod(work, 0o755)
    db = Database(work, url=database_url, fresh=database_url is not None)
    db.start()
    tokens = asyncio.run(db.make_tokens(20, prefix="memprobe"))
    port = free_port()
    snapshots = work / "snap"
    env = {**os.environ, **SERVER_ENV, "DATABASE_URL": db.url, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "bench.memprobe", "serve", "--app", app_kind, "--port", str(port)]
    cmd += ["--ws", ws, "--out", str(snapshots), "--frames", str(frames)]
    import subprocess

    with open(work / "server.log", "wb") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    gen = LoadGen(2, deflate=deflate)
    try:
        import http.client

        deadline = time.monotonic() + 300  # start-up under tracemalloc with many frames is slow
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        url = f"ws://127.0.0.1:{port}"
        gen.call(0, "probe", {"url": f"{url}/rooms/warm/ws", "room": "warm", "token": tokens[0], "n": 3})
        time.sleep(1)
        proc = psutil.Process(server.pid)

        def snapshot(name: str) -> tracemalloc.Snapshot:
            server.send_signal(signal.SIGUSR1)
            path = snapshots.with_suffix(f".{name}")
            for _ in range(600):
                if path.exists() and path.with_suffix(path.suffix + ".done").exists():
                    break
                time.sleep(0.1)
            return tracemalloc.Snapshot.load(str(path))

        base = snapshot("0")
        rss0 = proc.memory_info().rss
        if socket_rooms:
            # Every user in the same rooms: room state is paid once, what shows is per socket.
            rooms = [f"multi-{r}" for r in range(socket_rooms)]
            multi: list[list[tuple[int, str, str, list[str]]]] = [[], []]
            for i in range(sockets):
                multi[i % 2].append((i + 1, f"{url}/socket", tokens[i % len(tokens)], rooms))
            opened = gen.all("subscribe", [{"specs": s, "concurrency": 16} for s in multi])
        else:
            specs: list[list[tuple[int, str, str, str]]] = [[], []]
            for i in range(sockets):
                room = f"idle-{i // room_size}"
                specs[i % 2].append((i + 1, f"{url}/rooms/{room}/ws", room, tokens[i % len(tokens)]))
            opened = gen.all("open", [{"specs": s, "concurrency": 16} for s in specs])
        time.sleep(3)
        after = snapshot("1")
        rss1 = proc.memory_info().rss
        stats = after.compare_to(base, group)
        traced = sum(s.size_diff for s in stats)
        ok = sum(o["opened"] for o in opened)
        what = (
            f"/socket clients ({socket_rooms} rooms each)" if socket_rooms else f"idle sockets ({room_size} per room)"
        )
        click.echo(f"{app_kind}, --ws {ws}, permessage-deflate {'on' if deflate else 'off'}: {ok} {what}")
        click.echo(
            f"RSS growth: {(rss1 - rss0) / ok / 1024:.1f} KB/socket; "
            f"Python allocations {traced / ok / 1024:.1f} KB/socket"
        )
        click.echo(f"snapshots: {snapshots}.0 (before), {snapshots}.1 (with the sockets)")
        click.echo(f"top {top} {'tracebacks' if group == 'traceback' else 'source lines'} by growth, bytes per socket:")
        for stat in stats[:top]:
            # Most recent first: the allocating line, its three callers, and the app's own frame.
            frames_ = list(reversed(stat.traceback)) if group == "traceback" else list(stat.traceback)[:1]
            shown = frames_[:4] + [f for f in frames_[4:] if "/chat/" in f.filename][:1]
            where = [f"{_short(f.filename)}:{f.lineno}" for f in shown]
            click.echo(f"{stat.size_diff / ok:10.0f}  {stat.count_diff / ok:6.1f} blocks  {where[0]}")
            for line in where[1:]:
                click.echo(f"{'':29}< {line}")
    finally:
        gen.stop()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        db.stop()


def _short(name: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", f"{Path.cwd()}/"):
        if marker in name:
            return name.split(marker, 1)[1]
    return name


@main.command()
@click.option("--app", "app_kind", type=click.Choice(["chat", "inmemory"]), required=True)
@click.option("--port", type=int, required=True)
@click.option("--ws", required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--frames", default=1)
def serve(app_kind: str, port: int, ws: str, out: Path, frames: int) -> None:
    """(internal) The app under tracemalloc; SIGUSR1 writes a snapshot."""
    import uvicorn

    from chat.config import Settings

    tracemalloc.start(frames)
    taken = [0]

    def dump(_signum: int, _frame: object) -> None:
        path = out.with_suffix(f".{taken[0]}")
        taken[0] += 1
        tracemalloc.take_snapshot().dump(str(path))
        path.with_suffix(path.suffix + ".done").touch()

    signal.signal(signal.SIGUSR1, dump)
    if app_kind == "chat":
        uvicorn.run(
            "chat.app:create_app",
            factory=True,
            host="127.0.0.1",
            port=port,
            ws=ws,
            ws_max_size=Settings().frame_limit,
            log_level="warning",
        )
    else:
        uvicorn.run("bench.inmemory_app:app", host="127.0.0.1", port=port, ws=ws, log_level="warning")


if __name__ == "__main__":
    main()
