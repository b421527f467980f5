"""The PNG: one panel per scenario, latency distributions drawn as CDFs from the stored sketches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.ticker import FuncFormatter, NullFormatter

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]


def _cdf(ax: Axes, sketch: list[list[float]], label: str, color: str, style: str = "-") -> None:
    if not sketch:
        return
    xs = [max(v, 1e-3) for _, v in sketch]
    ys = [q * 100 for q, _ in sketch]
    ax.plot(xs, ys, style, color=color, label=label, linewidth=1.4)


def _plain(value: float, _pos: int) -> str:
    return f"{value:g}"


def _log_axis(axis: Axis) -> None:
    axis.set_major_formatter(FuncFormatter(_plain))
    axis.set_minor_formatter(NullFormatter())


def _latency_axes(ax: Axes, title: str) -> None:
    ax.set_xscale("log")
    _log_axis(ax.xaxis)
    ax.set_xlabel("ms (log)")
    ax.set_ylabel("percentile")
    ax.set_ylim(0, 100.5)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def _ok(value: Any) -> bool:
    return isinstance(value, (dict, list)) and not (isinstance(value, dict) and "failed" in value)


def draw(results: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(3, 3, figsize=(19, 16))
    (a1, a2, a3), (a4, a5, a6), (a7, a8, a9) = axes

    rows = results.get("latency")
    lim = results.get("limits")
    if _ok(rows):
        assert isinstance(rows, list)
        rates = sorted({r["rate"] for r in rows})
        for i, rate in enumerate(rates):
            for row in rows:
                if row["rate"] == rate:
                    chat = row["system"] == "chat"
                    _cdf(
                        a1,
                        row["latency_ms"]["sketch"],
                        f"{'chat' if chat else 'in-memory'} @ {rate}/s",
                        COLORS[i % len(COLORS)],
                        "-" if chat else "--",
                    )
        if _ok(lim):
            assert isinstance(lim, dict)
            _cdf(a1, lim["notify"]["latency_ms"]["sketch"], "bare NOTIFY->LISTEN", "gray", ":")
    _latency_axes(a1, "1. End-to-end latency (solid: chat, dashed: in-memory)")

    tput = results.get("throughput")
    if _ok(tput):
        assert isinstance(tput, dict)
        for system, color in (("chat", COLORS[0]), ("inmemory", COLORS[1])):
            steps = tput.get(system, {}).get("steps", [])
            xs = [s["committed_per_s"] for s in steps]
            ys = [max(s["latency_ms"]["p99"] or 0.0, 1e-3) for s in steps]
            a2.plot(xs, ys, "-o", color=color, label=f"{system} p99")
            ys50 = [max(s["latency_ms"]["p50"] or 0.0, 1e-3) for s in steps]
            a2.plot(xs, ys50, ":", color=color, label=f"{system} p50")
            for s, x, y in zip(steps, xs, ys, strict=True):
                if not s["passed"]:
                    a2.plot([x], [y], "x", color="black", markersize=10)
        if _ok(lim):
            assert isinstance(lim, dict)
            raw = lim["raw_best"]["committed_per_s"]
            a2.axvline(raw, color="gray", linestyle="--", label=f"raw INSERT+NOTIFY {raw:,.0f}/s")
            a2.axvline(0.7 * raw, color="gray", linestyle=":", label="70% of raw (target)")
        a2.set_yscale("log")
        _log_axis(a2.yaxis)
        a2.set_xlabel("committed messages/s")
        a2.set_ylabel("e2e latency ms (log)")
        a2.legend(fontsize=7)
        a2.grid(True, which="both", alpha=0.3)
    a2.set_title("2. Rising load (x: failed step)", fontsize=10)

    join = results.get("join")
    if _ok(join):
        assert isinstance(join, dict)
        for i, v in enumerate(join["variants"]):
            _cdf(a3, v["ready_ms"]["sketch"], v["variant"], COLORS[i % len(COLORS)])
    _latency_axes(a3, "3. Join cost (connect -> ready)")

    idle = results.get("idle")
    if _ok(idle):
        assert isinstance(idle, dict)
        for system, color in (("chat", COLORS[0]), ("inmemory", COLORS[1])):
            levels = idle.get(system, {}).get("levels", [])
            a4.plot(
                [lv["sockets"] for lv in levels],
                [lv["kb_per_socket"] for lv in levels],
                "-o",
                color=color,
                label=system,
            )
        a4.axhline(30, color="gray", linestyle="--", label="target 30 KB")
        a4.set_xlabel("idle sockets on one process")
        a4.set_ylabel("RSS growth per socket, KB")
        a4.set_ylim(bottom=0)
        a4.legend(fontsize=7)
        a4.grid(True, alpha=0.3)
    a4.set_title("4. Idle memory per connection", fontsize=10)

    hist = results.get("history")
    if _ok(hist):
        assert isinstance(hist, dict)
        for i, (label, page) in enumerate(hist["sql"].items()):
            _cdf(a5, page["roundtrip_ms"]["sketch"], f"SQL {label}", COLORS[i % len(COLORS)])
        i = 1
        for label, page in hist["socket"].items():
            if "rtt_ms" in page:
                _cdf(a5, page["rtt_ms"]["sketch"], f"socket {label}", COLORS[i % len(COLORS)], "--")
                i += 1
        a5.axvline(10, color="gray", linestyle=":")
    rows_text = f"{hist['room']['rows']:,}" if _ok(hist) and isinstance(hist, dict) else "?"
    _latency_axes(a5, f"5. History page, {rows_text}-message room (dotted: 10 ms)")

    if _ok(lim):
        assert isinstance(lim, dict)
        for i, table in enumerate(("plain", "schema")):
            for j, row in enumerate(lim.get(f"insert_notify_{table}", [])):
                _cdf(
                    a6,
                    row["commit_ms"]["sketch"],
                    f"{table} commit, {row['writers']} writer(s)",
                    COLORS[(2 * j + i) % len(COLORS)],
                    {"plain": "-", "schema": "--"}.get(table, ":"),
                )
    _latency_axes(a6, "Machine limits: INSERT+NOTIFY commit latency (asyncpg)")

    _timeline(a7, results)
    _cpu_bars(a8, results)
    _targets(a9, results)

    meta = results.get("meta", {})
    fig.suptitle(
        f"chat benchmark {meta.get('started', '')}: {meta.get('knobs', {}).get('processes', '?')} server processes, "
        f"{meta.get('machine', {}).get('cores', '?')} cores, durable Postgres",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _timeline(ax: Axes, results: dict[str, Any]) -> None:
    rows = results.get("latency")
    if not _ok(rows) or not rows:
        ax.set_visible(False)
        return
    assert isinstance(rows, list)
    top = max(r["rate"] for r in rows)
    for row in rows:
        if row["rate"] != top or "timeline_max_ms" not in row:
            continue
        step = row["timeline_step_ms"] / 1000
        xs = [i * step for i in range(len(row["timeline_max_ms"]))]
        chat = row["system"] == "chat"
        color = COLORS[0] if chat else COLORS[1]
        ax.plot(
            xs,
            [v if v > 0 else float("nan") for v in row["timeline_max_ms"]],
            "-" if chat else "--",
            color=color,
            label=f"{row['system']}: worst delivery",
        )
        ax.plot(
            xs,
            [v if v > 0 else float("nan") for v in row["ack_timeline_max_ms"]],
            ":",
            color=color,
            label=f"{row['system']}: worst send->ack",
        )
        ax.axvline(row["duration_s"] - row["measured_s"], color="gray", linestyle=":")
    ax.set_yscale("log")
    _log_axis(ax.yaxis)
    ax.set_xlabel("seconds into the run (dotted: end of warm-up)")
    ax.set_ylabel("worst latency per 100 ms, ms (log)")
    ax.set_title(f"Latency over time at {top:,} msg/s", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _cpu_bars(ax: Axes, results: dict[str, Any]) -> None:
    rows = results.get("latency")
    if not _ok(rows) or not rows:
        ax.set_visible(False)
        return
    assert isinstance(rows, list)
    groups = [("loadgen", "load generator"), ("servers", "server(s)"), ("postgres", "postgres"), ("others", "not ours")]
    labels = [f"{'chat' if r['system'] == 'chat' else 'mem'}@{r['rate']}" for r in rows]
    bottoms = [0.0] * len(rows)
    for i, (key, name) in enumerate(groups):
        values = []
        for r in rows:
            cpu = r["cpu"]
            if key == "servers":
                values.append(cpu.get("chat_servers" if r["system"] == "chat" else "inmemory", 0.0))
            else:
                values.append(cpu.get(key, 0.0))
        ax.bar(labels, values, bottom=bottoms, label=name, color=COLORS[i])
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    ax.axhline(100 * (results.get("meta", {}).get("machine", {}).get("cores") or 2), color="gray", linestyle="--")
    ax.set_ylabel("% of one core (dashed: the whole machine)")
    ax.set_title("CPU during each latency run", fontsize=10)
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax.legend(fontsize=7)


def _targets(ax: Axes, results: dict[str, Any]) -> None:
    ax.axis("off")
    goals = results.get("targets") or []
    lines = ["Targets"]
    for t in goals:
        mark = "met" if t["met"] else ("MISSED" if t["met"] is False else "-")
        lines.append(f"{mark:>6}  {t['target']}: {t['measured']} (need {t['required']})")
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=7, wrap=True)
