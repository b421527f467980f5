"""The scenarios, in the order they run: the machine's limits, history (it fills the 1M room
first, so every later scenario runs on a table that big), latency, the hot sender, throughput,
join, idle, many rooms on one socket."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import time
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from bench import history, limits, profiling
from bench.cluster import SERVERS, CpuMeter, Server, start_servers
from bench.run import Run, log
from bench.stats import describe, summary
from chat.config import Settings


def run_all(run: Run) -> None:
    run.scenario("limits", lambda: machine_limits(run))
    run.scenario("history", lambda: history_pages(run))
    run.scenario("latency", lambda: latency(run))
    run.scenario("livebatch", lambda: live_batch(run))
    run.scenario("cpusplit", lambda: cpu_split(run))
    run.scenario("plain", lambda: plain_server(run))
    run.scenario("hot", lambda: hot_sender(run))
    run.scenario("throughput", lambda: throughput(run))
    run.scenario("join", lambda: join_cost(run))
    run.scenario("idle", lambda: idle_connections(run))
    run.scenario("multiroom", lambda: many_rooms(run))
    run.scenario("fanout", lambda: _fanout(run))


def _fanout(run: Run) -> dict[str, Any]:
    from bench.fanout import fanout_engines  # it imports this module

    return fanout_engines(run)


# --- the machine's limits ------------------------------------------------------------------------


def machine_limits(run: Run) -> dict[str, Any]:
    knobs, dsn = run.knobs, run.db.dsn
    result: dict[str, Any] = {}
    before = run.meter.snapshot()
    result["notify"] = asyncio.run(limits.notify_latency(dsn, rate=knobs.notify_rate, seconds=knobs.limits_seconds))
    result["notify"]["cpu"] = CpuMeter.usage(before, run.meter.snapshot())
    for table in ("plain", "schema"):
        rows = []
        for writers in knobs.limits_writers:
            before = run.meter.snapshot()
            row = asyncio.run(
                limits.insert_notify(dsn, table=table, writers=writers, seconds=knobs.limits_seconds, rooms=knobs.rooms)
            )
            row["cpu"] = CpuMeter.usage(before, run.meter.snapshot())
            log(f"  INSERT+NOTIFY {table}, {writers} writer(s): {row['committed_per_s']:.0f}/s")
            rows.append(row)
        result[f"insert_notify_{table}"] = rows
    batched = []
    for per_statement in (1, *knobs.limits_batch_rows):
        before = run.meter.snapshot()
        row = asyncio.run(
            limits.insert_batched(
                dsn,
                writers=knobs.limits_batch_writers,
                rows=per_statement,
                seconds=knobs.limits_seconds,
                rooms=knobs.rooms,
            )
        )
        row["cpu"] = CpuMeter.usage(before, run.meter.snapshot())
        log(
            f"  INSERT into messages, {per_statement} row(s)/statement, {row['writers']} writers: "
            f"{row['committed_per_s']:.0f}/s"
        )
        batched.append(row)
    result["insert_batched"] = batched
    asyncio.run(run.db.checkpoint())  # measured as the load runs are: after a checkpoint
    result["single_commit"] = asyncio.run(
        limits.single_commit(dsn, rate=knobs.single_commit_rate, seconds=max(1.0, knobs.limits_seconds))
    )
    log(f"  a single commit: p50 {_f(result['single_commit']['commit_ms']['p50'])} ms")
    asyncio.run(limits.drop_raw_table(dsn))
    best = max(result["insert_notify_plain"], key=lambda r: r["committed_per_s"])
    result["raw_best"] = {"writers": best["writers"], "committed_per_s": best["committed_per_s"]}
    return result


# --- 1. end-to-end latency at fixed rates ------------------------------------------------------------


def latency(run: Run) -> list[dict[str, Any]]:
    knobs = run.knobs
    assert run.inmemory is not None
    rows = []
    for rate in knobs.rates:
        for system, servers in (("chat", run.chat), ("inmemory", [run.inmemory])):
            profile_to = None
            if knobs.profile and system == "chat" and rate == max(knobs.rates):
                profile_to = run.log_dir / f"profile-chat-{rate}.txt"
            rows.append(_latency_run(run, system, servers, rate, tag="lat", profile_to=profile_to))
    return rows


def _latency_run(
    run: Run,
    system: str,
    servers: list[Server],
    rate: int,
    *,
    tag: str,
    profile_to: Path | None = None,
    live_batch: bool = False,
) -> dict[str, Any]:
    """One run of the latency scenario's shape (rooms x members, every member sends), logged."""
    knobs = run.knobs
    row = run.load_run(
        system,
        servers,
        tag=f"{tag}{rate}-{system[:2]}",
        rate=rate,
        duration=knobs.duration,
        warmup=knobs.warmup,
        profile_to=profile_to,
        live_batch=live_batch,
    )
    lat = row["latency_ms"]
    log(
        f"  {system} (live={row['live']}) @ {rate}/s: p50 {_f(lat['p50'])} p99 {_f(lat['p99'])} ms, "
        f"{row['deliveries_per_s']:.0f} deliveries/s, lost {row['lost']}, "
        f"loadgen CPU {row['cpu'].get('loadgen')}%, checkpoints {row['checkpoints']}"
    )
    return row


