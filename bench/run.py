"""One benchmark run's state (`Run`): the database, servers, load generator and results, and the
shared load run the latency, throughput and hot-sender scenarios use. The scenarios
(bench/scenarios.py) take a Run; the runner (bench/runner.py) makes one and calls them."""

from __future__ import annotations

import asyncio
import itertools
import os
import platform
import re
import sys
import time
import traceback
import uuid
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench import profiling
from bench.cluster import CpuMeter, Database, Server, start_servers
from bench.config import Knobs
from bench.loadgen import LoadGen
from bench.stats import describe


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def sleep_until(deadline_ns: int) -> None:
    delay = (deadline_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


class Run:
    """Everything one benchmark run holds: the database, servers, load generator, results."""

    def __init__(self, knobs: Knobs, work_dir: Path, log_dir: Path) -> None:
        self.knobs = knobs
        self.work_dir = work_dir
        self.log_dir = log_dir
        self.id = uuid.uuid4().hex[:6]
        self.db = Database(work_dir, url=knobs.database_url, fresh=knobs.database_url is not None)
        self.tokens: list[str] = []
        self.chat: list[Server] = []
        self.inmemory: Server | None = None
        self.loadgen: LoadGen | None = None
        self.meter = CpuMeter()
        self._gids = itertools.count(1)
        self.results: dict[str, Any] = {}

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        knobs = self.knobs
        log(
            "starting Postgres"
            + (" (embedded, durable: fsync and synchronous_commit on)" if not knobs.database_url else "")
        )
        self.db.start()
        self.meter.postgres = self.db.pid
        self.tokens = asyncio.run(self.db.make_tokens(knobs.tokens, prefix=f"bench-{self.id}"))
        log(
            f"starting {knobs.processes} chat server(s), the in-memory baseline and "
            f"{knobs.loadgen_processes} load generator(s)"
        )
        self.chat = start_servers(
            "chat", knobs.processes, self.log_dir, database_url=self.db.url, ws=knobs.ws, env=knobs.server_env
        )
        self.inmemory = start_servers("inmemory", 1, self.log_dir, ws=knobs.ws)[0]
        self.loadgen = LoadGen(knobs.loadgen_processes, deflate=knobs.deflate)
        self.meter.groups = {
            "loadgen": self.loadgen.pids,
            "chat_servers": [s.pid for s in self.chat],
            "inmemory": [self.inmemory.pid],
            "orchestrator": [os.getpid()],
        }
        self.results["meta"] = self.meta()

    def stop(self) -> None:
        if self.loadgen is not None:
            self.loadgen.stop()
        for server in [*self.chat, *([self.inmemory] if self.inmemory else [])]:
            server.stop()
        self.db.stop()
        kept = self.db.keep_log(self.log_dir)
        if kept is not None:
            self.results["postgres_log"] = pg_log_summary(kept)

    def meta(self) -> dict[str, Any]:
        versions = {}
        for package in ("fastapi", "uvicorn", "starlette", "websockets", "asyncpg", "sqlalchemy", "broadcaster"):
            try:
                from importlib.metadata import version

                versions[package] = version(package)
            except Exception:
                versions[package] = "?"
        knobs = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.knobs).items()}
        knobs.pop("database_url", None)
        return {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {
                "cores": psutil.cpu_count(),
                "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                "cpu": platform.processor() or platform.machine(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "postgres": asyncio.run(self.db.settings()) | {"embedded": self.db.embedded is not None},
            "versions": versions,
            "knobs": knobs,
            "server_env": {"CHAT_WS": self.knobs.ws, **self.knobs.server_env},
        }

    def gid(self) -> int:
        return next(self._gids)

    @property
    def gen(self) -> LoadGen:
        assert self.loadgen is not None
        return self.loadgen

    def scenario(self, name: str, body: Callable[[], Any]) -> None:
        if name not in self.knobs.scenarios:
            return
        log(f"scenario: {name}")
        started = time.monotonic()
        try:
            self.results[name] = body()
        except Exception as exc:
            log(f"scenario {name} failed: {exc!r}")
            self.results[name] = {"failed": f"{exc!r}", "traceback": traceback.format_exc()}
        log(f"scenario {name}: {time.monotonic() - started:.0f}s")

    def settle(self, limit: float = 60.0, quiet: float = 15.0) -> float:
        """Wait until our servers and Postgres are quiet (under `quiet` % of a core for 0.5 s):
        after an overloaded run they keep working off their backlog, which would steal the CPU
        of the next run. Returns the seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < limit:
            before = self.meter.snapshot()
            time.sleep(0.5)
            cpu = CpuMeter.usage(before, self.meter.snapshot())
            if all(cpu.get(k, 0.0) < quiet for k in ("chat_servers", "inmemory", "postgres")):
                break
        return round(time.monotonic() - started, 1)

    # --- the shared load run (scenarios 1 and 2) -------------------------------------------------------

    def load_run(
        self,
        system: str,
        servers: list[Server],
        *,
        tag: str,
        rate: float,
        duration: float,
        warmup: float,
        profile_to: Path | None = None,
        rooms: int | None = None,
        members: int | None = None,
        senders_per_room: int | None = None,
        live_batch: bool = False,
    ) -> dict[str, Any]:
        """`rooms` x `members` sockets spread over `servers` (member m on server m mod K) and over
        the load generator's processes; all of them send (or the first `senders_per_room` of each
        room), `rate` messages/s in all. Returns latency (send -> delivery at the other members),
        deliveries, loss and CPU."""
        knobs, gen = self.knobs, self.gen
        checkpoints_before = asyncio.run(self.db.checkpoint())  # start from a settled database
        workers = len(gen)
        n_rooms = knobs.rooms if rooms is None else rooms
        n_members = knobs.members if members is None else members
        speaking = n_members if senders_per_room is None else senders_per_room
        specs: list[list[tuple[int, str, str, str]]] = [[] for _ in range(workers)]
        senders: list[list[int]] = [[] for _ in range(workers)]
        names = [f"{tag}-{self.id}-{r}" for r in range(n_rooms)]
        for m in range(n_members):  # member-major: consecutive sends go to different rooms
            for r, room in enumerate(names):
                gid = self.gid()
                server = servers[m % len(servers)]
                token = self.tokens[gid % len(self.tokens)]
                w = (r * n_members + m) % workers
                query = "?live=batch" if live_batch else ""  # chat's live batches (the page's)
                specs[w].append((gid, server.ws(f"/rooms/{room}/ws{query}"), room, token))
                if m < speaking:
                    senders[w].append(gid)
        opened = gen.all("open", [{"specs": s} for s in specs])
        failed: Counter[str] = Counter()
        for o in opened:
            failed.update(o["failed"])
        total = sum(len(s) for s in specs)
        speakers = sum(len(s) for s in senders)
        start_at = time.monotonic_ns() + 300_000_000
        gen.send_all(
            "load",
            [
                {
                    "start_at": start_at,
                    "warmup": warmup,
                    "duration": duration,
                    "rate": rate * len(s) / speakers,
                    "senders": s,
                    "ack_timeout": knobs.drain_timeout,
                }
                for s in senders
            ],
        )
        measure_from = start_at + int(warmup * 1e9)
        measure_to = start_at + int(duration * 1e9)
        sleep_until(measure_from)
        spy = profiling.start(servers[0].pid, duration - warmup, profile_to) if profile_to else None
        before = self.meter.snapshot()
        sleep_until(measure_to)
        cpu = CpuMeter.usage(before, self.meter.snapshot())
        loads = gen.recv_all(timeout=duration + knobs.drain_timeout + 120)
        final = dict.fromkeys(names, 0)
        for load in loads:
            for room, seq in load["acked_seq"].items():
                final[room] = max(final.get(room, 0), seq)
        drains = gen.all("drain", [{"final": final, "timeout": knobs.drain_timeout}] * workers)
        gen.all("close", [{}] * workers)
        settled = self.settle()
        checkpoints_after = asyncio.run(self.db.checkpoints())
        latencies, acks = array("q"), array("q")
        for d in drains:
            latencies.frombytes(d["latencies_ns"])
            acks.frombytes(d["ack_latencies_ns"])
        window = duration - warmup
        timeline = [max(col) / 1e6 for col in zip(*(d["timeline_ns"] for d in drains), strict=True)]
        ack_timeline = [max(col) / 1e6 for col in zip(*(d["ack_timeline_ns"] for d in drains), strict=True)]
        sent = sum(x["sent"] for x in loads)
        acked = sum(x["acked"] for x in loads)
        errors: Counter[str] = Counter()
        closed: Counter[str] = Counter()
        for x in [*loads, *drains]:
            errors.update(x["errors"])
        for d in drains:
            closed.update({str(k): v for k, v in d["closed"].items()})
        result: dict[str, Any] = {
            "system": system,
            "live": "batch" if live_batch else "frames",
            "processes": len(servers),
            "rate": rate,
            "rooms": n_rooms,
            "members": n_members,
            "senders": speakers,
            "sockets": total,
            "open_failed": dict(failed),
            "duration_s": duration,
            "measured_s": window,
            "sent": sent,
            "sent_per_s": round(sent / duration, 1),
            "acked": acked,
            "committed_per_s": round(acked / duration, 1),
            "unacked": sent - acked,
            "errors": dict(errors),
            "expected_deliveries": sum(d["expected"] for d in drains),
            "received": sum(d["received"] for d in drains),
            "missing": sum(d["missing"] for d in drains),
            "duplicates": sum(d["duplicates"] for d in drains),
            "closed": dict(closed),
            "deliveries_per_s": round(sum(d["window_deliveries"] for d in drains) / window, 1),
            "latency_ms": describe([x / 1e6 for x in latencies]),
            "ack_ms": describe([x / 1e6 for x in acks]),
            "send_lag_ms": {
                "p99": max((x["lag_ms"]["p99"] or 0.0) for x in loads),
                "max": max((x["lag_ms"]["max"] or 0.0) for x in loads),
            },
            "cpu": cpu,
            "settle_s": settled,  # how long the servers kept busy after the run
            # Checkpoints Postgres started during the run (after the one made before it): each
            # can hold a commit on this disk, so a stall in the timeline may be one of them.
            "checkpoints": None
            if checkpoints_before is None or checkpoints_after is None
            else checkpoints_after - checkpoints_before,
            "timeline_step_ms": 100,
            "timeline_max_ms": [round(x, 2) for x in timeline],  # worst delivery latency per 100 ms of send time
            "ack_timeline_max_ms": [round(x, 2) for x in ack_timeline],  # worst send -> ack per 100 ms
        }
        if spy is not None and profile_to is not None:
            spy.wait(60)
            if profile_to.exists():
                result["profile"] = {"file": str(profile_to), **profiling.summarize(profile_to, duration - warmup)}
        lost = result["missing"] + result["unacked"] + sum(closed.values()) + sum(errors.values())
        result["lost"] = lost
        return result


_SLOW = re.compile(r"duration: (?P<ms>[\d.]+) ms\s+(?:statement|execute [^:]*): (?P<sql>.*)")


def pg_log_summary(path: Path) -> dict[str, Any]:
    """Slow statements (>= 50 ms) by kind, checkpoints and autovacuums seen by Postgres."""
    slow: Counter[str] = Counter()
    worst: dict[str, float] = {}
    checkpoints = autovacuums = 0
    for line in path.read_text(errors="replace").splitlines():
        found = _SLOW.search(line)
        if found:
            ms = float(found.group("ms"))
            statement = found.group("sql").strip().split()
            kind = statement[0].upper() if statement else "?"
            if "generate_series" in found.group("sql"):
                kind = "bulk load (the history room, or a join room's messages)"
                slow[kind] += 1
                worst[kind] = max(worst.get(kind, 0.0), ms)
                continue
            if kind in ("INSERT", "SELECT", "UPDATE", "DELETE", "WITH") and len(statement) > 2:
                kind = " ".join(statement[:3])[:60]
            slow[kind] += 1
            worst[kind] = max(worst.get(kind, 0.0), ms)
        elif "checkpoint complete" in line:
            checkpoints += 1
        elif "automatic vacuum" in line or "automatic analyze" in line:
            autovacuums += 1
    return {
        "file": str(path),
        "slow_statements": {k: {"count": n, "worst_ms": worst[k]} for k, n in slow.most_common(12)},
        "checkpoints": checkpoints,
        "autovacuum_runs": autovacuums,
    }
