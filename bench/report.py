"""The targets, and the Markdown report (printed, and written to bench-results/latest.md)."""

from __future__ import annotations

import statistics
from typing import Any

from bench.cluster import SERVERS
from bench.stats import ratio, sum_quantile


def _n(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _with_ratio(value: float | None, base: float | None) -> str:
    r = ratio(value, base)
    return _n(value) if r is None else f"{_n(value)} ({r:.2f}x)"


def _ok(result: Any) -> bool:
    return isinstance(result, (dict, list)) and not (isinstance(result, dict) and "failed" in result)


# Hot sender p99 targets by rate (msg/s -> ms), issue 10.
HOT_P99_MS = {500: 15.0, 1000: 50.0}


def _pairs(rows: Any) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    if not isinstance(rows, list):
        return []
    pairs = []
    for row in rows:
        if row["system"] == "chat":
            base = next((r for r in rows if r["system"] == "inmemory" and r["rate"] == row["rate"]), None)
            pairs.append((row, base))
    return pairs


def cpu_cost(row: dict[str, Any]) -> dict[str, float | None]:
    """Server CPU over a load run's measured window, per stored message and per delivery, in µs.
    The servers' whole CPU is divided each way (storing and fanning out are not told apart)."""
    busy = row["cpu"].get(SERVERS[row["system"]])  # % of one core: CPU seconds per second x 100
    if busy is None:
        return {"per_stored_us": None, "per_delivery_us": None}
    cpu_s = busy / 100.0
    stored = _messages_per_s(row)
    return {
        "per_stored_us": round(1e6 * cpu_s / stored, 1) if stored else None,
        "per_delivery_us": round(1e6 * cpu_s / row["deliveries_per_s"], 1) if row["deliveries_per_s"] else None,
    }


def _messages_per_s(row: dict[str, Any]) -> float:
    """Messages a load run's servers took per second: stored (chat, plain), or broadcast (in-memory)."""
    if row["system"] != "inmemory":
        return float(row["committed_per_s"])
    return float(row["deliveries_per_s"] / max(1, row["members"]))


def cpu_split(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per system, from two load runs at one rate with different members per room (the same
    messages, more or fewer deliveries): the servers' CPU per delivery (the difference in CPU over
    the difference in deliveries) and per message besides its deliveries (what is left), in µs."""
    out = []
    for system in SERVERS:
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["members"])
        if len(mine) < 2:
            continue
        low, high = mine[0], mine[-1]
        busy = SERVERS[system]
        cpu_low, cpu_high = low["cpu"].get(busy), high["cpu"].get(busy)
        extra = high["deliveries_per_s"] - low["deliveries_per_s"]
        messages = _messages_per_s(high)
        if cpu_low is None or cpu_high is None or extra <= 0 or not messages:
            continue
        per_delivery = (cpu_high - cpu_low) * 1e4 / extra  # % of a core x 1e4 = µs of CPU per second
        per_message = (cpu_high * 1e4 - per_delivery * high["deliveries_per_s"]) / messages
        out.append(
            {
                "system": system,
                "rate": high["rate"],
                "members": [low["members"], high["members"]],
                "cpu": [cpu_low, cpu_high],
                "deliveries_per_s": [low["deliveries_per_s"], high["deliveries_per_s"]],
                "per_delivery_us": round(per_delivery, 2),
                "per_message_us": round(per_message, 1),
            }
        )
    return out


def _split_lines(found: Any) -> list[str]:
    rows = found.get("rows") if isinstance(found, dict) else None
    split = cpu_split(rows) if rows else []
    if not split:
        return []
    rate, (few, many) = split[0]["rate"], split[0]["members"]
    lines = [
        f"### CPU split: {rate:,} msg/s with {few} and with {many} members per room",
        "",
        "The same messages with fewer deliveries: the difference in the servers' CPU over the difference in "
        "deliveries is what a delivery costs; what is left, divided by the messages, is what a message costs "
        "besides its deliveries (chat: receiving and checking the send, the writer's statement, the ack, and "
        "the NOTIFY read and dispatched in every process).",
        "",
        "| system | servers' CPU % (fewer / more members) | deliveries/s "
        "| µs per delivery | µs per message besides deliveries |",
        "|---|---|---|---|---|",
    ]
    for row in split:
        lines.append(
            _row(
                row["system"], _pair(_n(row["cpu"][0]), _n(row["cpu"][1])),
                _pair(_n(row["deliveries_per_s"][0], 0), _n(row["deliveries_per_s"][1], 0)),
                _n(row["per_delivery_us"], 2), _n(row["per_message_us"]),
            )
        )  # fmt: skip
    lines.append("")
    return lines


def _plain_lines(found: Any) -> list[str]:
    """Chat beside the plain durable server (bench/plain_app.py), both measured in one run."""
    if not _ok(found):
        return []
    rows, joins = found.get("rows", []), found.get("joins", [])
    loads = {(r["system"], r["members"]): r for r in rows}
    members = max((r["members"] for r in rows), default=None)
    lines = [
        "### The plain durable server: what the stack costs",
        "",
        "bench/plain_app.py does chat's hot path as plainly as uvicorn, asyncpg and Postgres allow: the token "
        "checked in the database before the accept, a replay of the last 50 messages, every send stored by one "
        "writer per process (one multi-row INSERT per batch, same table and triggers) and acked after its "
        "commit, fan-out by NOTIFY to every process. It has none of our guarantees or features (no presence, "
        "limits, idempotency, bounded queues, catch-up or resync).",
        "",
        "| measure | chat | plain | chat / plain | in-memory |",
        "|---|---|---|---|---|",
    ]
    chat, plain, memory = (loads.get((system, members)) for system in ("chat", "plain", "inmemory"))
    if chat and plain:
        lines.append(
            _row(
                f"p99 ms at {_n(chat['rate'])} msg/s, {members} members per room (lost)",
                f"{_n(chat['latency_ms']['p99'])} ({chat['lost']})",
                f"{_n(plain['latency_ms']['p99'])} ({plain['lost']})",
                _x(ratio(chat["latency_ms"]["p99"], plain["latency_ms"]["p99"])),
                "-" if memory is None else f"{_n(memory['latency_ms']['p99'])} ({memory['lost']})",
            )
        )
        costs = [None if row is None else cpu_cost(row) for row in (chat, plain, memory)]
        for label, key in (("µs per stored message", "per_stored_us"), ("µs per delivery", "per_delivery_us")):
            a, b, c = (None if cost is None else cost[key] for cost in costs)
            lines.append(_row(f"servers' CPU, {label}", _n(a), _n(b), _x(ratio(a, b)), _n(c)))
    split = {s["system"]: s for s in cpu_split(rows)}
    if "chat" in split and "plain" in split:
        for label, key in (("a delivery", "per_delivery_us"), ("a message besides its deliveries", "per_message_us")):
            a, b = split["chat"][key], split["plain"][key]
            c = split["inmemory"][key] if "inmemory" in split else None
            lines.append(_row(f"split: µs per {label}", _n(a, 2), _n(b, 2), _x(ratio(a, b)), _n(c, 2)))
    got = {(j["system"], j["key"]): j for j in joins}
    for key, label in (("bare", "bare accept"), ("replay", "join + replay")):
        a, b = got.get(("chat", key)), got.get(("plain", key))
        if a and b:
            lines.append(
                _row(
                    f"{label}, p50 / p99 ms", _pair(_n(a["ready_ms"]["p50"], 2), _n(a["ready_ms"]["p99"], 2)),
                    _pair(_n(b["ready_ms"]["p50"], 2), _n(b["ready_ms"]["p99"], 2)),
                    _x(ratio(a["ready_ms"]["p99"], b["ready_ms"]["p99"])), "",
                )
            )  # fmt: skip
    over = [_join_over_bare(got, system) for system in ("chat", "plain")]
    if None not in over:
        lines.append(_row("join + replay p99 over the bare accept's (target: 3x)", _x(over[0]), _x(over[1]), "", ""))
    a, b = got.get(("chat", "replay")), got.get(("plain", "replay"))
    if a and b:
        mine_ms, theirs_ms = join_cpu_ms(a, "chat"), join_cpu_ms(b, "plain")
        lines.append(
            _row(
                "servers' CPU per join + replay, ms",
                _n(mine_ms, 2),
                _n(theirs_ms, 2),
                _x(ratio(mine_ms, theirs_ms)),
                "",
            )
        )
    lines.append("")
    return lines


def _join_over_bare(got: dict[tuple[str, str], dict[str, Any]], system: str) -> float | None:
    bare, joined = got.get((system, "bare")), got.get((system, "replay"))
    return None if bare is None or joined is None else ratio(joined["ready_ms"]["p99"], bare["ready_ms"]["p99"])


def join_cpu_ms(variant: dict[str, Any], system: str = "chat") -> float | None:
    """The servers' CPU per join of a join variant, ms: their CPU over the metered window,
    divided by its joins. (Runs before `cpu_window_s` was recorded: the CPU share over the joins'
    rate, which undercounts a variant whose window also waits between or after its joins.)"""
    busy, n, window = variant.get("cpu", {}).get(SERVERS[system]), variant.get("n"), variant.get("cpu_window_s")
    if busy is None:
        return None
    if n and window:
        return round(10.0 * float(busy) * float(window) / int(n), 2)  # % / 100 x seconds / joins x 1000
    rate = variant.get("joins_per_s")
    return round(10.0 * busy / rate, 2) if rate else None  # % / 100 / rate x 1000


def _latency_pairs(results: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    rows = results.get("latency")
    if not isinstance(rows, list):
        return []
    pairs = []
    for row in rows:
        if row["system"] == "chat":
            base = next((r for r in rows if r["system"] == "inmemory" and r["rate"] == row["rate"]), None)
            pairs.append((row, base))
    return pairs


def ack_floor(rows: list[dict[str, Any]], rate: int, single: dict[str, Any]) -> float | None:
    """The p99 that an ack sent after a commit cannot beat on this machine: the in-memory
    broadcast's own send -> ack (a socket round trip through uvicorn, no database) plus one lone
    fsync'd commit, taken as independent, both from the same run."""
    base = next((r for r in rows if r["system"] == "inmemory" and r["rate"] == rate), None)
    if base is None or not base["ack_ms"].get("sketch") or not single["commit_ms"].get("sketch"):
        return None
    return sum_quantile(base["ack_ms"]["sketch"], single["commit_ms"]["sketch"], 0.99)


def live_batch_pair(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """The live=batch run and the in-memory run at its rate (its own, or the latency scenario's)."""
    found = results.get("livebatch")
    rows = found.get("rows") if isinstance(found, dict) else None
    if not isinstance(rows, list):
        return None
    chat = next((r for r in rows if r["system"] == "chat"), None)
    if chat is None:
        return None
    latency = results.get("latency")
    candidates = [*rows, *(latency if isinstance(latency, list) else [])]
    base = next((r for r in candidates if r["system"] == "inmemory" and r["rate"] == chat["rate"]), None)
    return chat, base


def _live_batch_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    pair = live_batch_pair(results)
    if pair is None:
        return []
    chat, base = pair
    out = _cpu_targets(chat, base, ", live=batch")
    if base is not None:
        p99, base_p99 = chat["latency_ms"]["p99"], base["latency_ms"]["p99"]
        r = ratio(p99, base_p99)
        out.append(
            _target(
                f"e2e p99 @ {chat['rate']:,} msg/s, live=batch vs in-memory",
                f"{_n(p99)} vs {_n(base_p99)} ms, lost {chat['lost']}",
                r,
                "<= 2x",
                None if r is None else r <= 2.0 and chat["lost"] == 0,
            )
        )
    return out


def _burst_lines(found: Any) -> list[str]:
    """The live=batch burst: medians of the trials of each `live`."""
    burst = found.get("burst") if isinstance(found, dict) else None
    if not burst:
        return []
    first = burst[0]
    lines = [
        f"### Live batches: one commit of {first['messages']:,} messages to {first['sockets']} sockets of one process",
        "",
        "The server's CPU to deliver it (medians of the trials), with one `message` frame per message "
        "(`live=frames`) and with `?live=batch` (the page's): the messages that one commit stored "
        "reach a socket in `messages` frames of up to 64 KiB.",
        "",
        "| live | trials | server CPU ms | µs per delivery | all read in ms |",
        "|---|---|---|---|---|",
    ]
    for live in ("frames", "batch"):
        mine = [b for b in burst if b["live"] == live]
        if mine:
            lines.append(
                _row(
                    live, len(mine), _n(statistics.median(b["cpu_ms"] for b in mine), 0),
                    _n(statistics.median(b["us_per_delivery"] for b in mine), 2),
                    _n(statistics.median(b["wall_ms"] for b in mine), 0),
                )
            )  # fmt: skip
    return [*lines, ""]


def _cpu_targets(chat: dict[str, Any], base: dict[str, Any] | None, label: str = "") -> list[dict[str, Any]]:
    """CPU per stored message, and (with the in-memory run at the same rate) per delivery."""
    rate, cost = chat["rate"], cpu_cost(chat)
    stored = cost["per_stored_us"]
    out = [
        _target(
            f"server CPU per stored message @ {rate:,} msg/s{label}",
            f"{_n(None if stored is None else stored / 1000, 3)} ms",
            None if stored is None else stored / 1000,
            "<= 0.25 ms",
            None if stored is None else stored <= 250.0,
        )
    ]
    if base is not None:
        mine, theirs = cost["per_delivery_us"], cpu_cost(base)["per_delivery_us"]
        r = ratio(mine, theirs)
        out.append(
            _target(
                f"server CPU per delivery @ {rate:,} msg/s{label} vs in-memory",
                f"{_n(mine)} vs {_n(theirs)} µs",
                r,
                "<= 2x",
                None if r is None else r <= 2.0,
            )
        )
    return out


def _target(name: str, measured: str, value: float | None, required: str, met: bool | None) -> dict[str, Any]:
    return {"target": name, "measured": measured, "value": value, "required": required, "met": met}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for chat, base in _latency_pairs(results):
        if base is None:
            continue
        r = ratio(chat["latency_ms"]["p99"], base["latency_ms"]["p99"])
        out.append(
            _target(
                f"e2e p99 @ {chat['rate']:,} msg/s vs in-memory",
                f"{_n(chat['latency_ms']['p99'])} vs {_n(base['latency_ms']['p99'])} ms",
                r,
                "<= 2x",
                None if r is None else r <= 2.0,
            )
        )
    for chat, base in _latency_pairs(results):
        if base is None:
            continue
        r = ratio(chat["deliveries_per_s"], base["deliveries_per_s"])
        out.append(
            _target(
                f"deliveries/s @ {chat['rate']:,} msg/s vs in-memory",
                f"{_n(chat['deliveries_per_s'])} vs {_n(base['deliveries_per_s'])}",
                r,
                ">= 0.8x",
                None if r is None else r >= 0.8,
            )
        )
    tput, lim = results.get("throughput"), results.get("limits")
    if _ok(tput) and _ok(lim):
        assert isinstance(tput, dict) and isinstance(lim, dict)
        best = tput["chat"]["max_sustained"]
        raw = lim["raw_best"]["committed_per_s"]
        value = best["committed_per_s"] if best else 0.0
        r = ratio(value, raw)
        out.append(
            _target(
                "sustained durable msg/s vs raw INSERT+NOTIFY loop",
                f"{_n(value)} vs {_n(raw)} msg/s ({lim['raw_best']['writers']} writers)",
                r,
                ">= 0.7x",
                None if r is None else r >= 0.7,
            )
        )
    if _ok(tput):
        assert isinstance(tput, dict)
        chat_best, mem_best = tput["chat"]["max_sustained"], tput.get("inmemory", {}).get("max_sustained")
        if mem_best:
            value = chat_best["deliveries_per_s"] if chat_best else 0.0
            r = ratio(value, mem_best["deliveries_per_s"])
            out.append(
                _target(
                    "max sustained deliveries/s vs in-memory",
                    f"{_n(value)} vs {_n(mem_best['deliveries_per_s'])}",
                    r,
                    ">= 0.8x",
                    None if r is None else r >= 0.8,
                )
            )
    idle = results.get("idle")
    join = results.get("join")
    if _ok(join):
        assert isinstance(join, dict)
        keyed = {v.get("key"): v for v in join["variants"]}
        bare = keyed["bare"]["ready_ms"]["p99"]
        # The room socket (a frame per replayed message, the default), the room socket with its
        # documented batch replay (replay=batch), and /socket (the page's: a batch frame).
        for key, label in (
            ("replay", "join (room socket, a frame per message)"),
            ("online", "join of a member coming online (room socket, presence written)"),
            ("batch", "join (room socket, replay=batch)"),
            ("socket", "join on /socket"),
        ):
            if key not in keyed:  # runs from before that variant
                continue
            replay = keyed[key]["ready_ms"]["p99"]
            r = ratio(replay, bare)
            out.append(
                _target(
                    f"{label} + 50-message replay p99 vs bare accept p99",
                    f"{_n(replay)} vs {_n(bare)} ms",
                    r,
                    "<= 3x",
                    None if r is None else r <= 3.0,
                )
            )
    hist = results.get("history")
    if _ok(hist):
        assert isinstance(hist, dict)
        worst_sql = max((p["roundtrip_ms"]["p99"] or 0.0) for p in hist["sql"].values())
        worst_socket = max((p["rtt_ms"]["p99"] or 0.0) for p in hist["socket"].values() if "rtt_ms" in p)
        worst = max(worst_sql, worst_socket)
        out.append(
            _target(
                f"history page p99, {hist['room']['rows']:,}-message room",
                f"SQL {_n(worst_sql, 2)} ms, socket {_n(worst_socket, 2)} ms",
                worst,
                "< 10 ms",
                worst < 10.0,
            )
        )
        plans = {p["node"] for p in hist["sql"].values()}
        index_only = all(p["index_only"] for p in hist["sql"].values())
        out.append(
            _target("history page plan is index-only", "; ".join(sorted(plans)), None, "Index Only Scan", index_only)
        )
    for chat, _base in _pairs(results.get("hot")):
        limit = HOT_P99_MS.get(int(chat["rate"]))
        p99 = chat["latency_ms"]["p99"]
        out.append(
            _target(
                f"hot sender @ {chat['rate']:,} msg/s (1 socket, room of {chat['members']}): e2e p99, lost",
                f"{_n(p99)} ms, lost {chat['lost']}",
                p99,
                f"<= {_n(limit)} ms, 0 lost" if limit else "0 lost",
                None if p99 is None else (limit is None or p99 <= limit) and chat["lost"] == 0,
            )
        )
    if _ok(tput) and _ok(lim) and isinstance(lim, dict) and isinstance(tput, dict):
        one_row = next((b for b in lim.get("insert_batched", []) if b["rows_per_statement"] == 1), None)
        if one_row is not None:
            best = tput["chat"]["max_sustained"]
            value = best["committed_per_s"] if best else 0.0
            r = ratio(value, one_row["committed_per_s"])
            out.append(
                _target(
                    f"sustained durable msg/s vs INSERT with triggers, 1 row/statement, {one_row['writers']} writers",
                    f"{_n(value)} vs {_n(one_row['committed_per_s'])} msg/s",
                    r,
                    ">= 2x",
                    None if r is None else r >= 2.0,
                )
            )
    rows = results.get("latency")
    if isinstance(rows, list) and rows:
        top = max(r["rate"] for r in rows)
        top_chat = next((r for r in rows if r["system"] == "chat" and r["rate"] == top), None)
        top_base = next((r for r in rows if r["system"] == "inmemory" and r["rate"] == top), None)
        if top_chat is not None:
            out += _cpu_targets(top_chat, top_base)
        low = min(r["rate"] for r in rows)
        chat_low = next((r for r in rows if r["system"] == "chat" and r["rate"] == low), None)
        single = lim.get("single_commit") if isinstance(lim, dict) and _ok(lim) else None
        if chat_low is not None and single:
            ack, commit = chat_low["ack_ms"]["p99"], single["commit_ms"]["p99"]
            r = ratio(ack, commit)
            floor = ack_floor(rows, low, single)
            out.append(
                _target(
                    f"send -> ack p99 @ {low:,} msg/s vs a single fsync'd commit p99",
                    f"{_n(ack, 2)} vs {_n(commit, 2)} ms"
                    + ("" if floor is None else f" (floor: in-memory ack + one commit, {_n(floor, 2)} ms)"),
                    r,
                    "<= 2x",
                    None if r is None else r <= 2.0,
                )
            )
    out += _live_batch_targets(results)
    if _ok(idle) and isinstance(idle, dict) and idle.get("inmemory"):
        base_levels = {lv["sockets"]: lv for lv in idle["inmemory"]["levels"]}
        for level in idle["chat"]["levels"]:
            other = base_levels.get(level["sockets"])
            if other is None:
                continue
            r = ratio(level["kb_per_socket"], other["kb_per_socket"])
            out.append(
                _target(
                    f"idle memory per socket vs in-memory, {level['sockets']:,} sockets",
                    f"{_n(level['kb_per_socket'])} vs {_n(other['kb_per_socket'])} KB",
                    r,
                    "<= 1.15x",
                    None if r is None else r <= 1.15,
                )
            )
    multi = results.get("multiroom")
    if _ok(multi) and isinstance(multi, dict):
        mem = multi["memory"]
        r = ratio(mem["socket"]["kb_per_user"], mem["one_room"]["kb_per_user"])
        out.append(
            _target(
                f"{multi['rooms']} rooms on one socket vs 1 room on one socket, memory per user",
                f"{_n(mem['socket']['kb_per_user'])} vs {_n(mem['one_room']['kb_per_user'])} KB",
                r,
                "<= 2x",
                None if r is None else r <= 2.0,
            )
        )
    return out


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _pair(a: object, b: object) -> str:
    return f"{a} / {b}"


def _cpu(cpu: dict[str, Any], *keys: str) -> str:
    return " / ".join(_n(cpu.get(k), 0) for k in keys)


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    knobs = meta.get("knobs", {})
    pg = meta.get("postgres", {})
    lines: list[str] = ["## Benchmark results", ""]
    machine = meta.get("machine", {})
    lines.append(
        f"{meta.get('started', '?')}, {machine.get('cores', '?')} cores, {machine.get('memory_gb', '?')} GB, "
        f"Python {machine.get('python', '?')}; PostgreSQL {pg.get('server_version', '?')}"
        f"{' (embedded)' if pg.get('embedded') else ''} with fsync={pg.get('fsync', '?')}, "
        f"synchronous_commit={pg.get('synchronous_commit', '?')} (durable); "
        f"{knobs.get('processes', '?')} chat server processes, "
        f"{knobs.get('loadgen_processes', '?')} load generator processes, uvicorn --ws {knobs.get('ws', '?')}, "
        f"clients {'offer' if knobs.get('deflate') else 'do not offer'} permessage-deflate "
        "(servers accept it only with CHAT_WS_DEFLATE, off by default); "
        f"{knobs.get('rooms', '?')} rooms x {knobs.get('members', '?')} members; "
        f"run took {meta.get('seconds', '?')} s. "
        "All processes share the same cores: CPU columns are % of one core (200 = the whole 2-core machine); "
        "`not ours` is what other processes on the machine used meanwhile."
    )
    lines.append("")

    goals = results.get("targets") or []
    if goals:
        lines += ["### Targets", "", "| target | measured | ratio / value | required | |", "|---|---|---|---|---|"]
        for t in goals:
            mark = "met" if t["met"] else ("**missed**" if t["met"] is False else "-")
            value = t["value"]
            shown = _x(value) if t["required"].endswith("x") else _n(value, 2)
            lines.append(f"| {t['target']} | {t['measured']} | {shown} | {t['required']} | {mark} |")
        lines.append("")

    lim = results.get("limits")
    floor = None
    if _ok(lim):
        assert isinstance(lim, dict)
        notify = lim["notify"]
        floor = notify["latency_ms"]["p50"]
        lines += [
            "### Machine limits (bare asyncpg on the same database, no web stack)",
            "",
            _row(
                "loop", "writers", "committed/s", "commit p50 / p99 ms", "NOTIFY -> listener p50 / p99 ms",
                "CPU postgres / machine",
            ),
            "|---|---|---|---|---|---|",
            _row(
                f"bare `pg_notify` at {_n(notify['rate'])}/s (max {_n(notify['max_rate_1_conn'])}/s on 1 connection)",
                1, "-", "-",
                _pair(_n(notify["latency_ms"]["p50"], 2), _n(notify["latency_ms"]["p99"], 2)),
                _cpu(notify["cpu"], "postgres", "machine_busy"),
            ),
        ]  # fmt: skip
        for table, label in (
            ("plain", "INSERT + NOTIFY, bare table"),
            ("schema", "INSERT into `messages` (seq + NOTIFY triggers), 1 round trip, as the server sends it"),
        ):
            for row in lim.get(f"insert_notify_{table}", []):
                lines.append(
                    f"| {label} | {row['writers']} | {_n(row['committed_per_s'])} | "
                    f"{_n(row['commit_ms']['p50'], 2)} / {_n(row['commit_ms']['p99'], 2)} | "
                    f"{_n(row['notify_ms']['p50'], 2)} / {_n(row['notify_ms']['p99'], 2)} | "
                    f"{_cpu(row['cpu'], 'postgres', 'machine_busy')} |"
                )
        for row in lim.get("insert_batched", []):
            per = row["rows_per_statement"]
            lines.append(
                f"| INSERT into `messages` (triggers), {per} row{'s' if per > 1 else ''} per statement "
                f"(`unnest`, {_n(row['statements_per_s'])} statements/s) | {row['writers']} | "
                f"{_n(row['committed_per_s'])} | "
                f"{_n(row['commit_ms']['p50'], 2)} / {_n(row['commit_ms']['p99'], 2)} | - | "
                f"{_cpu(row['cpu'], 'postgres', 'machine_busy')} |"
            )
        single = lim.get("single_commit")
        if single:
            lines.append(
                f"| a single commit: 1 row into `messages`, {_n(single['rate'])} a second, nothing else committing "
                f"| 1 | - | {_n(single['commit_ms']['p50'], 2)} / {_n(single['commit_ms']['p99'], 2)} | - | - |"
            )
        lines.append("")

    pairs = _latency_pairs(results)
    if pairs:
        lines += [
            "### 1. End-to-end latency (send -> delivery at every other member), ms",
            "",
            "Chat rows show the ratio to the in-memory single-process baseline at the same rate; "
            "`vs NOTIFY` is chat p50 over the bare NOTIFY -> LISTEN p50.",
            "",
            "| msg/s | system | p50 | p90 | p99 | max | deliveries/s | lost | send->ack p50 | vs NOTIFY | "
            "CPU loadgen / servers / postgres / not ours / machine | loadgen lag p99 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for chat, base in pairs:
            for row in (chat, base):
                if row is None:
                    continue
                lat, other = row["latency_ms"], (base["latency_ms"] if row is chat and base else None)
                cell = {k: _with_ratio(lat[k], other[k]) if other else _n(lat[k]) for k in ("p50", "p90", "p99", "max")}
                deliveries = (
                    _with_ratio(row["deliveries_per_s"], base["deliveries_per_s"])
                    if row is chat and base
                    else _n(row["deliveries_per_s"])
                )
                servers = "chat_servers" if row["system"] == "chat" else "inmemory"
                label = f"chat ({row['processes']} proc)" if row["system"] == "chat" else "in-memory (1 proc)"
                vs_notify = _x(ratio(lat["p50"], floor)) if row["system"] == "chat" else "-"
                lines.append(
                    _row(
                        _n(row["rate"]), label, cell["p50"], cell["p90"], cell["p99"], cell["max"], deliveries,
                        row["lost"], _n(row["ack_ms"]["p50"]), vs_notify,
                        _cpu(row["cpu"], "loadgen", servers, "postgres", "others", "machine_busy"),
                        _n(row["send_lag_ms"]["p99"]),
                    )
                )  # fmt: skip
        lines.append("")

    hot = _pairs(results.get("hot"))
    if hot:
        lines += [
            "### 1b. One hot sender (one socket sends into one room; latency at every other member), ms",
            "",
            "| msg/s | system | members | p50 | p90 | p99 | max | send->ack p50 / p99 | lost | "
            "CPU loadgen / servers / postgres / not ours / machine | loadgen lag p99 |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for chat, base in hot:
            for row in (chat, base):
                if row is None:
                    continue
                lat, other = row["latency_ms"], (base["latency_ms"] if row is chat and base else None)
                cell = {k: _with_ratio(lat[k], other[k]) if other else _n(lat[k]) for k in ("p50", "p90", "p99", "max")}
                servers = "chat_servers" if row["system"] == "chat" else "inmemory"
                label = f"chat ({row['processes']} proc)" if row["system"] == "chat" else "in-memory (1 proc)"
                acks = _pair(_n(row["ack_ms"]["p50"]), _n(row["ack_ms"]["p99"])) if row["system"] == "chat" else "-"
                lines.append(
                    _row(
                        _n(row["rate"]), label, row["members"], cell["p50"], cell["p90"], cell["p99"], cell["max"],
                        acks, row["lost"], _cpu(row["cpu"], "loadgen", servers, "postgres", "others", "machine_busy"),
                        _n(row["send_lag_ms"]["p99"]),
                    )
                )  # fmt: skip
        lines.append("")

    batched = live_batch_pair(results)
    costed = [*_latency_pairs(results), *([batched] if batched else []), *hot]
    if costed:
        lines += [
            "### CPU per stored message and per delivery (server processes' CPU over the measured window)",
            "",
            "All of the servers' CPU is divided by the messages stored, and again by the deliveries "
            "(each member's copy, the sender's own included): the two are not told apart.",
            "",
            "| run | msg/s | chat CPU % | chat µs per stored message | chat µs per delivery | "
            "in-memory µs per delivery | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for chat, base in costed:
            mine = cpu_cost(chat)
            theirs = cpu_cost(base) if base else {"per_delivery_us": None}
            kind = "hot sender" if chat.get("senders") == 1 and chat.get("rooms") == 1 else "latency"
            if chat.get("live") == "batch":
                kind += ", live=batch"
            lines.append(
                _row(
                    kind, _n(chat["rate"]), _n(chat["cpu"].get("chat_servers"), 0), _n(mine["per_stored_us"]),
                    _n(mine["per_delivery_us"]), _n(theirs["per_delivery_us"]),
                    _x(ratio(mine["per_delivery_us"], theirs["per_delivery_us"])),
                )
            )  # fmt: skip
        lines.append("")

    lines += _burst_lines(results.get("livebatch"))
    lines += _split_lines(results.get("cpusplit"))
    lines += _plain_lines(results.get("plain"))

    tput = results.get("throughput")
    if _ok(tput):
        assert isinstance(tput, dict)
        raw = lim["raw_best"]["committed_per_s"] if _ok(lim) and isinstance(lim, dict) else None
        lines += [
            "### 2. Sustained durable throughput (rising load; a step fails on loss, "
            f"p99 > {_n(knobs.get('p99_limit_ms'))} ms, or committing < 95% of the offered rate)",
            "",
            "| system | offered msg/s | committed msg/s | vs raw loop | deliveries/s | p99 ms | lost | "
            "CPU loadgen / servers / postgres / not ours / machine | step |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for system in ("chat", "inmemory"):
            for row in tput.get(system, {}).get("steps", []):
                servers = "chat_servers" if system == "chat" else "inmemory"
                lines.append(
                    _row(
                        system, _n(row["rate"]), _n(row["committed_per_s"]), _x(ratio(row["committed_per_s"], raw)),
                        _n(row["deliveries_per_s"]), _n(row["latency_ms"]["p99"]), row["lost"],
                        _cpu(row["cpu"], "loadgen", servers, "postgres", "others", "machine_busy"),
                        "pass" if row["passed"] else "fail: " + row["why"],
                    )
                )  # fmt: skip
        lines.append("")

    join = results.get("join")
    if _ok(join):
        assert isinstance(join, dict)
        variants = join["variants"]
        bare = variants[0]["ready_ms"]
        lines += [
            "### 3. Join cost (TCP connect -> ready frame; bare accept: -> handshake done), ms",
            "",
            "| variant | n | p50 | p99 | max | handshake p50 | joins/s | servers' CPU per join, ms "
            "| CPU loadgen / servers / postgres |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        bare_cpu = join_cpu_ms(variants[0])
        for v in variants:
            ms = v["ready_ms"]
            lines.append(
                _row(
                    v["variant"], v["n"], _with_ratio(ms["p50"], bare["p50"]), _with_ratio(ms["p99"], bare["p99"]),
                    _n(ms["max"]), _n(v["handshake_ms"]["p50"]), _n(v["joins_per_s"]),
                    _with_ratio(join_cpu_ms(v), bare_cpu), _cpu(v["cpu"], "loadgen", "chat_servers", "postgres"),
                )
            )  # fmt: skip
        lines.append("")

    idle = results.get("idle")
    if _ok(idle):
        assert isinstance(idle, dict)
        base_levels = {lv["sockets"]: lv for lv in idle.get("inmemory", {}).get("levels", [])}
        lines += [
            f"### 4. Idle connections on one process ({idle['chat']['room_size']} per room, --ws {idle['chat']['ws']})",
            "",
            "| sockets | chat RSS MB | chat KB/socket | in-memory KB/socket | still open | idle CPU % | "
            "/healthz p50 / max ms | message RTT p50 / max ms | fresh join ms | joins/s while opening |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for lv in idle["chat"]["levels"]:
            mem = base_levels.get(lv["sockets"])
            base_kb = mem["kb_per_socket"] if mem else None
            lines.append(
                _row(
                    _n(lv["sockets"]), _n(lv["rss_mb"]), _with_ratio(lv["kb_per_socket"], base_kb), _n(base_kb),
                    _n(lv["still_open"]), _n(lv["idle_cpu"].get("server")),
                    _pair(_n(lv["healthz_ms"]["p50"]), _n(lv["healthz_ms"]["max"])),
                    _pair(_n(lv["probe_rtt_ms"]["p50"]), _n(lv["probe_rtt_ms"]["max"])),
                    _n(lv["probe_join_ms"]), _n(lv["joins_per_s"]),
                )
            )  # fmt: skip
        for system in ("chat", "inmemory"):
            part = idle.get(system)
            if not part or not part["levels"]:
                continue
            again = part.get("reopened") or {}
            lines.append(
                f"\n{system}: RSS {_n(part['levels'][0]['rss_baseline_mb'])} MB before, "
                f"{_n(part['levels'][-1]['rss_mb'])} MB with {_n(part['levels'][-1]['sockets'])} sockets, "
                f"{_n(part['rss_after_close_mb'])} MB after closing them all; "
                f"{_n(again.get('rss_mb'))} MB with {_n(again.get('sockets'))} new sockets, "
                f"{_n(again.get('rss_after_close_mb'))} MB after closing those."
            )
        lines.append("")

    hist = results.get("history")
    if _ok(hist):
        assert isinstance(hist, dict)
        room = hist["room"]
        lines += [
            f"### 5. History pages of a {room['rows']:,}-message room (50 messages a page), ms",
            "",
            f"Table {room['table_mb']} MB, indexes {room['indexes_mb']} MB, shared_buffers {room['shared_buffers']}.",
            "",
            _row(
                "page",
                "EXPLAIN ANALYZE execution",
                "SQL round trip p50 / p99 (store.messages_before)",
                "socket round trip p50 / p99",
                "plan",
            ),
            "|---|---|---|---|---|",
        ]
        for label, page in hist["sql"].items():
            sock = hist["socket"].get(label, {}).get("rtt_ms")
            trip = page["roundtrip_ms"]
            lines.append(
                _row(
                    label, _n(page["execution_ms"], 3), _pair(_n(trip["p50"], 2), _n(trip["p99"], 2)),
                    _pair(_n(sock["p50"], 2), _n(sock["p99"], 2)) if sock else "-", page["node"],
                )
            )  # fmt: skip
        if "covering" in hist:
            cov = hist["covering"]
            lines.append("")
            lines.append(f"With a covering index (`{cov['sql']}`, {cov['mb']} MB, built in {cov['build_seconds']} s):")
            lines.append("")
            for label, page in cov["sql_pages"].items():
                lines.append(f"- {label}: execution {_n(page['execution_ms'], 3)} ms, {page['node']}")
            lines.append(f"- a 6,000-character message with that index: {cov.get('long_message_6000_chars', '-')}")
        first = next(iter(hist["sql"].values()))
        old = hist["sql"].get("old (seq 951-1000)", first)
        lines += [
            "",
            "The query, as `chat.store.messages_before` sends it, and its plans:",
            "",
            "```sql",
            old["sql"],
            "```",
        ]
        for label in ("latest (history request)", "old (seq 951-1000)"):
            if label in hist["sql"]:
                lines += [
                    "",
                    f"`EXPLAIN (ANALYZE, BUFFERS)`, {label}:",
                    "",
                    "```",
                    hist["sql"][label]["explain"],
                    "```",
                ]
        lines.append("")

    multi = results.get("multiroom")
    if _ok(multi):
        assert isinstance(multi, dict)
        ready, mem = multi["ready_ms"], multi["memory"]
        r = multi["rooms"]
        one = mem["one_room"]["kb_per_user"]
        lines += [
            f"### 6. Many rooms on one socket: a user in {r} rooms",
            "",
            f"Time to all-ready: one user at a time, from the TCP connect to the last room's `ready` "
            f"({ready['socket']['n']} and {ready['sockets']['n']} timed samples). "
            f"Memory: {multi['users']} users of each kind open together on one fresh server process, "
            "RSS growth per user.",
            "",
            "| kind | all-ready p50 / p99 ms | KB per user | vs 1 room on /socket | failed |",
            "|---|---|---|---|---|",
        ]
        for kind in ("one_room", "socket", "sockets"):
            row = mem[kind]
            times = ready.get(kind)
            missed = multi.get("ready_missed", {}).get(kind) or {}
            failed_cell = str(row["failed"] or 0)
            if missed:
                reasons = "; ".join(f"{reason} x{count}" for reason, count in missed.items())
                failed_cell += f"; not timed: {sum(missed.values())} ({reasons})"
            lines.append(
                _row(
                    row["label"], _pair(_n(times["p50"]), _n(times["p99"])) if times else "-",
                    _n(row["kb_per_user"]), _x(ratio(row["kb_per_user"], one)), failed_cell,
                )
            )  # fmt: skip
        sidebar = multi.get("sidebar_ms")
        if sidebar:
            total, listed = sidebar["total"], sidebar["list"]
            tried = total["n"] + sidebar["failed"]
            lines.append(
                _row(
                    f"time to the sidebar: GET /api/me/rooms + one /socket, {sidebar['rooms']} rooms",
                    _pair(_n(total["p50"]), _n(total["p99"])), "-", "-",
                    f"{total['n']} of {tried} samples; the list alone p50 {_n(listed['p50'])} ms",
                )
            )  # fmt: skip
        lines.append("")
    fanout = results.get("fanout")
    if _ok(fanout):
        assert isinstance(fanout, dict)
        from bench.fanout import report as fanout_report

        lines += fanout_report(fanout, _n(knobs.get("p99_limit_ms")))

    pglog = results.get("postgres_log")
    if isinstance(pglog, dict):
        lines += [
            "### Postgres during the run",
            "",
            f"{pglog['checkpoints']} checkpoint(s), {pglog['autovacuum_runs']} autovacuum/analyze run(s); "
            "statements that took 50 ms or more:",
            "",
        ]
        slow = pglog.get("slow_statements") or {}
        if slow:
            lines += ["| statement | count | worst ms |", "|---|---|---|"]
            lines += [_row(f"`{k}`", v["count"], _n(v["worst_ms"])) for k, v in slow.items()]
        else:
            lines.append("none.")
        lines.append("")

    failed = [name for name, value in results.items() if isinstance(value, dict) and "failed" in value]
    if failed:
        lines += ["### Failed scenarios", ""]
        for name in failed:
            lines.append(f"- {name}: `{results[name]['failed']}`")
        lines.append("")
    return "\n".join(lines)