def cpu_split(run: Run) -> dict[str, Any]:
    """The top latency rate with `split_members` members per room, against the latency run with
    `members`: the same messages, fewer deliveries. The difference in the servers' CPU is what
    deliveries cost, and the rest what each message costs besides them (report.cpu_split)."""
    knobs = run.knobs
    assert run.inmemory is not None
    rate = max(knobs.rates)
    rows = []
    for members in (knobs.split_members, knobs.members):
        for system, servers in (("chat", run.chat), ("inmemory", [run.inmemory])):
            row = run.load_run(
                system, servers, tag=f"split{members}-{system[:2]}", rate=rate, duration=knobs.duration,
                warmup=knobs.warmup, members=members,
            )  # fmt: skip
            busy = row["cpu"].get(SERVERS[system])
            log(
                f"  {system} @ {rate}/s, {members} members per room: {row['deliveries_per_s']:.0f} deliveries/s, "
                f"servers' CPU {busy}%, lost {row['lost']}"
            )
            rows.append(row)
    return {"rows": rows}


def plain_server(run: Run) -> dict[str, Any]:
    """The plain durable server (bench/plain_app.py) beside chat, in one run: what uvicorn,
    asyncpg and Postgres cost before our guarantees and features. The latency shape at the top
    rate with `split_members` and with `members` per room, on chat, the plain server and the
    in-memory baseline (CPU per stored message, per delivery, and the split of the two; chat's and
    the in-memory's are the CPU split's runs when that scenario ran), then sequential joins with
    a replay against each one's bare accept."""
    knobs = run.knobs
    assert run.inmemory is not None
    plain = start_servers("plain", knobs.processes, run.log_dir, database_url=run.db.dsn, ws=knobs.ws)
    run.meter.groups["plain_servers"] = [s.pid for s in plain]
    try:
        rate = max(knobs.rates)
        split = run.results.get("cpusplit")
        measured = (
            {(r["system"], r["members"]): r for r in split["rows"]}
            if isinstance(split, dict) and "rows" in split
            else {}
        )
        rows = []
        for members in (knobs.split_members, knobs.members):
            for system, servers in (("chat", run.chat), ("plain", plain), ("inmemory", [run.inmemory])):
                if (system, members) in measured:  # the CPU split's same run, a minute ago: not again
                    rows.append(measured[system, members])
                    continue
                row = run.load_run(
                    system, servers, tag=f"pl{members}-{system[:2]}", rate=rate, duration=knobs.duration,
                    warmup=knobs.warmup, members=members,
                )  # fmt: skip
                busy = row["cpu"].get(SERVERS[system])
                log(
                    f"  {system} @ {rate}/s, {members} members per room: p99 {_f(row['latency_ms']['p99'])} ms, "
                    f"{row['deliveries_per_s']:.0f} deliveries/s, servers' CPU {busy}%, lost {row['lost']}"
                )
                rows.append(row)
        joins = _plain_joins(run, plain)
    finally:
        run.meter.groups.pop("plain_servers", None)
        for server in plain:
            server.stop()
    return {"rows": rows, "joins": joins}


def _plain_joins(run: Run, plain: list[Server]) -> list[dict[str, Any]]:
    """Sequential joins of one room with `join_replay` messages (a member already on every
    process), timed to ready, and bare accepts, on chat and on the plain server, alternating."""
    knobs, gen = run.knobs, run.gen
    room = f"plain-replay-{run.id}"
    asyncio.run(_fill(run.db.dsn, room, knobs.join_replay))
    anchors = [(run.gid(), s.ws(f"/rooms/{room}/ws"), room, run.tokens[-1]) for s in (*run.chat, *plain)]
    opened = gen.call(0, "open", {"specs": anchors})
    if opened["failed"]:
        raise RuntimeError(f"could not open the room's resident members: {opened['failed']}")
    rows = []
    try:
        for key in ("bare", "replay"):
            for system, servers in (("chat", run.chat), ("plain", plain)):
                bare = key == "bare"
                path, joined, token = ("/ws", None, None) if bare else (f"/rooms/{room}/ws", room, run.tokens[0])
                warm = {"urls": [s.ws(path) for s in servers], "room": joined, "token": token, "n": 5}
                gen.call(0, "joins", warm)  # first joins warm caches and pools: not measured
                # Both systems' joins profiled alike, to tell the stack's share from ours.
                profile_to = run.log_dir / f"profile-plainjoin-{system}.txt" if knobs.profile and not bare else None
                spy = profiling.start(servers[0].pid, None, profile_to) if profile_to else None
                before = run.meter.snapshot()
                result = gen.call(0, "joins", {**warm, "n": knobs.join_samples})
                after = run.meter.snapshot()
                row = {"system": system, "key": key, **_joined(result, knobs.join_samples, before, after)}
                if (profile := profiling.collect(spy, profile_to, result["wall_s"] / len(servers))) is not None:
                    row["profile"] = profile
                log(f"  {system} {key}: p50 {_f(row['ready_ms']['p50'])} p99 {_f(row['ready_ms']['p99'])} ms")
                rows.append(row)
    finally:
        gen.call(0, "close", {"gids": [a[0] for a in anchors]})
    return rows


