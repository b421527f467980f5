"""Settings, read from the environment (and a `.env` file) with pydantic-settings."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_data_dir() -> Path:
    # root cannot run postgres, and the unprivileged server it starts instead cannot reach
    # /root, so root gets a system-wide folder; everybody else their own data folder.
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/chat")
    from platformdirs import user_data_path

    return user_data_path("chat", appauthor=False)


def asyncpg_url(url: str) -> str:
    """Accept the usual spellings of a Postgres URL and return SQLAlchemy's asyncpg one."""
    for prefix in ("postgres://", "postgresql://", "postgresql+psycopg://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


def libpq_url(url: str) -> str:
    """The plain `postgresql://` form, for asyncpg.connect and psql."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHAT_", env_file=".env", extra="ignore")

    database_url: str | None = Field(default=None, validation_alias=AliasChoices("DATABASE_URL", "CHAT_DATABASE_URL"))
    # A direct (not pooled) DSN for the LISTEN connection, when DATABASE_URL goes through PgBouncer.
    listen_database_url: str | None = None
    data_dir: Path = Field(default_factory=default_data_dir)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    ws: Literal["auto", "websockets", "websockets-sansio", "wsproto"] = "websockets-sansio"
    # permessage-deflate: ~46 KB of zlib state per socket, and every frame compressed once per
    # socket; chat frames are small, so it is off unless asked for.
    ws_deflate: bool = False

    history_on_join: int = Field(default=50, ge=0, le=1000)
    history_page_max: int = Field(default=200, ge=1, le=5000)
    max_message_bytes: int = Field(default=16 * 1024, ge=16, le=1024 * 1024)
    socket_queue: int = Field(default=1024, ge=1)
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    pool_size: int = Field(default=10, ge=1)

    # Limits, per process (README: "Limits").
    rate_per_second: float = Field(default=10.0, gt=0)  # frames per second, per connection
    rate_burst: float = Field(default=30.0, ge=1)
    user_rate_per_second: float = Field(default=20.0, gt=0)  # frames per second, per user
    user_rate_burst: float = Field(default=60.0, ge=1)
    flood_close_after: int = Field(default=50, ge=1)  # refused frames in a row before close 4029
    max_connections_per_user: int = Field(default=32, ge=1)
    token_check_seconds: float = Field(default=2.0, gt=0)  # revoked/expired tokens close live sockets

    presence_beat_seconds: float = Field(default=2.0, gt=0)  # each process's heartbeat
    presence_stale_seconds: float = Field(default=10.0, gt=0)  # a process silent this long is dead
    typing_interval_seconds: float = Field(default=2.0, ge=0)  # at most one typing event per socket per this

    listen_heartbeat_seconds: float = Field(default=2.0, gt=0)
    listen_timeout_seconds: float = Field(default=3.0, gt=0)
    # Fan-out through Redis pub/sub instead of LISTEN/NOTIFY (README: "Past one Postgres's
    # fan-out"); unset: NOTIFY. The heartbeat settings above apply to it too.
    fanout_url: str | None = None
    fanout_gap_wait_seconds: float = Field(default=0.05, ge=0)  # publishers may overtake each other
    relay_retry_seconds: float = Field(default=0.5, gt=0)  # how often standby relays try the lock

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip().rstrip("/") for o in value.split(",") if o.strip()]
        return value

    @field_validator("database_url", "listen_database_url")
    @classmethod
    def _normalise_url(cls, value: str | None) -> str | None:
        return asyncpg_url(value) if value else None

    @field_validator("fanout_url")
    @classmethod
    def _check_fanout_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("CHAT_FANOUT_URL must be a redis://, rediss:// or unix:// URL")
        return value or None

    @property
    def frame_limit(self) -> int:
        """Hard limit on one WebSocket frame, in bytes; larger frames close the socket with 1009.

        Generous above max_message_bytes so that an over-long message still parses and gets
        a clear error frame instead of a closed socket.
        """
        return max(128 * 1024, 4 * self.max_message_bytes + 4096)


@lru_cache
def get_settings() -> Settings:
    return Settings()
