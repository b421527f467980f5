"""The scale knobs, with three presets: the default run (a few minutes on 2 cores), --quick
(about a minute) and the smoke run the test suite uses (seconds)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

SCENARIOS = (
    "limits", "latency", "livebatch", "cpusplit", "plain", "throughput", "join", "idle", "history", "hot", "multiroom",
    "fanout",
)  # fmt: skip

# The bench measures capacity, not policy: the per-connection and per-user rate limits and the
# per-user connection and room caps are lifted (the limiter still runs on every frame). Unknown CHAT_*
# variables are ignored by the server, so this stays harmless if a setting is renamed.
SERVER_ENV = {
    "CHAT_RATE_PER_SECOND": "1000000",
    "CHAT_RATE_BURST": "1000000",
    "CHAT_USER_RATE_PER_SECOND": "1000000",
    "CHAT_USER_RATE_BURST": "1000000",
    "CHAT_API_RATE_PER_SECOND": "1000000",
    "CHAT_API_RATE_BURST": "1000000",
    "CHAT_MAX_CONNECTIONS_PER_USER": "1000000",
    "CHAT_MAX_ROOMS_PER_USER": "1000000",  # the join scenario makes a room per "first" join
    "CHAT_ECHO_CONNECTIONS_PER_ADDRESS": "1000000",  # every load generator socket comes from 127.0.0.1
}


@dataclass
class Knobs:
    # processes
    processes: int = 2  # chat server processes (K); clients are spread over them
    loadgen_processes: int = 2  # load generator worker processes
    ws: str = "websockets-sansio"  # uvicorn --ws for the chat servers and the baseline alike
    deflate: bool = True  # offer permessage-deflate, as every browser does (uvicorn accepts it by default)
    # scenario 1 and 2: rooms x members, every member sends
    rooms: int = 10
    members: int = 10
    rates: tuple[int, ...] = (100, 500, 2000)  # messages/s, all rooms together
    duration: float = 10.0  # seconds of load per rate, warm-up included
    warmup: float = 2.0  # seconds at the start of each load that are not measured
    drain_timeout: float = 10.0  # after the load: how long deliveries may still arrive
    # scenario 2: rising load until latency or loss breaks
    step_duration: float = 6.0
    step_warmup: float = 1.0
    start_rate: int = 250
    rate_factor: float = 1.5
    max_steps: int = 10
    # after the first failing step: steps between the best pass and the lowest failure (their
    # geometric mean), so that the maximum is known to better than one rate_factor
    refine_steps: int = 2
    p99_limit_ms: float = 500.0  # a step fails above this e2e p99
    # scenario 3
    join_samples: int = 500  # the p99 of 500 is the fifth-slowest join, not the second of 200
    join_burst: int = 100
    join_replay: int = 50  # messages in the room joined (the server replays CHAT_HISTORY_ON_JOIN = 50)
    # scenario 4
    idle_levels: tuple[int, ...] = (1000, 5000, 10000)
    idle_room_size: int = 20
    idle_baseline: bool = True  # the in-memory app under the same idle sockets
    idle_settle: float = 3.0  # seconds to wait after opening, and to measure idle CPU over
    idle_fresh_server: bool = True  # a new server process for the idle scenario (clean RSS)
    # scenario 5
    history_rows: int = 1_000_000
    history_samples: int = 200
    history_covering_index: bool = False  # also try a covering index (changes the bench database only)
    # scenario 6: fan-out engines (NOTIFY, Redis) at these process counts, with scenario 2's steps
    fanout_processes: tuple[int, ...] = (1, 2, 4)
    # machine limits
    limits_seconds: float = 3.0
    limits_writers: tuple[int, ...] = (1, 4, 16)
    notify_rate: float = 500.0
    limits_batch_writers: int = 4  # the batched INSERT loop, and the 1-row loop the throughput target uses
    limits_batch_rows: tuple[int, ...] = (10, 50)  # rows per statement in the batched loop
    single_commit_rate: float = 100.0  # lone commits a second: what one fsync'd commit costs
    # hot sender: one socket sends into one room of hot_members, spread over the processes
    hot_rates: tuple[int, ...] = (500, 1000)
    hot_members: int = 20
    # live=batch: one commit of burst_messages reaches burst_sockets sockets of one process
    burst_messages: int = 5000
    burst_sockets: int = 20
    # CPU split: the top latency rate again with split_members per room (against `members`): what
    # the servers' CPU costs per delivery, and per message besides its deliveries
    split_members: int = 2
    # many rooms on one socket: users on /socket with multiroom_rooms rooms each, against as many
    # room sockets each, and against one room each (a fresh server process, for clean RSS)
    multiroom_users: int = 100
    multiroom_rooms: int = 50
    multiroom_samples: int = 20  # sequential "one user joins all rooms" timings per variant
    # what and where
    scenarios: tuple[str, ...] = SCENARIOS
    out_dir: Path = field(default_factory=lambda: Path("bench-results"))
    database_url: str | None = None  # default: an embedded, durable Postgres in a temporary folder
    profile: bool = False  # py-spy on server 0 in the top latency and hot sender runs and the joins
    tokens: int = 20
    server_env: dict[str, str] = field(default_factory=lambda: dict(SERVER_ENV))  # for the chat servers

    def replace(self, **changes: object) -> Knobs:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


QUICK = Knobs(
    rates=(100, 500),
    duration=5.0,
    warmup=1.0,
    step_duration=3.0,
    step_warmup=0.5,
    start_rate=250,
    rate_factor=2.0,
    max_steps=4,
    join_samples=50,
    join_burst=50,
    idle_levels=(500, 2000),
    history_rows=100_000,
    history_samples=50,
    limits_seconds=1.5,
    limits_writers=(1, 4),
    multiroom_users=40,
    multiroom_samples=10,
)

SMOKE = Knobs(
    processes=2,
    loadgen_processes=1,
    rooms=2,
    members=3,
    rates=(50,),
    duration=1.0,
    warmup=0.3,
    drain_timeout=5.0,
    step_duration=1.0,
    step_warmup=0.2,
    start_rate=50,
    rate_factor=2.0,
    max_steps=1,
    p99_limit_ms=2000.0,
    join_samples=5,
    join_burst=5,
    join_replay=10,
    idle_levels=(20,),
    idle_room_size=5,
    idle_settle=0.3,
    idle_fresh_server=False,
    history_rows=2000,
    history_samples=5,
    limits_seconds=0.2,
    limits_writers=(2,),
    notify_rate=100.0,
    fanout_processes=(1,),
    limits_batch_writers=2,
    limits_batch_rows=(10,),
    single_commit_rate=50.0,
    hot_rates=(50,),
    hot_members=4,
    burst_messages=200,
    burst_sockets=4,
    multiroom_users=3,
    multiroom_rooms=4,
    multiroom_samples=2,
    tokens=3,
    # A short presence linger: the join scenario waits it out twice (seconds, not the default's).
    server_env={**SERVER_ENV, "CHAT_PRESENCE_LINGER_SECONDS": "0.3"},
)