def live_batch(run: Run) -> dict[str, Any]:
    """Live batches (`?live=batch`, the page's), two ways. `rows`: the top latency rate again,
    every socket asking for them, against the latency scenario's in-memory run at that rate (run
    here only if that scenario was not). `burst`: one commit of `burst_messages` into a room of
    `burst_sockets` sockets on one process (as after a stall, or a bulk insert), the server's CPU
    to deliver it with each `live`, three times each, alternating."""
    knobs = run.knobs
    assert run.inmemory is not None
    rate = max(knobs.rates)
    measured = run.results.get("latency")
    has_base = isinstance(measured, list) and any(r["system"] == "inmemory" and r["rate"] == rate for r in measured)
    rows = [_latency_run(run, "chat", run.chat, rate, tag="lb", live_batch=True)]
    if not has_base:
        rows.append(_latency_run(run, "inmemory", [run.inmemory], rate, tag="lb"))
    burst = []
    for trial in range(3):
        for live in ("frames", "batch"):
            room = f"burst-{run.id}-{trial}-{live}"
            one = asyncio.run(_burst(run.chat[0], run.db.dsn, run.tokens[0], live=live, room=room, knobs=knobs))
            log(
                f"  burst of {one['messages']} to {one['sockets']} sockets, live={live}: server CPU "
                f"{one['cpu_ms']:.0f} ms ({one['us_per_delivery']} µs per delivery), "
                f"all read in {one['wall_ms']:.0f} ms"
            )
            burst.append(one)
    return {"rows": rows, "burst": burst}


async def _burst(server: Server, dsn: str, token: str, *, live: str, room: str, knobs: Any) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    messages, sockets = knobs.burst_messages, knobs.burst_sockets
    url = server.ws(f"/rooms/{room}/ws?live={live}&token={token}")
    clients = [await connect(url, max_size=None, compression=None) for _ in range(sockets)]
    conn = await asyncpg.connect(dsn)
    try:
        for ws in clients:
            while json.loads(await ws.recv())["type"] != "ready":
                pass
        room_id = await conn.fetchval("SELECT id FROM rooms WHERE name = $1", room)

        async def read(ws: Any) -> None:
            got = 0
            while got < messages:
                frame = json.loads(await ws.recv())
                if frame["type"] == "message":
                    got += 1
                elif frame["type"] == "messages":
                    got += len(frame["messages"])

        readers = [asyncio.create_task(read(ws)) for ws in clients]
        process = psutil.Process(server.pid)
        before, started = sum(process.cpu_times()[:2]), time.monotonic()
        await conn.execute(
            "INSERT INTO messages (room_id, author, body) SELECT $1, 'bench-burst', 'burst ' || g "
            "FROM generate_series(1, $2) AS g",
            room_id,
            messages,
        )
        await asyncio.wait_for(asyncio.gather(*readers), 300)
        cpu_s, wall = sum(process.cpu_times()[:2]) - before, time.monotonic() - started
    finally:
        await conn.close()
        for ws in clients:
            await ws.close()
    return {
        "live": live,
        "messages": messages,
        "sockets": sockets,
        "cpu_ms": round(cpu_s * 1000, 1),
        "us_per_delivery": round(cpu_s * 1e6 / (messages * sockets), 2),
        "wall_ms": round(wall * 1000, 1),
    }


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# --- 1b. one hot sender ---------------------------------------------------------------------------------


def hot_sender(run: Run) -> list[dict[str, Any]]:
    """One socket sends into one room of `hot_members` spread over the processes (member m on
    server m mod K); latency at the other members. The same against the in-memory baseline."""
    knobs = run.knobs
    assert run.inmemory is not None
    rows = []
    for rate in knobs.hot_rates:
        for system, servers in (("chat", run.chat), ("inmemory", [run.inmemory])):
            profile_to = None
            if knobs.profile and system == "chat" and rate == max(knobs.hot_rates):
                profile_to = run.log_dir / f"profile-hot-{rate}.txt"  # server 0 holds the sender
            row = run.load_run(
                system,
                servers,
                tag=f"hot{rate}-{system[:2]}",
                rate=rate,
                duration=knobs.duration,
                warmup=knobs.warmup,
                profile_to=profile_to,
                rooms=1,
                members=knobs.hot_members,
                senders_per_room=1,
            )
            lat = row["latency_ms"]
            log(
                f"  hot sender, {system} @ {rate}/s: p50 {_f(lat['p50'])} p99 {_f(lat['p99'])} ms, "
                f"ack p99 {_f(row['ack_ms']['p99'])} ms, lost {row['lost']}, checkpoints {row['checkpoints']}"
            )
            rows.append(row)
    return rows


