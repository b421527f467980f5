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


def env_file() -> str | None:
    """The `.env` file settings are also read from: CHAT_ENV_FILE names another one, and an
    empty CHAT_ENV_FILE means none (the test suite's servers: a developer's .env must not
    change test results)."""
    return os.environ.get("CHAT_ENV_FILE", ".env") or None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHAT_", env_file=env_file(), extra="ignore")

    database_url: str | None = Field(default=None, validation_alias=AliasChoices("DATABASE_URL", "CHAT_DATABASE_URL"))
    # A direct (not pooled) DSN for the LISTEN connection, when DATABASE_URL goes through PgBouncer.
    listen_database_url: str | None = None
    # "transaction" when DATABASE_URL goes through a transaction-mode pooler (PgBouncer's
    # pool_mode=transaction): no prepared statement outlives its transaction (chat/db.py), and
    # CHAT_LISTEN_DATABASE_URL must then point straight at Postgres.
    database_pooler: Literal["none", "transaction"] = "none"
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
    # How long after sending its author may edit a message; 0: any time (README: "Messages that change").
    edit_window_seconds: float = Field(default=0.0, ge=0)
    # Each socket's outgoing queue, bounded in frames and in bytes (characters of JSON); a socket
    # over either bound is closed with 4000 (slow consumer). README: "Limits".
    socket_queue: int = Field(default=1024, ge=1)
    socket_queue_bytes: int = Field(default=1024 * 1024, ge=64 * 1024)
    # A history reply (socket frame or HTTP page) stops short of this many bytes, with has_more.
    history_reply_bytes: int = Field(default=256 * 1024, ge=1024)
    replay_send_timeout_seconds: float = Field(default=10.0, gt=0)  # replay waits this long for a reader
    replays_per_user: int = Field(default=4, ge=1)  # concurrent replays per user, per process
    socket_rooms_max: int = Field(default=50, ge=1)  # rooms one /socket connection may subscribe to
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    pool_size: int = Field(default=10, ge=1)
    # Group commit and pipelining (README: "Delivery guarantees").
    # Sends per socket awaiting their commit. One socket sends at most this many per commit time
    # (Little's law): 32 held a socket to 2,000 msg/s at a 16 ms commit, and one stalled commit
    # (a checkpoint) then took seconds to work off at 1,000 msg/s; 256 (the most a 1,024-frame
    # queue allows) lets the next batch take the whole backlog at once.
    socket_inflight: int = Field(default=256, ge=1)
    write_batch_rows: int = Field(default=500, ge=1)  # rows per INSERT statement
    write_batch_bytes: int = Field(default=1024 * 1024, ge=1)  # about that many bytes per statement
    write_queue_rows: int = Field(default=20_000, ge=1)  # sends waiting for the writer; more: unavailable
    write_queue_bytes: int = Field(default=64 * 1024 * 1024, ge=1)

    # Limits, per process (README: "Limits").
    rate_per_second: float = Field(default=10.0, gt=0)  # frames per second, per connection
    rate_burst: float = Field(default=30.0, ge=1)
    user_rate_per_second: float = Field(default=20.0, gt=0)  # frames per second, per user
    user_rate_burst: float = Field(default=60.0, ge=1)
    rate_token_bytes: int = Field(default=8192, ge=256)  # a frame or reply costs one token more per this many bytes
    api_rate_per_second: float = Field(default=20.0, gt=0)  # HTTP API requests per second, per user
    api_rate_burst: float = Field(default=60.0, ge=1)
    flood_close_after: int = Field(default=50, ge=1)  # refused frames in a row before close 4029
    max_connections_per_user: int = Field(default=32, ge=1)
    token_check_seconds: float = Field(default=2.0, gt=0)  # revoked/expired tokens close live sockets
    max_rooms_per_user: int = Field(default=100, ge=0)  # rooms a user may create by joining them
    join_timeout_seconds: float = Field(default=10.0, gt=0)  # a room's feed not ready by then: 503
    searches_per_user: int = Field(default=2, ge=1)  # concurrent searches, per user
    # The FastAPI chapter's example routes (/ws, /items/{id}/ws, /ws/{client_id}, /chapter/N).
    chapter_routes: bool = True
    echo_connections_per_address: int = Field(default=8, ge=1)  # /ws, per client address
    echo_idle_seconds: float = Field(default=60.0, gt=0)  # /ws closes with 4002 after this long silent
    api_docs: bool = False  # /docs and /redoc load their scripts from a CDN: off unless asked for

    presence_beat_seconds: float = Field(default=2.0, gt=0)  # each process's heartbeat
    presence_stale_seconds: float = Field(default=10.0, gt=0)  # a process silent this long is dead
    # A user's last socket in a room closed: online there this long yet (a reload, a reconnect).
    presence_linger_seconds: float = Field(default=3.0, ge=0)
    typing_interval_seconds: float = Field(default=2.0, ge=0)  # at most one typing event per socket per this
    read_interval_seconds: float = Field(default=1.0, gt=0)  # read positions: one write per (user, room) per this

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
