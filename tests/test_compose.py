"""docker-compose.yml stays honest: it resolves, runs the multi-process path, and uses our real
commands and settings. No Docker engine here, so `docker-compose config` is the check."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from chat.cli import ROOT
from chat.config import Settings


def resolved(*profiles: str, env: dict[str, str] | None = None) -> dict[str, object]:
    tool = shutil.which("docker-compose")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing in CI (.ci/run installs it)")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    environment = {**os.environ, "COMPOSE_PROFILES": ",".join(profiles), **(env or {})}
    out = subprocess.run(
        [tool, "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        check=True,
        env=environment,
    ).stdout
    config: dict[str, object] = yaml.safe_load(out)
    return config


def test_compose_file_resolves_and_runs_the_multi_process_path() -> None:
    services = resolved()["services"]
    assert isinstance(services, dict)
    assert {"postgres", "migrate", "app"} <= services.keys()
    assert "healthcheck" in services["postgres"]
    assert services["migrate"]["command"] == ["chat", "migrate"]
    app = services["app"]
    command = app["command"]
    assert command[:2] == ["chat", "serve"] and int(command[command.index("--workers") + 1]) >= 2
    assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert app["depends_on"]["postgres"]["condition"] == "service_healthy"
    # Every CHAT_ variable the file sets is a real setting; FORWARDED_ALLOW_IPS is uvicorn's, and
    # behind a proxy it decides the client's address and the cookie's Secure flag.
    known = {f"CHAT_{name.upper()}" for name in Settings.model_fields} | {"DATABASE_URL", "FORWARDED_ALLOW_IPS"}
    assert "FORWARDED_ALLOW_IPS" in app["environment"]
    for name in ("migrate", "app"):
        environment = services[name].get("environment", {})
        assert "DATABASE_URL" in environment
        assert set(environment) <= known, set(environment) - known


def test_compose_redis_profile_is_optional_and_feeds_the_app() -> None:
    services = resolved()["services"]
    assert isinstance(services, dict)
    assert services["app"]["environment"]["CHAT_FANOUT_URL"] == ""  # default: NOTIFY
    assert "redis" not in services["app"].get("depends_on", {})  # the app runs without the profile
    services = resolved("redis", env={"CHAT_FANOUT_URL": "redis://redis:6379/0"})["services"]
    assert isinstance(services, dict)
    redis = services["redis"]
    assert redis["profiles"] == ["redis"]
    assert redis["command"][0] == "redis-server" and "healthcheck" in redis
    assert services["app"]["environment"]["CHAT_FANOUT_URL"] == "redis://redis:6379/0"
    assert Settings(database_url=None, fanout_url="redis://redis:6379/0").fanout_url == "redis://redis:6379/0"
    assert Settings(database_url=None, fanout_url="").fanout_url is None  # the file's default: NOTIFY
