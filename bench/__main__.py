"""`python -m bench [options]`: run the suite, print the table, write bench-results/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click

from bench.config import QUICK, SCENARIOS, SMOKE, Knobs


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.replace(" ", "").split(",") if x)


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="About 3 minutes: fewer rates, shorter runs, a 100k-message history room.")
@click.option("--smoke", is_flag=True, help="Seconds: the tiny run the test suite uses.")
@click.option("--processes", type=int, help="Chat server processes (K) [default 2].")
@click.option("--loadgen-processes", type=int, help="Load generator processes [default 2].")
@click.option("--rooms", type=int, help="Rooms in scenarios 1 and 2 [default 10].")
@click.option("--members", type=int, help="Members per room, spread over the processes [default 10].")
@click.option("--rates", help="Messages/s for scenario 1, all rooms together [default 100,500,2000].")
@click.option("--hot-rates", help="Messages/s from the one hot sender [default 500,1000].")
@click.option("--duration", type=float, help="Seconds per rate, warm-up included [default 10].")
@click.option("--warmup", type=float, help="Unmeasured seconds at the start of each rate [default 2].")
@click.option("--step-duration", type=float, help="Seconds per throughput step [default 6].")
@click.option("--start-rate", type=int, help="First throughput step, msg/s [default 250].")
@click.option("--rate-factor", type=float, help="Each throughput step is this much higher [default 1.5].")
@click.option("--max-steps", type=int, help="Throughput steps at most [default 10].")
@click.option(
    "--p99-limit", "p99_limit_ms", type=float, help="A throughput step fails above this p99, ms [default 500]."
)
@click.option("--join-samples", type=int, help="Sequential joins per variant [default 500].")
@click.option("--idle", "idle_levels", help="Idle socket counts [default 1000,5000,10000].")
@click.option("--idle-room-size", type=int, help="Idle sockets per room [default 20].")
@click.option("--history-rows", type=int, help="Messages in the history room [default 1000000].")
@click.option(
    "--covering-index",
    "history_covering_index",
    is_flag=True,
    default=None,
    help="Also measure history with a covering index (in the bench database only).",
)
@click.option(
    "--ws", type=click.Choice(["websockets-sansio", "websockets", "wsproto"]), help="uvicorn --ws [websockets-sansio]."
)
@click.option("--deflate/--no-deflate", default=None, help="Offer permessage-deflate like a browser [on].")
@click.option("--fanout-processes", help="Process counts for scenario 6, NOTIFY vs Redis [default 1,2,4].")
@click.option("--only", help=f"Comma-separated scenarios: {','.join(SCENARIOS)}.")
@click.option("--profile", is_flag=True, default=None, help="py-spy server 0 in the top latency, hot and join runs.")
@click.option(
    "--server-env",
    multiple=True,
    metavar="NAME=VALUE",
    help="Extra environment for the chat servers (repeatable), e.g. CHAT_POOL_SIZE=20.",
)
@click.option("--database-url", help="Use this Postgres (a fresh database on it) instead of an embedded one.")
@click.option(
    "--render",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Run nothing: write the table and PNG again from this run's JSON.",
)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Output folder [bench-results].")
def main(quick: bool, smoke: bool, server_env: tuple[str, ...], render: Path | None, **options: object) -> None:
    """Benchmark the chat server: latency, throughput, join cost, idle memory and history, each
    beside the machine's limits and the FastAPI chapter's in-memory broadcast."""
    from bench.runner import render as render_again
    from bench.runner import run

    if render is not None:
        for kind, path in render_again(render).items():
            click.echo(f"{kind}: {path}")
        return

    knobs: Knobs = SMOKE if smoke else QUICK if quick else Knobs()
    changes: dict[str, object] = {k: v for k, v in options.items() if v is not None}
    for name in ("rates", "idle_levels", "fanout_processes", "hot_rates"):
        if isinstance(changes.get(name), str):
            changes[name] = _ints(str(changes[name]))
    if isinstance(changes.get("only"), str):
        wanted = tuple(s.strip() for s in str(changes.pop("only")).split(",") if s.strip())
        unknown = set(wanted) - set(SCENARIOS)
        if unknown:
            raise click.BadParameter(f"unknown scenario(s): {', '.join(sorted(unknown))}", param_hint="--only")
        changes["scenarios"] = wanted
    if server_env:
        pairs = [item.partition("=") for item in server_env]
        changes["server_env"] = {**knobs.server_env, **{name: value for name, _, value in pairs}}
    knobs = knobs.replace(**changes)
    if knobs.ws == "wsproto" and importlib.util.find_spec("wsproto") is None:
        raise click.UsageError("--ws wsproto needs the wsproto package: pip install wsproto==1.3.2")
    results, paths = run(knobs)
    click.echo(paths["markdown"].read_text())
    for kind, path in paths.items():
        click.echo(f"{kind}: {path}")
    click.echo(f"logs: {results['meta']['logs']}")


if __name__ == "__main__":
    main()