# --- 2. maximum sustained durable throughput ------------------------------------------------------


def _step_passes(row: dict[str, Any], limit_ms: float) -> tuple[bool, str]:
    reasons = []
    if row["lost"]:
        reasons.append(f"lost {row['lost']}")
    p99 = row["latency_ms"]["p99"]
    if p99 is None or p99 > limit_ms:
        reasons.append(f"p99 {_f(p99)} ms > {limit_ms:.0f}")
    if row["committed_per_s"] < 0.95 * row["rate"]:
        reasons.append(f"committed {row['committed_per_s']:.0f}/s < 95% of offered")
    return not reasons, "; ".join(reasons)


def refine_rate(passed: float, failed: float) -> int | None:
    """The next rate to try between the best passing step and the lowest failing one: their
    geometric mean, or None once they are within 10% (as precise as a step's noise allows)."""
    if failed <= passed * 1.1:
        return None
    return round(math.sqrt(passed * failed))


def throughput(run: Run) -> dict[str, Any]:
    assert run.inmemory is not None
    return {
        system: _rising(run, system, servers) for system, servers in (("chat", run.chat), ("inmemory", [run.inmemory]))
    }


def _rising(run: Run, system: str, servers: list[Server]) -> dict[str, Any]:
    """One system's steps: rising by rate_factor until one fails, then refine_steps between the
    best pass and the lowest failure."""
    knobs = run.knobs
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    broke: dict[str, Any] | None = None  # the lowest failing step

    def step(rate: float, tag: str, refine: bool) -> dict[str, Any]:
        row = run.load_run(
            system, servers, tag=f"{tag}-{system[:2]}", rate=round(rate), duration=knobs.step_duration,
            warmup=knobs.step_warmup,
        )  # fmt: skip
        row["passed"], row["why"] = _step_passes(row, knobs.p99_limit_ms)
        row["refine"] = refine
        log(
            f"  {system} offered {round(rate)}/s{' (refining)' if refine else ''}: committed "
            f"{row['committed_per_s']:.0f}/s, {row['deliveries_per_s']:.0f} deliveries/s, "
            f"p99 {_f(row['latency_ms']['p99'])} ms, {'pass' if row['passed'] else 'FAIL: ' + row['why']}"
        )
        steps.append(row)
        return row

    rate = float(knobs.start_rate)
    for n in range(knobs.max_steps):
        row = step(rate, f"tp{n}", refine=False)
        if not row["passed"]:
            broke = row
            break
        best = row
        rate *= knobs.rate_factor
    for n in range(knobs.refine_steps):
        between = None if best is None or broke is None else refine_rate(best["rate"], broke["rate"])
        if between is None:
            break
        row = step(between, f"tpr{n}", refine=True)
        if row["passed"]:
            best = row
        else:
            broke = row
    return {
        "steps": steps,
        "max_sustained": None
        if best is None
        else {
            "offered": best["rate"],
            "committed_per_s": best["committed_per_s"],
            "deliveries_per_s": best["deliveries_per_s"],
            "p99_ms": best["latency_ms"]["p99"],
        },
        "broke_at": None if broke is None else {"offered": broke["rate"], "why": broke["why"]},
    }


# --- 3. join cost ------------------------------------------------------------------------------------


async def _fill(dsn: str, name: str, count: int) -> None:
    """A room with `count` messages, inserted the ordinary way (the triggers give seqs)."""
    conn = await asyncpg.connect(dsn)
    try:
        room_id = await conn.fetchval(
            "INSERT INTO rooms (name) VALUES ($1) ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
            name,
        )
        if count:
            await conn.execute(
                "INSERT INTO messages (room_id, author, body) "
                "SELECT $1, 'bench', 'replayed message ' || g FROM generate_series(1, $2::int) g",
                room_id,
                count,
            )
    finally:
        await conn.close()


