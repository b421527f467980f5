"""The embedded Postgres under supervision: it comes back after every crash, however many of its
restarts fail first (`chat serve` relies on this; tests/test_cli.py runs it end to end)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncpg
import pytest

from chat.config import libpq_url
from chat.embedded import EmbeddedPostgres
from tests.conftest import unique


async def test_a_restart_that_times_out_is_tried_again(tmp_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: a restart that timed out called stop(), which also ended the supervision, so the
    server was restarted at most once. After: supervision goes on until stop()."""
    caplog.set_level(logging.INFO, logger="chat.embedded")
    pg = EmbeddedPostgres(tmp_root / unique("supervised"), durable=False)
    pg.start()
    try:
        pg.supervise(interval=0.05, start_timeout=0.0)  # every restart times out...
        crashed = pg.process
        assert crashed is not None
        crashed.kill()
        crashed.wait()
        # Generous: a server that did not become ready is stopped with SIGINT, then SIGQUIT (up to
        # 15 s and 5 s), and one starting up under load has been seen to sit out the SIGINT.
        async with asyncio.timeout(120):
            while sum("did not become ready" in r.getMessage() for r in caplog.records) < 2:
                await asyncio.sleep(0.05)  # ...more than once, and supervision goes on
        pg.start_timeout = 60.0  # until the server may take its time again
        async with asyncio.timeout(60):
            while (url := pg.running_url()) is None:
                await asyncio.sleep(0.05)
        conn = await asyncpg.connect(libpq_url(url))
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
    finally:
        pg.stop()
    assert pg.process is None
