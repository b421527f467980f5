"""The tiny run the test suite keeps: every scenario at toy scale, in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.config import SMOKE


def run_smoke(database_url: str, tmp_dir: Path, *, scenarios: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run every scenario at toy scale against the Postgres server behind `database_url` (in a
    fresh database on it when we may create one, dropped afterwards), writing into `tmp_dir`.
    Returns the results (the dict that the JSON file holds), with `paths` naming the files."""
    from bench.runner import run

    knobs = SMOKE.replace(database_url=database_url, out_dir=tmp_dir / "bench-results")
    results, paths = run(knobs if scenarios is None else knobs.replace(scenarios=scenarios))
    results["paths"] = {kind: str(path) for kind, path in paths.items()}
    return results
