"""Scenario 6, fan-out engines: the same rising load (scenario 2's steps) against 1, 2 and 4
chat server processes, with fan-out through Postgres NOTIFY and through Redis, side by side in
one run. Each configuration gets fresh server processes; Redis is Debian's redis-server on a free
loopback port, without persistence (the chat stores nothing in it)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.cluster import _die_with_parent, free_port, start_servers
from bench.limits import _prepare
from bench.run import Run, log
from bench.scenarios import _f, _step_passes

ENGINES = ("notify", "redis")


class RedisProcess:
    def __init__(self, log_dir: Path) -> None:
        binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        with open(log_dir / "redis.log", "ab") as log_file:
            self.proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


async def insert_ceiling(dsn: str, *, mode: str, writers: int, seconds: float, rooms: int) -> dict[str, Any]:
    """W writers looping the app's own INSERT (one statement, autocommit) for `seconds`, marked
    'room' (NOTIFY fan-out: the commit carries a NOTIFY, with a listener on every room) or 'off'
    (Redis fan-out: no NOTIFY). The write ceiling with and without NOTIFY on the commit."""
    room_ids, user_id = await _prepare(dsn, rooms)
    listener = await asyncpg.connect(dsn)
    conns = [await asyncpg.connect(dsn) for _ in range(writers)]
    heard = 0

    def on_notify(*_args: Any) -> None:
        nonlocal heard
        heard += 1

    if mode == "room":
        for room_id in room_ids:
            await listener.add_listener(f"room_{room_id}", on_notify)
    sql = (
        "INSERT INTO messages (room_id, author_id, author, body) SELECT $1, $2, 'bench-ceiling', $3"
        " WHERE set_config('chat.notify', $4, true) = $4 RETURNING seq"
    )
    count = 0
    deadline = time.monotonic() + seconds

    async def writer(w: int) -> None:
        nonlocal count
        room_id = room_ids[w % len(room_ids)]
        while time.monotonic() < deadline:
            await conns[w].fetchval(sql, room_id, user_id, f"ceiling {w} {count}", mode)
            count += 1

    start = time.monotonic()
    try:
        await asyncio.gather(*(writer(w) for w in range(writers)))
        elapsed = time.monotonic() - start
    finally:
        for conn in conns:
            await conn.close()
        await listener.close()
    return {"mode": mode, "writers": writers, "committed_per_s": round(count / elapsed, 1), "notified": heard}


def fanout_engines(run: Run) -> dict[str, Any]:
    knobs = run.knobs
    result: dict[str, Any] = {"processes": list(knobs.fanout_processes), "configs": [], "ceiling": []}
    for writers in knobs.limits_writers:
        for mode in ("room", "off"):
            row = asyncio.run(
                insert_ceiling(run.db.dsn, mode=mode, writers=writers, seconds=knobs.limits_seconds, rooms=knobs.rooms)
            )
            log(f"  INSERT {'with' if mode == 'room' else 'without'} NOTIFY, {writers} writer(s): "
                f"{row['committed_per_s']:.0f}/s")  # fmt: skip
            result["ceiling"].append(row)
    redis = RedisProcess(run.log_dir)
    groups = dict(run.meter.groups)
    try:
        for processes in knobs.fanout_processes:
            for engine in ENGINES:
                env = dict(knobs.server_env)
                if engine == "redis":
                    env["CHAT_FANOUT_URL"] = redis.url
                servers = start_servers("chat", processes, run.log_dir, database_url=run.db.url, ws=knobs.ws, env=env)
                run.meter.groups = {**groups, "chat_servers": [s.pid for s in servers], "redis": [redis.proc.pid]}
                steps: list[dict[str, Any]] = []
                best: dict[str, Any] | None = None
                rate = float(knobs.start_rate)
                try:
                    for step in range(knobs.max_steps):
                        row = run.load_run(
                            "chat",
                            servers,
                            tag=f"fo{processes}{engine[0]}{step}",
                            rate=round(rate),
                            duration=knobs.step_duration,
                            warmup=knobs.step_warmup,
                        )
                        row["passed"], row["why"] = _step_passes(row, knobs.p99_limit_ms)
                        log(
                            f"  {engine} x{processes} @ {round(rate)}/s: committed {row['committed_per_s']:.0f}/s, "
                            f"p99 {_f(row['latency_ms']['p99'])} ms, lost {row['lost']}"
                            + ("" if row["passed"] else f" -- {row['why']}")
                        )
                        steps.append(row)
                        if not row["passed"]:
                            break
                        best = row
                        rate *= knobs.rate_factor
                finally:
                    for server in servers:
                        server.stop()
                    run.meter.groups = groups
                result["configs"].append(
                    {
                        "engine": engine,
                        "processes": processes,
                        "steps": steps,
                        "max_sustained": None if best is None else best["committed_per_s"],
                        "p99_at_max": None if best is None else best["latency_ms"]["p99"],
                    }
                )
    finally:
        redis.stop()
    return result


def report(result: dict[str, Any], p99_limit: Any) -> list[str]:
    """The Markdown section: the best passing step per configuration, then every step."""
    lines = [
        "### 7. Fan-out engines: NOTIFY and Redis, 1, 2 and 4 processes (rising load; a step fails on loss, "
        f"p99 > {p99_limit} ms, or committing < 95% of the offered rate)",
        "",
        "| processes | engine | max sustained msg/s | deliveries/s there | p99 ms there |",
        "|---|---|---|---|---|",
    ]
    for config in result["configs"]:
        passed = [s for s in config["steps"] if s["passed"]]
        best = passed[-1] if passed else None
        lines.append(
            f"| {config['processes']} | {config['engine']} | {_f(config['max_sustained'])} | "
            f"{_f(best['deliveries_per_s']) if best else '-'} | {_f(config['p99_at_max'])} |"
        )
    lines += [
        "",
        "| processes | engine | offered msg/s | committed msg/s | p99 ms | lost | "
        "CPU servers / postgres / redis / loadgen / machine | step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for config in result["configs"]:
        for s in config["steps"]:
            cpu = s["cpu"]
            lines.append(
                f"| {config['processes']} | {config['engine']} | {s['rate']} | {_f(s['committed_per_s'])} | "
                f"{_f(s['latency_ms']['p99'])} | {s['lost']} | "
                + " / ".join(_f(cpu.get(k)) for k in ("chat_servers", "postgres", "redis", "loadgen", "machine_busy"))
                + f" | {'pass' if s['passed'] else 'fail: ' + s['why']} |"
            )
    lines.append("")
    if result.get("ceiling"):
        lines += [
            "The app's INSERT alone (no server), W writers, one autocommit statement each: with NOTIFY on the "
            "commit (NOTIFY fan-out, a listener on every room) and without (Redis fan-out).",
            "",
            "| writers | with NOTIFY msg/s | without NOTIFY msg/s |",
            "|---|---|---|",
        ]
        by = {(r["writers"], r["mode"]): r["committed_per_s"] for r in result["ceiling"]}
        for writers in sorted({r["writers"] for r in result["ceiling"]}):
            lines.append(f"| {writers} | {_f(by.get((writers, 'room')))} | {_f(by.get((writers, 'off')))} |")
        lines.append("")
    return lines
