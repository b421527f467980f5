"""Redis fan-out (CHAT_FANOUT_URL), with a real redis-server and real server processes: delivery
across processes, presence and typing, rows from other SQL clients through the relay (and its
failover), /readyz, and Redis going away or restarting mid-stream with nothing lost or doubled."""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from redis import asyncio as aioredis

from chat import notify
from chat.config import libpq_url
from chat.store import MessageRecord
from tests.conftest import MakeToken, unique
from tests.redisserver import RedisServer
from tests.resilient import ResilientClient
from tests.roomclient import RoomClient
from tests.servers import Server
from tests.test_faults import FAST_LISTENER, run_with_fault

FAST_RELAY = {"CHAT_RELAY_RETRY_SECONDS": "0.2"}


def redis_env(redis: RedisServer) -> dict[str, str]:
    return {"CHAT_FANOUT_URL": redis.url, **FAST_LISTENER, **FAST_RELAY}


# --- servers on Redis --------------------------------------------------------------------------


@pytest.fixture
def redis_pair(database_url: str, tmp_root: Path, redis_server: RedisServer) -> Iterator[list[Server]]:
    servers = [Server(database_url, tmp_root, env=redis_env(redis_server)) for _ in range(2)]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def own_redis(tmp_root: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own, to stop and start."""
    server = RedisServer(tmp_root / unique("redis"))
    yield server
    server.stop()


@pytest.fixture
def own_redis_pair(database_url: str, tmp_root: Path, own_redis: RedisServer) -> Iterator[list[Server]]:
    servers = [Server(database_url, tmp_root, env=redis_env(own_redis)) for _ in range(2)]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(libpq_url(database_url))
    yield conn
    await conn.close()


async def test_messages_presence_and_typing_cross_processes_without_notify(
    redis_pair: list[Server], make_token: MakeToken, db: asyncpg.Connection
) -> None:
    room = unique("r")
    path = f"/rooms/{room}/ws"
    alice, bob = unique("alice"), unique("bob")
    a = await RoomClient.open(redis_pair[0].ws(path), await make_token(alice))
    await a.ready()
    b = await RoomClient.open(redis_pair[1].ws(path), await make_token(bob))
    await b.ready()
    await a.until("join", user=bob)  # presence through Redis

    room_id = await db.fetchval("SELECT id FROM rooms WHERE name = $1", room)
    heard: list[tuple[str, str]] = []
    await db.add_listener(f"room_{room_id}", lambda *args: heard.append((args[2], args[3])))
    await db.add_listener("chat_relay", lambda *args: heard.append((args[2], args[3])))

    per_sender = 40
    for i in range(per_sender):  # interleaved sends from both processes
        await a.send(f"a{i}", client_id=f"a{i}")
        await b.send(f"b{i}", client_id=f"b{i}")
    total = 2 * per_sender
    for client in (a, b):
        await client.until_seq(total)
        assert client.seqs() == list(range(1, total + 1))
    assert a.bodies() == b.bodies()

    await b.ws.send(json.dumps({"type": "typing"}))
    assert (await a.until("typing"))["user"] == bob

    # The app's own inserts sent no NOTIFY. Notifications arrive in commit order, so once this
    # row's (from "another SQL client") arrives, any of the app's would have arrived before it.
    await db.execute("INSERT INTO messages (room_id, author, body) VALUES ($1, 'psql', 'marker')", room_id)
    async with asyncio.timeout(10):
        while not any(channel == "chat_relay" for channel, _ in heard):
            await asyncio.sleep(0.02)
    assert [json.loads(payload)["body"] for _, payload in heard] == ["marker", "marker"]  # room_N and chat_relay
    await a.until_seq(total + 1)

    await b.close()
    await a.until("leave", user=bob)
    await a.close()


async def test_a_burst_from_several_sockets_is_published_once_per_batch_per_room(
    database_url: str, tmp_root: Path, redis_server: RedisServer, make_token: MakeToken, db: asyncpg.Connection
) -> None:
    """The writer publishes each committed batch as one message per room: a raw Redis subscriber
    on the room's channel sees fewer publishes than messages, and every seq exactly once."""
    server = Server(database_url, tmp_root, env=redis_env(redis_server))
    subscriber = aioredis.Redis.from_url(redis_server.url)
    pubsub = subscriber.pubsub()
    try:
        path = f"/rooms/{unique('r')}/ws"
        senders = [await RoomClient.open(server.ws(path), await make_token()) for _ in range(5)]
        for client in senders:
            await client.ready()
        room_id = await db.fetchval("SELECT id FROM rooms WHERE name = $1", path.split("/")[2])
        await pubsub.subscribe(f"room_{room_id}")
        per_socket = 40
        total = per_socket * len(senders)

        async def burst(n: int, client: RoomClient) -> None:
            for i in range(per_socket):  # without waiting for acks: sends pile up while a batch commits
                await client.send(f"s{n}-{i}", client_id=f"s{n}-{i}")

        await asyncio.gather(*(burst(n, client) for n, client in enumerate(senders)))
        publishes: list[list[int]] = []  # the seqs of each publish
        async with asyncio.timeout(60):
            while sum(map(len, publishes)) < total:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None or message["type"] != "message":
                    continue
                notices = notify.parse_all(message["data"].decode())
                if all(isinstance(notice, notify.Event) for notice in notices):
                    continue  # presence
                publishes.append([notice.seq for notice in notices if isinstance(notice, MessageRecord)])
                assert len(publishes[-1]) == len(notices), notices  # messages only, whole
        assert sorted(seq for batch in publishes for seq in batch) == list(range(1, total + 1))  # each once
        assert all(batch == sorted(batch) for batch in publishes)
        assert len(publishes) < total, "each batch should be one publish, not one per message"
        for client in senders:
            await client.until_seq(total)
            assert client.seqs() == list(range(1, total + 1))  # every seq delivered once, in order
        print(f"burst: {total} messages from {len(senders)} sockets in {len(publishes)} publishes")
        for client in senders:
            await client.close()
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await subscriber.aclose()
        server.stop()


async def test_without_redis_the_apps_inserts_notify_their_room_only(
    server_a: Server, make_token: MakeToken, db: asyncpg.Connection
) -> None:
    """NOTIFY fan-out (CHAT_FANOUT_URL unset): one NOTIFY per message on the room's channel, as
    ever, and none on the relay's channel, which only other SQL clients' rows reach."""
    room = unique("r")
    client = await RoomClient.open(server_a.ws(f"/rooms/{room}/ws"), await make_token())
    await client.ready()
    room_id = await db.fetchval("SELECT id FROM rooms WHERE name = $1", room)
    heard: list[tuple[str, str]] = []
    await db.add_listener(f"room_{room_id}", lambda *args: heard.append((args[2], json.loads(args[3])["body"])))
    await db.add_listener("chat_relay", lambda *args: heard.append((args[2], json.loads(args[3])["body"])))
    await client.send("from the app")
    await client.until_seq(1)
    await db.execute("INSERT INTO messages (room_id, author, body) VALUES ($1, 'psql', 'from psql')", room_id)
    await client.until_seq(2)
    async with asyncio.timeout(10):
        while len(heard) < 3:
            await asyncio.sleep(0.02)
    assert heard == [
        (f"room_{room_id}", "from the app"),
        (f"room_{room_id}", "from psql"),
        ("chat_relay", "from psql"),
    ]
    await client.close()


async def test_rows_from_other_sql_clients_are_delivered_through_the_relay(
    redis_pair: list[Server], make_token: MakeToken, db: asyncpg.Connection
) -> None:
    room = unique("r")
    path = f"/rooms/{room}/ws"
    clients = [await RoomClient.open(s.ws(path), await make_token()) for s in redis_pair]
    for client in clients:
        await client.ready()
    room_id = await db.fetchval("SELECT id FROM rooms WHERE name = $1", room)
    latencies = []
    for n in range(1, 21):
        started = time.perf_counter()
        await db.execute("INSERT INTO messages (room_id, author, body) VALUES ($1, 'psql', $2)", room_id, f"m{n}")
        for client in clients:
            await client.until_seq(n, timeout=10)
        latencies.append((time.perf_counter() - started) * 1000)
    big = "x" * 9000  # over NOTIFY's limit: relayed by reference, read from the table
    await db.execute("INSERT INTO messages (room_id, author, body) VALUES ($1, 'psql', $2)", room_id, big)
    for client in clients:
        await client.until_seq(21, timeout=10)
        assert client.seqs() == list(range(1, 22))
        assert client.bodies()[-1] == big
    print(
        f"relay: SQL INSERT -> both sockets, median {statistics.median(latencies):.1f} ms,"
        f" max {max(latencies):.1f} ms over {len(latencies)} rows"
    )
    for client in clients:
        await client.close()


def relay_holder(servers: list[Server]) -> Server | None:
    holders = [s for s in servers if s.proc.poll() is None and "this process now relays" in s.log()]
    return holders[-1] if len(holders) == 1 else None


async def wait_for(predicate: object, timeout: float = 20.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


async def test_relay_owner_killed_and_another_process_takes_over(
    redis_pair: list[Server], make_token: MakeToken, db: asyncpg.Connection
) -> None:
    await wait_for(lambda: relay_holder(redis_pair) is not None)
    holder = relay_holder(redis_pair)
    assert holder is not None
    other = next(s for s in redis_pair if s is not holder)
    room = unique("r")
    client = await RoomClient.open(other.ws(f"/rooms/{room}/ws"), await make_token())
    await client.ready()
    room_id = await db.fetchval("SELECT id FROM rooms WHERE name = $1", room)

    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait(10)
    started = time.perf_counter()
    await wait_for(lambda: "this process now relays" in other.log())
    took_over = time.perf_counter() - started
    # Inserted right after the kill: delivered by the new holder (live, or by its wake-up).
    await db.execute("INSERT INTO messages (room_id, author, body) VALUES ($1, 'psql', 'after the kill')", room_id)
    await client.until_seq(1, timeout=15)
    assert client.bodies() == ["after the kill"]
    await db.execute("INSERT INTO messages (room_id, author, body) VALUES ($1, 'psql', 'and later')", room_id)
    await client.until_seq(2, timeout=15)
    print(f"relay failover: the other process held the lock {took_over * 1000:.0f} ms after kill -9")
    await client.close()


async def ready(server: Server) -> int:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{server.http}/readyz", timeout=5)).status_code


async def wait_ready_status(server: Server, status: int, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while await ready(server) != status:
            await asyncio.sleep(0.1)


async def test_redis_down_sends_are_stored_and_acked_then_delivered(
    own_redis_pair: list[Server], own_redis: RedisServer, make_token: MakeToken
) -> None:
    path = f"/rooms/{unique('r')}/ws"
    sender = await RoomClient.open(own_redis_pair[0].ws(path), await make_token())
    reader = await RoomClient.open(own_redis_pair[1].ws(path), await make_token())
    await sender.ready()
    await reader.ready()
    await sender.send("before", client_id="m0")
    await reader.until_seq(1)

    own_redis.stop()
    for server in own_redis_pair:  # /readyz follows the Redis connection
        await wait_ready_status(server, 503)
    for n in range(1, 6):
        await sender.send(f"while down {n}", client_id=f"m{n}")
        ack = await sender.until("ack", client_id=f"m{n}")
        assert ack["seq"] == n + 1 and not ack["duplicate"]
    assert reader.seqs() == [1]

    own_redis.start()
    for server in own_redis_pair:
        await wait_ready_status(server, 200)
    for client in (reader, sender):
        await client.until_seq(6, timeout=20)
        assert client.seqs() == list(range(1, 7))  # each once, in order
    assert all("redis reconnected" in server.log() for server in own_redis_pair)
    # The sender's publishes failed while Redis was down: it woke the room once Redis was back.
    await wait_for(lambda: "waking 1 room(s) whose publish failed" in own_redis_pair[0].log())
    await sender.close()
    await reader.close()


async def test_redis_restart_mid_stream_loses_and_doubles_nothing(
    own_redis_pair: list[Server], own_redis: RedisServer, make_token: MakeToken, database_url: str
) -> None:
    async def fault(clients: list[ResilientClient]) -> None:
        await asyncio.to_thread(own_redis.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(own_redis.start)

    await run_with_fault(own_redis_pair, make_token, database_url, fault, label="Redis restart")
    assert all("redis reconnected" in server.log() for server in own_redis_pair)


async def test_redis_frozen_mid_stream_is_noticed_by_the_heartbeat(
    own_redis_pair: list[Server], own_redis: RedisServer, make_token: MakeToken, database_url: str
) -> None:
    """SIGSTOP Redis for longer than the heartbeat timeout: nothing is closed, only silent."""

    async def fault(clients: list[ResilientClient]) -> None:
        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            await wait_for(lambda: all("redis heartbeat failed" in s.log() for s in own_redis_pair))
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)

    await run_with_fault(own_redis_pair, make_token, database_url, fault, label="SIGSTOP (redis)")
    assert all("redis reconnected" in server.log() for server in own_redis_pair)


async def test_redis_subscriber_connection_killed(
    redis_pair: list[Server], redis_server: RedisServer, make_token: MakeToken, database_url: str
) -> None:
    """The Redis side of "listener killed": CLIENT KILL every pub/sub connection mid-stream."""

    async def fault(clients: list[ResilientClient]) -> None:
        reply = await asyncio.to_thread(redis_server.command, "CLIENT", "KILL", "TYPE", "pubsub")
        assert reply.startswith(b":") and int(reply[1:].strip()) >= 2, reply

    await run_with_fault(redis_pair, make_token, database_url, fault, label="CLIENT KILL (redis subscriber)")
    assert all("redis reconnected" in server.log() for server in redis_pair)


async def test_membership_events_cross_processes_on_redis(
    redis_pair: list[Server], make_token: MakeToken, database_url: str
) -> None:
    """Issue 11 on Redis fan-out: a read position moved on one process reaches the user's socket
    on the other; a removal through the API ends the member's subscriptions on both processes;
    a removal from the CLI (a NOTIFY, brought to Redis by the relay) too, and its invitation
    tells the member's /socket that their room list changed."""
    from tests.test_cli import chat, clean_env
    from tests.test_membership import my_rooms, send, subscribe, users

    one, two = redis_pair
    async with users(one, make_token, "owner", "member") as (owner, member):
        room = unique("priv")
        assert (await owner.api.post("/rooms", json={"name": room, "visibility": "private"})).status_code == 201
        assert (await owner.api.post(f"/rooms/{room}/members", json={"user": member.name})).json()["changed"]
        async with await RoomClient.open(one.ws(f"/rooms/{room}/ws"), owner.token) as speaker:
            await speaker.ready()
            await speaker.send(f"hello @{member.name}", client_id="hi")
            await speaker.until("ack", client_id="hi")
            head = (await speaker.until("message", body=f"hello @{member.name}"))["seq"]
            laptop, ready = await subscribe(two, member, room)
            phone, _ = await subscribe(one, member, room)
            assert ready["type"] == "ready"
            assert (await my_rooms(member))[room]["mentions"] == 1
            await send(phone, type="read", room=room, seq=head)
            assert (await laptop.until("read", room=room))["seq"] == head  # from process one to two
            assert (await my_rooms(member))[room]["mentions"] == 0

            single = await RoomClient.open(two.ws(f"/rooms/{room}/ws"), member.token)
            await single.ready()
            removed = await owner.api.delete(f"/rooms/{room}/members/{member.name}")
            assert removed.json()["changed"] is True
            for client in (laptop, phone):
                assert (await client.until("error", code="removed"))["room"] == room
            assert await single.wait_closed() == 4003
            await speaker.until("removed", user=member.name)
            await speaker.send("after the removal", client_id="after")
            await speaker.until("message", body="after the removal")

            # Again from the command line: its NOTIFY reaches Redis through the relay, and the
            # member's sockets hear that their room list changed (their user channel, relayed).
            watcher = await RoomClient.open(two.ws("/socket"), member.token)
            await watcher.ws.send(json.dumps({"type": "ping"}))
            await watcher.until("pong")  # its user channel is subscribed by now
            env = clean_env(DATABASE_URL=database_url)
            assert f"{member.name}: added" in chat("room", "invite", room, member.name, env=env).stdout
            await watcher.until("rooms")
            await watcher.close()
            again, ready = await subscribe(two, member, room)
            assert ready["type"] == "ready"
            assert f"{member.name}: removed" in chat("room", "remove", room, member.name, env=env).stdout
            assert (await again.until("error", code="removed"))["room"] == room
            await speaker.until("message", body=f"{member.name} was removed by an administrator")
            await speaker.send("after the second removal", client_id="after2")
            await speaker.until("message", body="after the second removal")
            for client in (laptop, phone, again):
                assert "after the removal" not in [m.get("body") for m in client.frames if m.get("room") == room]
                assert not any(f.get("body") == "after the second removal" for f in client.frames)
                await client.close()
            await single.close()
