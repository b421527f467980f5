"""Settings (chat/config.py): where they are read from, and that the tests read no developer's .env."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chat.config import Settings
from tests.conftest import unique


def port_seen(cwd: Path, **env: str) -> int:
    """CHAT_PORT as a fresh process in `cwd` sees it, with only `env` among the CHAT_ variables."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")} | env
    out = subprocess.run(
        [sys.executable, "-c", "from chat.config import Settings; print(Settings().port)"],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(out.stdout)


@pytest.fixture
def folder_with_env(tmp_root: Path) -> Path:
    folder = tmp_root / unique("dotenv")
    folder.mkdir()
    (folder / ".env").write_text("CHAT_PORT=1234\n")
    (folder / "other.env").write_text("CHAT_PORT=4321\n")
    return folder


def test_env_file_is_read_unless_turned_off(folder_with_env: Path) -> None:
    assert port_seen(folder_with_env) == 1234  # the documented .env
    assert port_seen(folder_with_env, CHAT_ENV_FILE="other.env") == 4321
    assert port_seen(folder_with_env, CHAT_ENV_FILE="") == 8000  # none: the test servers' setting
    assert port_seen(folder_with_env, CHAT_ENV_FILE="", CHAT_PORT="99") == 99


def test_this_process_reads_no_env_file(folder_with_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a .env in the working directory changed the settings of the tests themselves."""
    monkeypatch.delenv("CHAT_PORT", raising=False)
    monkeypatch.chdir(folder_with_env)
    assert Settings().port == 8000