def _joined(result: dict[str, Any], n: int, before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """A row of `n` timed joins (the load generator's `joins` result) and the CPU between two
    meter snapshots around them. The window may be longer than the joins (waits between them):
    CPU per join is the window's CPU over `n`, not its share over the joins' rate."""
    return {
        "n": n,
        "ready_ms": describe(result["ready_ms"]),
        "replayed": result["replayed"],
        "failed": result["failed"],
        "joins_per_s": round(n / result["wall_s"], 1) if result["wall_s"] else None,
        "cpu": CpuMeter.usage(before, after),
        "cpu_window_s": round(after["_wall"] - before["_wall"], 3),
    }


def join_cost(run: Run) -> dict[str, Any]:
    """Sequential joins, each timed from the TCP connect to the `ready` frame (for the bare
    accept: to the handshake), alternating between the server processes. The rooms of the main
    variants already have a member on every process, as a room being joined usually does; the
    "first" variant joins rooms that do not exist yet, so each join also makes its room (and its
    membership) and LISTENs to it. The main variants' joins are one user's, again and again, as a
    reconnect or a reload is: within the presence linger each finds the user online in the room
    already, and writes no presence.
    The "online" variant is a different member each time, not online anywhere: its presence is
    written (and let go once the linger is over, while the next joins go on)."""
    knobs, gen = run.knobs, run.gen
    replay_room = f"join-replay-{run.id}"
    empty_room = f"join-empty-{run.id}"
    asyncio.run(_fill(run.db.dsn, replay_room, knobs.join_replay))
    asyncio.run(_fill(run.db.dsn, empty_room, 0))
    token = run.tokens[0]
    anchors = [
        (run.gid(), server.ws(f"/rooms/{room}/ws"), room, run.tokens[-1])
        for room in (replay_room, empty_room)
        for server in run.chat
    ]
    opened = gen.call(0, "open", {"specs": anchors})
    if opened["failed"]:
        raise RuntimeError(f"could not open the rooms' resident members: {opened['failed']}")
    n, burst = knobs.join_samples, knobs.join_burst
    replayed = min(50, knobs.join_replay)
    comers = asyncio.run(run.db.make_tokens(n, prefix=f"joiner-{run.id}"))
    default_linger = Settings.model_fields["presence_linger_seconds"].default
    linger = float(knobs.server_env.get("CHAT_PRESENCE_LINGER_SECONDS", default_linger))
    variants: list[tuple[str, str, str, str | None, str | None, bool, int]] = [
        ("bare", "bare accept (/ws, no auth, no database)", "/ws", None, None, False, n),
        ("first", "join of a new room (the join makes it; adds its LISTEN)", "", "", token, False, n),
        ("empty", "join, room with members, no history", f"/rooms/{empty_room}/ws", empty_room, token, False, n),
        ("replay", f"join + replay of {replayed} messages (one user rejoining)", f"/rooms/{replay_room}/ws",
         replay_room, token, False, n),
        ("online", f"join + replay of {replayed} messages, a member coming online (presence written)",
         f"/rooms/{replay_room}/ws", replay_room, None, False, n),
        ("batch", f"join + replay of {replayed} messages, batch replay (room socket, replay=batch)",
         f"/rooms/{replay_room}/ws?replay=batch", replay_room, token, False, n),
        ("socket", f"join + replay of {replayed} messages on /socket (one subscribe)", "/socket", replay_room, token,
         False, n),
        ("burst", f"join + replay, {burst} at once", f"/rooms/{replay_room}/ws", replay_room, token, True, burst),
    ]  # fmt: skip
    rows = []
    try:
        for key, label, path, room, tok, concurrent, count in variants:
            if key == "first":  # a new room for every join
                result: dict[str, Any] = {
                    "ready_ms": [],
                    "handshake_ms": [],
                    "replayed": {},
                    "failed": {},
                    "wall_s": 0.0,
                }
                before = run.meter.snapshot()
                for i in range(count):
                    fresh = f"join-first-{run.id}-{i}"
                    one = gen.call(
                        0, "joins", {"urls": [run.chat[i % len(run.chat)].ws(f"/rooms/{fresh}/ws")], "room": fresh,
                                     "token": tok, "n": 1}
                    )  # fmt: skip
                    for k in ("ready_ms", "handshake_ms"):
                        result[k] += one[k]
                    result["wall_s"] += one["wall_s"]
                after = run.meter.snapshot()
            else:
                urls = [s.ws(path) for s in run.chat]
                warm: dict[str, Any] = {"urls": urls, "room": room, "token": tok, "n": 5}
                command = "socket_joins" if key == "socket" else "joins"
                if key == "online":  # each comer joins once (a member now), then is let go
                    warm = {**warm, "tokens": comers, "n": len(comers)}
                    gen.call(0, command, warm)
                    time.sleep(linger + 1.0)
                else:
                    gen.call(0, command, warm)  # first joins warm caches and pools: not measured
                profile_to = run.log_dir / f"profile-join-{key}.txt" if knobs.profile else None
                spy = profiling.start(run.chat[0].pid, None, profile_to) if profile_to else None
                before = run.meter.snapshot()
                args = {**warm, "n": count} if key == "socket" else {**warm, "n": count, "concurrent": concurrent}
                result = gen.call(0, command, args)
                if key == "online":  # the comers' presence let go after the linger is theirs too
                    time.sleep(linger + 1.0)
                after = run.meter.snapshot()
                if (profile := profiling.collect(spy, profile_to, result["wall_s"] / len(run.chat))) is not None:
                    result["profile"] = profile
            row = {
                "key": key,
                "variant": label,
                "concurrent": concurrent,
                **_joined(result, count, before, after),
                "handshake_ms": describe(result["handshake_ms"]),
            }
            if "profile" in result:
                row["profile"] = result["profile"]
            log(f"  {label}: p50 {_f(row['ready_ms']['p50'])} p99 {_f(row['ready_ms']['p99'])} ms")
            rows.append(row)
    finally:
        gen.call(0, "close", {"gids": [a[0] for a in anchors]})
    return {"variants": rows}


# --- 4. idle connections -----------------------------------------------------------------------------


def _idle_one(run: Run, system: str) -> dict[str, Any]:
    knobs, gen = run.knobs, run.gen
    workers = len(gen)
    fresh = knobs.idle_fresh_server
    if system == "chat":
        server = (
            Server("chat", run.log_dir, database_url=run.db.url, ws=knobs.ws, env=knobs.server_env)
            if fresh
            else run.chat[0]
        )
    else:
        server = Server("inmemory", run.log_dir, ws=knobs.ws) if fresh else run.inmemory  # type: ignore[assignment]
    meter = CpuMeter()
    meter.groups = {"server": [server.pid], "loadgen": gen.pids}
    meter.postgres = run.db.pid
    levels: list[dict[str, Any]] = []
    try:
        server.wait_ready()
        token = run.tokens[0]
        probe_room = f"idle-probe-{system[:2]}-{run.id}"
        gen.call(0, "probe", {"url": server.ws(f"/rooms/{probe_room}/ws"), "room": probe_room, "token": token, "n": 3})
        time.sleep(knobs.idle_settle / 3)
        rss0 = server.rss()
        opened = 0
        for level in knobs.idle_levels:
            specs: list[list[tuple[int, str, str, str]]] = [[] for _ in range(workers)]
            for i in range(opened, level):
                room = f"idle-{system[:2]}-{run.id}-{i // knobs.idle_room_size}"
                gid = run.gid()
                specs[i % workers].append(
                    (gid, server.ws(f"/rooms/{room}/ws"), room, run.tokens[gid % len(run.tokens)])
                )
            t0 = time.monotonic()
            before = meter.snapshot()
            results = gen.all("open", [{"specs": s, "concurrency": 16} for s in specs])
            open_cpu = CpuMeter.usage(before, meter.snapshot())
            open_seconds = time.monotonic() - t0
            failed: dict[str, int] = {}
            for r in results:
                for k, v in r["failed"].items():
                    failed[k] = failed.get(k, 0) + v
            opened = level
            time.sleep(knobs.idle_settle)  # settle: join events delivered, allocator quiet
            rss = server.rss()
            before = meter.snapshot()
            time.sleep(knobs.idle_settle)
            idle_cpu = CpuMeter.usage(before, meter.snapshot())
            health = [server.get("/healthz")[1] for _ in range(20)]
            probe = gen.call(
                0, "probe", {"url": server.ws(f"/rooms/{probe_room}/ws"), "room": probe_room, "token": token, "n": 20}
            )
            counts = gen.all("count", [{}] * workers)
            row = {
                "sockets": level,
                "open_failed": failed,
                "joins_per_s": round((level - (levels[-1]["sockets"] if levels else 0)) / open_seconds, 1),
                "open_cpu": open_cpu,
                "rss_mb": round(rss / 2**20, 1),
                "rss_baseline_mb": round(rss0 / 2**20, 1),
                "kb_per_socket": round((rss - rss0) / level / 1024, 1),
                "still_open": sum(c["open"] for c in counts),
                "closed": {k: v for c in counts for k, v in c["closed"].items()},
                "idle_cpu": idle_cpu,
                "healthz_ms": summary(health),
                "probe_join_ms": probe["join_ms"],
                "probe_rtt_ms": summary(probe["rtt_ms"]),
            }
            log(
                f"  {system}: {level} idle sockets, RSS {row['rss_mb']} MB, {row['kb_per_socket']} KB/socket, "
                f"healthz p50 {_f(row['healthz_ms']['p50'])} ms, message RTT p50 {_f(row['probe_rtt_ms']['p50'])} ms"
            )
            levels.append(row)
        gen.all("close", [{}] * workers)
        time.sleep(knobs.idle_settle)
        after_close = round(server.rss() / 2**20, 1)
        # A leak check: the same number of sockets again. Memory that is only kept by the
        # allocator gets reused; memory held by something that outlived its socket does not.
        reopened = None
        if levels:
            top = levels[-1]["sockets"]
            specs = [[] for _ in range(workers)]
            for i in range(top):
                room = f"idle2-{system[:2]}-{run.id}-{i // knobs.idle_room_size}"
                gid = run.gid()
                specs[i % workers].append(
                    (gid, server.ws(f"/rooms/{room}/ws"), room, run.tokens[gid % len(run.tokens)])
                )
            gen.all("open", [{"specs": s, "concurrency": 16} for s in specs])
            time.sleep(knobs.idle_settle)
            reopened = {"sockets": top, "rss_mb": round(server.rss() / 2**20, 1)}
            gen.all("close", [{}] * workers)
            time.sleep(knobs.idle_settle)
            reopened["rss_after_close_mb"] = round(server.rss() / 2**20, 1)
    finally:
        if fresh:
            server.stop()
    return {
        "system": system,
        "ws": knobs.ws,
        "room_size": knobs.idle_room_size,
        "levels": levels,
        "rss_after_close_mb": after_close,
        "reopened": reopened,
    }


def idle_connections(run: Run) -> dict[str, Any]:
    result = {"chat": _idle_one(run, "chat")}
    if run.knobs.idle_baseline:
        result["inmemory"] = _idle_one(run, "inmemory")
    return result


# --- 5. history of a 1,000,000-message room --------------------------------------------------------


def history_pages(run: Run) -> dict[str, Any]:
    knobs = run.knobs
    name = f"history-{knobs.history_rows}"
    log(f"  filling room {name} with {knobs.history_rows:,} messages")
    fill = asyncio.run(history.fill_room(run.db.dsn, name=name, rows=knobs.history_rows))
    head = knobs.history_rows
    result: dict[str, Any] = {"room": fill}
    result["sql"] = asyncio.run(
        history.measure_sql(run.db.url, room_id=fill["room_id"], head=head, samples=knobs.history_samples)
    )
    server = run.chat[0]
    url = server.ws(f"/rooms/{name}/ws")
    old = min(1001, head + 1)
    import random

    socket_pages = {
        "latest (history request)": [head + 1] * knobs.history_samples,
        "old (seq 951-1000)": [old] * knobs.history_samples,
        "random": [random.randint(51, head + 1) for _ in range(knobs.history_samples)],
    }
    result["socket"] = {}
    for label, befores in socket_pages.items():
        reply = run.gen.call(
            0, "history", {"url": url, "room": name, "token": run.tokens[0], "befores": befores, "limit": 50}
        )
        result["socket"][label] = {"rtt_ms": describe(reply["rtt_ms"]), "messages": reply["messages"]}
        log(f"  socket history {label}: p50 {_f(summary(reply['rtt_ms'])['p50'])} ms")
    result["socket"]["join replay (50)"] = {"join_ms": reply["join_ms"], "replayed": reply["replayed"]}
    if knobs.history_covering_index:
        result["covering"] = asyncio.run(history.add_covering_index(run.db.dsn, fill["room_id"]))
        result["covering"]["sql_pages"] = asyncio.run(
            history.measure_sql(run.db.url, room_id=fill["room_id"], head=head, samples=knobs.history_samples)
        )
        asyncio.run(history.drop_covering_index(run.db.dsn))
    return result


# --- 6. many rooms on one socket -------------------------------------------------------------------


def many_rooms(run: Run) -> dict[str, Any]:
    """A user in R rooms: one `/socket` subscribed to all of them, against R room sockets, and
    against one room on one `/socket`. Time to all-ready, one user at a time; then memory per
    user with U users of each kind open together on one fresh server process (each kind in its own
    R rooms, shared by its users, so room state is paid once and the per-user cost shows)."""
    knobs, gen = run.knobs, run.gen
    workers = len(gen)
    users, r = knobs.multiroom_users, knobs.multiroom_rooms
    fresh = knobs.idle_fresh_server
    server = (
        Server("chat", run.log_dir, database_url=run.db.url, ws=knobs.ws, env=knobs.server_env)
        if fresh
        else run.chat[0]
    )
    meter = CpuMeter()
    meter.groups = {"server": [server.pid], "loadgen": gen.pids}
    meter.postgres = run.db.pid
    socket_url = server.ws("/socket")

    def names(kind: str) -> list[str]:
        return [f"mr-{kind}-{run.id}-{i}" for i in range(r)]

    def token(gid: int) -> str:
        return run.tokens[gid % len(run.tokens)]

    result: dict[str, Any] = {"users": users, "rooms": r}
    try:
        server.wait_ready()
        # Memory first, on a process that has not freed any sockets yet: each kind added on top of
        # the previous ones (nothing closed in between, so the allocator cannot hand freed memory
        # back to the next kind and hide its cost). Each kind's rooms are opened by one resident
        # member before its snapshot, so room state (LISTEN, feed) is not charged to its users.
        memory: dict[str, Any] = {"rss_start_mb": round(server.rss() / 2**20, 1)}
        kinds = (
            ("one_room", "one /socket, 1 room"),
            ("socket", f"one /socket, {r} rooms"),
            ("sockets", f"{r} room sockets"),
        )
        for kind, label in kinds:
            rooms = names(kind)[:1] if kind == "one_room" else names(kind)
            resident = run.gid()
            gen.call(0, "subscribe", {"specs": [(resident, socket_url, token(resident), rooms)]})
            time.sleep(knobs.idle_settle)
            rss = server.rss()
            before_cpu = meter.snapshot()
            failed: dict[str, int] = {}
            opened = 0
            if kind == "sockets":
                specs_by_worker: list[list[tuple[int, str, str, str]]] = [[] for _ in range(workers)]
                for u in range(users):
                    tok = run.tokens[u % len(run.tokens)]
                    for room in rooms:
                        specs_by_worker[u % workers].append((run.gid(), server.ws(f"/rooms/{room}/ws"), room, tok))
                replies = gen.all("open", [{"specs": s, "concurrency": 16} for s in specs_by_worker])
                opened = sum(x["opened"] for x in replies) // max(1, len(rooms))
            else:
                subs: list[list[tuple[int, str, str, list[str]]]] = [[] for _ in range(workers)]
                for u in range(users):
                    gid = run.gid()
                    subs[u % workers].append((gid, socket_url, token(gid), rooms))
                replies = gen.all("subscribe", [{"specs": s, "concurrency": 16} for s in subs])
                opened = sum(x["opened"] for x in replies)
            for x in replies:
                for k, v in x["failed"].items():
                    failed[k] = failed.get(k, 0) + v
            cpu = CpuMeter.usage(before_cpu, meter.snapshot())
            time.sleep(knobs.idle_settle)
            now = server.rss()
            memory[kind] = {
                "label": label,
                "users": users,
                "rooms_per_user": len(rooms),
                "opened": opened,
                "failed": failed,
                "rss_mb": round(now / 2**20, 1),
                "kb_per_user": round((now - rss) / users / 1024, 1),
                "open_cpu": cpu,
            }
            log(f"  {users} users, {label}: {memory[kind]['kb_per_user']} KB per user, failed {failed or 0}")
        result["memory"] = memory
        gen.all("close", [{}] * workers)
        # Time to all-ready, one user at a time (every room already has a member elsewhere, as is usual).
        timing_rooms = names("t")
        anchor = run.gid()
        gen.call(0, "subscribe", {"specs": [(anchor, socket_url, token(anchor), timing_rooms)]})
        ready: dict[str, list[float]] = {"socket": [], "sockets": []}
        # A sample that did not get every room ready is not timed: it is counted, and shown.
        missed: dict[str, dict[str, int]] = {"socket": {}, "sockets": {}}
        for _ in range(knobs.multiroom_samples):
            gid = run.gid()
            one = gen.call(0, "subscribe", {"specs": [(gid, socket_url, token(gid), timing_rooms)]})
            ready["socket"] += one["ready_ms"]
            _tally(missed["socket"], one["failed"])
            gen.call(0, "close", {"gids": [gid]})
            specs = [(run.gid(), server.ws(f"/rooms/{room}/ws"), room, token(gid)) for room in timing_rooms]
            many = gen.call(0, "open", {"specs": specs, "concurrency": r})
            if many["opened"] == r:
                ready["sockets"].append(many["ready_ms"]["max"])
            else:
                _tally(missed["sockets"], many["failed"] or {"not all opened": 1})
            gen.call(0, "close", {"gids": [s[0] for s in specs]})
        result["ready_missed"] = missed
        # The sidebar's user has a token of its own: the shared bench users are members of every
        # room the other scenarios opened (thousands), and their lists would not end at these.
        (own,) = asyncio.run(run.db.make_tokens(1, prefix=f"sidebar-{run.id}"))
        member = run.gid()
        gen.call(0, "subscribe", {"specs": [(member, socket_url, own, timing_rooms)]})  # joins them
        gen.call(0, "close", {"gids": [member]})
        result["sidebar_ms"] = _sidebar(run, server, own, timing_rooms)
        gen.call(0, "close", {"gids": [anchor]})
        result["ready_ms"] = {k: describe(v) for k, v in ready.items()}
        log(
            f"  one user, {r} rooms: /socket ready p50 {_f(summary(ready['socket'])['p50'])} ms, "
            f"{r} room sockets p50 {_f(summary(ready['sockets'])['p50'])} ms"
        )
        log(
            f"  time to the sidebar, {r} rooms: p50 {_f(result['sidebar_ms']['total']['p50'])} ms "
            f"(the room list p50 {_f(result['sidebar_ms']['list']['p50'])} ms)"
        )
    finally:
        if fresh:
            server.stop()
    return result


def _tally(into: dict[str, int], failures: dict[str, int]) -> None:
    for reason, count in failures.items():
        into[reason] = into.get(reason, 0) + count


def _sidebar(run: Run, server: Server, token: str, rooms: list[str]) -> dict[str, Any]:
    """Time to the sidebar (issue 11), as the page does it for a user who is a member of `rooms`:
    GET /api/me/rooms, then ONE /socket subscribed to each of those rooms until every `ready`.
    One user at a time; the rooms have another member on the socket (the anchor) already."""
    wanted = set(rooms)
    listed: list[float] = []
    total: list[float] = []
    failed = 0
    for _ in range(run.knobs.multiroom_samples):
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.request("GET", "/api/me/rooms?limit=1000", headers={"Authorization": f"Bearer {token}"})
            answer = conn.getresponse()
            body = answer.read()
        finally:
            conn.close()
        got_list = time.perf_counter()
        mine = [x["name"] for x in json.loads(body) if x["name"] in wanted] if answer.status == 200 else []
        if len(mine) != len(rooms):  # the list did not show them all: no sidebar to time
            failed += 1
            continue
        gid = run.gid()
        one = run.gen.call(0, "subscribe", {"specs": [(gid, server.ws("/socket"), token, mine)]})
        done = time.perf_counter()
        run.gen.call(0, "close", {"gids": [gid]})
        if len(mine) == len(rooms) and one["opened"] == 1 and not one["failed"]:
            listed.append((got_list - started) * 1000)
            total.append((done - started) * 1000)
        else:
            failed += 1
    return {"rooms": len(rooms), "list": describe(listed), "total": describe(total), "failed": failed}
