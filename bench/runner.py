"""The run: set everything up, run the scenarios in order, write the results, tear down.

Every scenario runs even if an earlier one failed; a failure is recorded in the results."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import history, report, scenarios
from bench.config import Knobs
from bench.run import Run, log, pg_log_summary, sleep_until
from bench.stats import summary


def write_outputs(results: dict[str, Any], out_dir: Path, stamp: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stamp}.json", "markdown": out_dir / "latest.md"}
    paths["json"].write_text(json.dumps(results, indent=1, default=str))
    markdown = report.markdown(results)
    paths["markdown"].write_text(markdown)
    (out_dir / f"{stamp}.md").write_text(markdown)
    try:
        from bench import plot

        paths["png"] = out_dir / f"{stamp}.png"
        plot.draw(results, paths["png"])
    except ImportError as exc:
        results.setdefault("notes", []).append(f"no PNG: {exc} (pip install matplotlib)")
        paths.pop("png", None)
    return paths


def render(json_path: Path) -> dict[str, Path]:
    """Write the Markdown and PNG again from a run's JSON (after changing the report's code)."""
    results = json.loads(json_path.read_text())
    kept = Path(results.get("meta", {}).get("logs", "")) / "postgres.log"
    if kept.exists():
        results["postgres_log"] = pg_log_summary(kept)
    if isinstance(results.get("history"), dict) and "sql" in results["history"]:
        history.reread_plans(results["history"])
    results["targets"] = report.targets(results)
    return write_outputs(results, json_path.parent, json_path.stem)


def run(knobs: Knobs) -> tuple[dict[str, Any], dict[str, Path]]:
    """The whole suite; returns the results and the files written."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = "/tmp" if os.path.isdir("/tmp") else None  # on disk, not tmpfs: fsync must cost what it costs
    work_dir = Path(tempfile.mkdtemp(prefix="chat-bench-", dir=base))
    os.chmod(work_dir, 0o755)  # the embedded server's unprivileged account must reach its folder
    log_dir = knobs.out_dir / f"{stamp}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    bench_run = Run(knobs, work_dir, log_dir)
    started = time.monotonic()
    try:
        bench_run.start()
        scenarios.run_all(bench_run)
    finally:
        bench_run.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
    results = bench_run.results
    results.setdefault("meta", {})["seconds"] = round(time.monotonic() - started)
    results["meta"]["logs"] = str(log_dir)
    results["targets"] = report.targets(results)
    paths = write_outputs(results, knobs.out_dir, stamp)
    return results, paths


__all__ = ["Run", "log", "run", "sleep_until", "summary"]
