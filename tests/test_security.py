"""Nobody gets in who shouldn't, nothing crashes, nothing is lost: refusals, limits, revocation,
hostile input (fuzzed with hypothesis) and tokens kept out of logs, against real servers."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as connect_sync
from websockets.typing import Origin

from chat import socket_frames, store
from chat.config import libpq_url
from tests.conftest import MakeToken, unique
from tests.roomclient import RoomClient
from tests.servers import DEFAULT_LIMITS, Server
from tests.test_auth import refusal
from tests.test_client import PeakRss, fill_room, history_http_attack, history_socket_attack, replay_hogs
from tests.test_ws import echo_attack

# What the closing note of the security issue reports; printed at the end of the module.
TALLY: Counter[str] = Counter()


def create_token(url: str, name: str | None = None, **kwargs: Any) -> str:
    """A token, from sync code (hypothesis tests are sync)."""

    async def make() -> str:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                return (await store.create_token(conn, user_name=name or unique("u"), ttl=None, **kwargs))[1]
        finally:
            await engine.dispose()

    return asyncio.run(make())


# --- who gets in --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_server(database_url: str, tmp_root: Path) -> Iterator[Server]:
    """Default limits, an allowed foreign origin, few connections per user, fast token checks."""
    server = Server(
        database_url,
        tmp_root,
        limits=DEFAULT_LIMITS,
        env={
            "CHAT_ALLOWED_ORIGINS": "https://good.example",
            "CHAT_MAX_CONNECTIONS_PER_USER": "3",
            "CHAT_TOKEN_CHECK_SECONDS": "0.5",
        },
    )
    yield server
    server.stop()


async def test_accept_refuse_matrix(strict_server: Server, engine: AsyncEngine, make_token: MakeToken) -> None:
    """Every way in, and which ones must be refused before accept. Counts unauthenticated
    accepts: there must be none."""
    s = strict_server
    good = await make_token()
    async with engine.connect() as conn:
        _, scoped = await store.create_token(conn, user_name=unique("scoped"), ttl=None, rooms=["lobby"])
        _, expired = await store.create_token(conn, user_name=unique("exp"), ttl=timedelta(seconds=-1))
        revoked_id, revoked = await store.create_token(conn, user_name=unique("rev"), ttl=None)
        await store.revoke_tokens(conn, token_ids=[revoked_id])
    room = s.ws("/rooms/general/ws")
    same_origin = Origin(f"http://127.0.0.1:{s.port}")
    refused: dict[str, tuple[str, dict[str, Any], tuple[int, str | None]]] = {
        "missing token": (room, {}, (401, "missing token")),
        "unknown token": (room + "?token=some-key-token", {}, (401, "invalid token")),
        "forged token": (room + "?token=chat_" + "A" * 43, {}, (401, "invalid token")),
        "expired token": (room + f"?token={expired}", {}, (401, "token expired")),
        "revoked token": (room + f"?token={revoked}", {}, (401, "token revoked")),
        "wrong room": (s.ws("/rooms/general/ws") + f"?token={scoped}", {}, (403, "room not allowed for this token")),
        "reserved room": (s.ws("/rooms/_chapter/ws") + f"?token={good}", {}, (400, None)),
        "foreign origin": (room + f"?token={good}", {"origin": Origin("https://evil.example")}, (403, None)),
        "foreign origin, cookie": (
            room,
            {"origin": Origin("https://evil.example"), "additional_headers": {"Cookie": f"session={good}"}},
            (403, "origin not allowed"),
        ),
        "null origin": (room + f"?token={good}", {"origin": Origin("null")}, (403, "origin not allowed")),
    }
    accepted_wrongly: list[str] = []  # counted, not raised: every way in is tried and reported
    got: dict[str, tuple[int, str]] = {}
    for name, (url, kwargs, _) in refused.items():
        try:
            async with connect(url, **kwargs) as ws:
                accepted_wrongly.append(name)
                await ws.close()
        except InvalidStatus as exc:
            body = json.loads(bytes(exc.response.body or b"{}"))
            got[name] = (exc.response.status_code, body.get("detail", ""))
    TALLY["unauthenticated accepts"] += len(accepted_wrongly)
    assert accepted_wrongly == []
    for name, (_, _, (status, reason)) in refused.items():
        assert got[name][0] == status, name
        if reason is not None:
            assert got[name][1] == reason, name
        TALLY[f"refused: {got[name][1].split(':')[0]}"] += 1

    accepted = {
        "same origin": (room + f"?token={good}", {"origin": same_origin}),
        "allowed origin": (room + f"?token={good}", {"origin": Origin("https://good.example")}),
        "no origin (not a browser)": (room + f"?token={good}", {}),
        "scoped token, its room": (s.ws("/rooms/lobby/ws") + f"?token={scoped}", {}),
    }
    for name, (url, kwargs) in accepted.items():
        async with connect(url, **kwargs) as ws:  # type: ignore[arg-type]
            assert json.loads(await ws.recv())["type"] in ("message", "ready"), name


async def test_connections_per_user(strict_server: Server, make_token: MakeToken) -> None:
    token = await make_token()
    url = strict_server.ws(f"/rooms/{unique('r')}/ws?token={token}")
    open_ = [await connect(url) for _ in range(3)]
    assert await refusal(url) == (429, "too many connections for this user")
    await open_[0].close()
    async with asyncio.timeout(10):  # a slot is free again once the server has seen the close
        while True:
            try:
                async with connect(url):
                    break
            except InvalidStatus as exc:
                assert exc.response.status_code == 429
                await asyncio.sleep(0.05)
    for ws in open_[1:]:
        await ws.close()


async def test_revoked_and_expired_tokens_close_live_sockets(
    strict_server: Server, engine: AsyncEngine, make_token: MakeToken
) -> None:
    async with engine.connect() as conn:
        token_id, raw = await store.create_token(conn, user_name=unique("rev"), ttl=None)
        short_id, short = await store.create_token(conn, user_name=unique("short"), ttl=timedelta(hours=1))
    room = strict_server.ws(f"/rooms/{unique('r')}/ws")
    revoked = await RoomClient.open(room, raw)
    expiring = await RoomClient.open(room, short)
    bystander = await RoomClient.open(room, await make_token())
    for client in (revoked, expiring, bystander):
        await client.ready()
    async with engine.connect() as conn:
        await store.revoke_tokens(conn, token_ids=[token_id])
        # Expire the other one now, after every join: a short lifetime would race the joins.
        await conn.execute(text("UPDATE tokens SET expires_at = now() WHERE id = :id"), {"id": short_id})
        await conn.commit()
    assert await revoked.wait_closed(timeout=10) == 4001
    assert revoked.ws.close_reason == "token revoked"
    assert await expiring.wait_closed(timeout=10) == 4001
    assert expiring.ws.close_reason == "token expired"
    await bystander.send("still here")  # everyone else is untouched
    await bystander.until("ack")
    await bystander.close()
    TALLY["live sockets closed for a revoked or expired token"] += 2


async def test_flood_is_throttled_then_closed_while_others_carry_on(
    strict_server: Server, make_token: MakeToken
) -> None:
    room = strict_server.ws(f"/rooms/{unique('r')}/ws")
    flooder = await RoomClient.open(room, await make_token())
    calm = await RoomClient.open(room, await make_token())
    await flooder.ready()
    await calm.ready()
    flood_sent = 0
    started = time.monotonic()
    try:
        for i in range(2000):  # far over 10/s with a burst of 30
            await flooder.send(f"flood {i}")
            flood_sent += 1
    except ConnectionClosed:
        pass
    assert await flooder.wait_closed(timeout=10) == 4029
    elapsed = time.monotonic() - started
    limited = [f for f in flooder.frames if f["type"] == "error" and f["code"] == "rate_limited"]
    assert limited and all(f["retry_after"] > 0 for f in limited)
    stored = [f for f in flooder.frames if f["type"] == "ack"]
    assert len(stored) <= 30 + 10 * elapsed + 1  # the burst and the refill (10/s), never the flood
    # The calm client, in the same room and process, is served throughout.
    for i in range(5):
        await calm.send(f"calm {i}", client_id=f"calm-{i}")
        last = await calm.until("ack", client_id=f"calm-{i}")
    await calm.until_seq(last["seq"])
    assert [b for b in calm.bodies() if b.startswith("calm")] == [f"calm {i}" for i in range(5)]
    await calm.close()
    TALLY["flood frames sent"] += flood_sent
    TALLY["refused: rate_limited"] += len(limited)
    TALLY["closed: 4029 flood"] += 1


async def test_hostile_payloads_are_stored_exactly_or_refused(server_a: Server, make_token: MakeToken) -> None:
    room = server_a.ws(f"/rooms/{unique('r')}/ws")
    payloads = {
        "quotes": "it's \"quoted\" `back` '; DROP TABLE messages; --",
        "backslashes": "C:\\path\\to\\\\share \\n not a newline \\u0000",
        # emoji with skin tones and ZWJ sequences
        "emoji": "\U0001f642\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467"
        " \U0001f3f3\ufe0f\u200d\U0001f308",
        "rtl": "\u202eevil\u202c and \u200f\u05e9\u05dc\u05d5\u05dd\u200e \u0645\u0631\u062d\u0628\u0627",
        "html": "<img src=x onerror=alert(1)><script>alert(2)</script>",
        "7,999 bytes": "x" * 7999,
        "8,000 bytes": "x" * 8000,
        "16,384 bytes of 4-byte chars": "😀" * 4096,
    }
    refused = {
        "NUL": ("a\x00b", "invalid_text"),
        "100,000 bytes": ("x" * 100_000, "too_large"),
        "16,385 bytes": ("x" * 16_385, "too_large"),
    }
    async with (
        await RoomClient.open(room, await make_token()) as sender,
        await RoomClient.open(room, await make_token()) as reader,
    ):
        await sender.ready()
        await reader.ready()
        for name, body in payloads.items():
            await sender.send(body, client_id=name[:60])
            assert (await sender.until("ack", client_id=name[:60]))["seq"] > 0
        for name, (body, code) in refused.items():
            await sender.send(body, client_id=name)
            assert (await sender.until("error", client_id=name))["code"] == code, name
            TALLY[f"refused: {code}"] += 1
        await reader.until_seq(len(payloads))
        assert reader.bodies() == list(payloads.values())  # byte for byte, in order
    TALLY["hostile payloads stored and delivered exactly"] += len(payloads)


async def test_room_names_are_checked(server_a: Server, make_token: MakeToken) -> None:
    token = await make_token()
    for name in ("it's", "a\\b", "%00", "🙂", "\u202eevil", "x" * 65, "..", "_hidden"):
        status, reason = await refusal(server_a.ws(f"/rooms/{quote(name, safe='')}/ws?token={token}"))
        assert (status, reason.startswith("invalid room name")) in ((400, True), (404, False)), name
        TALLY["refused: invalid room name"] += 1


async def test_integers_beyond_bigint_get_an_error_frame(server_a: Server, make_token: MakeToken) -> None:
    """Issue 14 item 4: `{"type":"history","before":2**63}` logged a traceback and dropped the
    socket with no close frame. Every integer is bounded; the socket carries on."""
    async with await RoomClient.open(server_a.ws(f"/rooms/{unique('r')}/ws"), await make_token()) as client:
        await client.ready()
        for frame in (
            {"type": "history", "before": 2**63},
            {"type": "history", "before": 1, "limit": 2**63},
            {"type": "history", "before": 2**64 + 1},
            {"type": "history", "before": 10**400},
            {"type": "history", "before": -(2**63) - 1},
        ):
            await client.ws.send(json.dumps(frame))
            error = await client.until("error")
            assert error["code"] == "invalid_frame" and error["detail"].split(":")[0] in ("before", "limit"), error
            await client.ws.send(json.dumps({"type": "ping"}))
            await client.until("pong")  # still served
        await client.ws.send(json.dumps({"type": "history", "before": 2**63 - 1, "limit": 2**63 - 1}))
        assert (await client.until("history"))["messages"] == []  # the largest bigints are fine
    assert "Traceback" not in server_a.log()


# --- fuzzing ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(database_url: str, tmp_root: Path) -> Iterator[Server]:
    server = Server(database_url, tmp_root)  # generous rate limits: thousands of frames
    yield server
    server.stop()


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=10,
    )


TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)  # any encodable text
CONTROL = st.text(alphabet=st.characters(codec="utf-8", categories=["Cc", "Cf", "Zl", "Zp"]), min_size=1, max_size=60)
# The edges of every integer type a client could aim at: int32, float53, bigint and beyond.
EDGES = [0, -1, 1, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**30, -(10**30)]
INTEGERS = st.one_of(st.integers(), st.sampled_from(EDGES), st.integers(min_value=2**62, max_value=2**66))
FRAME_TYPES = ["send", "history", "ping", "typing", "shout", "", "SEND"]
FRAMES: st.SearchStrategy[str | bytes] = st.one_of(
    TEXT,  # mostly not JSON at all
    st.binary(max_size=300),
    TEXT.map(lambda t: '{"type": "send", "body": ' + t),  # broken JSON
    _json_values().map(json.dumps),
    st.fixed_dictionaries(
        {"type": st.sampled_from(FRAME_TYPES)},
        optional={
            "body": st.one_of(TEXT, CONTROL, INTEGERS, st.none(), st.lists(INTEGERS, max_size=2)),
            "client_id": st.one_of(st.text(max_size=70), CONTROL, INTEGERS),
            "before": st.one_of(INTEGERS, st.text(max_size=5), st.floats()),
            "limit": INTEGERS,
            "author": st.text(max_size=10),
        },
    ).map(json.dumps),
    # Each frame type with only integer fields at their edges.
    st.builds(lambda b, n: json.dumps({"type": "history", "before": b, "limit": n}), INTEGERS, INTEGERS),
    st.builds(lambda t: json.dumps({"type": t}), st.sampled_from(FRAME_TYPES)),
    st.builds(lambda body: json.dumps({"type": "send", "body": body}), CONTROL),  # control characters
    CONTROL,
    st.builds(lambda body: json.dumps({"type": "send", "body": body}), TEXT),  # mostly valid sends
    st.integers(min_value=16_000, max_value=120_000).map(lambda n: json.dumps({"type": "send", "body": "y" * n})),
)
# /socket: every frame names its room. The placeholders become, per example, the room the socket
# subscribed to first (a bystander watches it) and a fresh second room the frames may subscribe to.
ROOM, OTHER = "@ROOM@", "@OTHER@"
BAD_ROOMS = st.one_of(
    CONTROL,
    INTEGERS,
    st.none(),
    st.sampled_from(["", "_hidden", "_chapter", "..", "x" * 65, "a b", "é"]),
    st.text(max_size=70).filter(lambda t: not socket_frames.ROOM_NAME.fullmatch(t)),
)
ROOMS = st.one_of(st.sampled_from([ROOM, ROOM, ROOM, OTHER]), BAD_ROOMS)
SOCKET_FRAME_TYPES = ["subscribe", "unsubscribe", "send", "history", "typing", "ping", "shout", "", "SEND"]
SOCKET_FRAMES: st.SearchStrategy[str | bytes] = st.one_of(
    TEXT,
    st.binary(max_size=300),
    TEXT.map(lambda t: '{"type": "subscribe", "room": ' + t),  # broken JSON
    _json_values().map(json.dumps),
    CONTROL,
    st.fixed_dictionaries(
        {"type": st.sampled_from(SOCKET_FRAME_TYPES)},
        optional={
            "room": ROOMS,
            "body": st.one_of(TEXT, CONTROL, INTEGERS, st.none()),
            "client_id": st.one_of(st.text(max_size=70), CONTROL, INTEGERS),
            "before": st.one_of(INTEGERS, st.text(max_size=5), st.floats()),
            "limit": INTEGERS,
            "after": st.one_of(INTEGERS, st.text(max_size=5), st.none()),
        },
    ).map(json.dumps),
    # Each frame type, well formed but for its values: rooms and integers at their edges.
    st.builds(lambda r, a: json.dumps({"type": "subscribe", "room": r, "after": a}), ROOMS, INTEGERS),
    st.builds(lambda r: json.dumps({"type": "subscribe", "room": r}), ROOMS),
    st.builds(lambda r: json.dumps({"type": "unsubscribe", "room": r}), ROOMS),
    st.builds(
        lambda r, b, n: json.dumps({"type": "history", "room": r, "before": b, "limit": n}), ROOMS, INTEGERS, INTEGERS
    ),
    st.builds(lambda r: json.dumps({"type": "typing", "room": r}), ROOMS),
    st.builds(lambda t: json.dumps({"type": t}), st.sampled_from(SOCKET_FRAME_TYPES)),
    st.builds(lambda r, b: json.dumps({"type": "send", "room": r, "body": b}), ROOMS, CONTROL),  # control characters
    st.builds(lambda r, b: json.dumps({"type": "send", "room": r, "body": b}), ROOMS, TEXT),  # mostly valid sends
    st.integers(min_value=16_000, max_value=120_000).map(
        lambda n: json.dumps({"type": "send", "room": ROOM, "body": "y" * n})
    ),
)
REFUSAL_CODES = {
    "invalid_json", "invalid_frame", "unknown_type", "too_large", "empty", "invalid_text", "binary_not_supported",
}  # fmt: skip
# /socket's own refusals, each naming the room (README "One socket for many rooms").
SOCKET_REFUSAL_CODES = {"invalid_room", "not_subscribed", "already_subscribed", "too_many_rooms"}


@dataclass(frozen=True)
class SocketRoute:
    """A socket route as the fuzzing drives it."""

    path: str  # URL template
    frames: st.SearchStrategy[str | bytes]
    answers: frozenset[str]  # the frame types that answer a client's frame
    refusals: frozenset[str]  # the error codes a hostile frame may get
    multiplexed: bool  # joins rooms by `subscribe` frames, every frame naming its room


# Both socket routes, fuzzed with the same checks.
SOCKET_ROUTES = {
    "room socket": SocketRoute(
        "/rooms/{room}/ws", FRAMES, frozenset({"ack", "error", "pong", "history"}), frozenset(REFUSAL_CODES), False
    ),
    "/socket": SocketRoute(
        "/socket",
        SOCKET_FRAMES,
        frozenset({"ack", "error", "pong", "history", "ready", "unsubscribed"}),
        frozenset(REFUSAL_CODES | SOCKET_REFUSAL_CODES),
        True,
    ),
}


def _object(frame: str | bytes) -> dict[str, Any] | None:
    """The frame as a JSON object, if it is one."""
    try:
        value = json.loads(frame) if isinstance(frame, str) else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _silent(frame: str | bytes, subscribed: set[str], route: SocketRoute) -> bool:
    """A valid typing frame is answered by nothing (it goes to the others, throttled); on
    /socket only when it names a room the socket is subscribed to."""
    value = _object(frame)
    if route.multiplexed:
        return (
            value is not None
            and value.keys() == {"type", "room"}
            and value["type"] == "typing"
            and (value["room"] in subscribed)
        )
    return value == {"type": "typing"}


async def _answer(ws: ClientConnection, answers: frozenset[str]) -> dict[str, Any]:
    """The next answer to a frame; room traffic in between (messages, presence, replays) is skipped."""
    while True:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 15))
        if frame["type"] in answers:
            return frame


async def _fuzz_once(
    server: Server, name: str, token: str, watcher_token: str, frames: list[str | bytes], database_url: str
) -> None:
    route = SOCKET_ROUTES[name]
    room, other = unique("fuzz"), unique("fuzz")
    observer = await RoomClient.open(server.ws(f"/rooms/{room}/ws"), watcher_token)  # the bystander
    await observer.ready()
    acked: dict[str, list[int]] = {room: [], other: []}  # new seqs acked, per room
    subscribed: set[str] = set()
    async with connect(
        server.ws(route.path.format(room=room)), additional_headers={"Cookie": f"session={token}"}, max_size=None
    ) as ws:
        if route.multiplexed:
            await ws.send(json.dumps({"type": "subscribe", "room": room}))
            ready = await _answer(ws, route.answers)
            assert (ready["type"], ready["room"]) == ("ready", room), ready
        else:
            while json.loads(await ws.recv())["type"] != "ready":
                pass
        subscribed.add(room)
        for raw in frames:
            frame = raw.replace(ROOM, room).replace(OTHER, other) if isinstance(raw, str) else raw
            sent = _object(frame) or {}
            await ws.send(frame)
            TALLY["fuzz frames"] += 1
            TALLY[f"fuzz frames on {name}"] += 1
            if _silent(frame, subscribed, route):  # nothing comes back; a ping right after proves no error did either
                await ws.send(json.dumps({"type": "ping"}))
                assert (await _answer(ws, route.answers))["type"] == "pong"
                TALLY["fuzz: typing"] += 1
                TALLY[f"fuzz on {name}: silent typing"] += 1
                continue
            answer = await _answer(ws, route.answers)  # every other frame gets exactly one answer
            TALLY[f"fuzz on {name}: {answer['type']}"] += 1
            # The answer is this frame's (a second answer to an earlier frame would not match it).
            if route.multiplexed and "room" in answer:
                assert answer["room"] == sent.get("room"), (frame, answer)
            if "client_id" in answer:
                assert answer["client_id"] == sent.get("client_id"), (frame, answer)
            if answer["type"] == "pong":
                assert sent.get("type") == "ping", (frame, answer)
            if answer["type"] == "ack":
                assert sent.get("type") == "send", (frame, answer)
                acked_room = answer.get("room", room)
                if answer["duplicate"]:  # a resend of a client_id: nothing new was stored
                    assert answer["seq"] in acked[acked_room], (frame, answer)
                else:
                    acked[acked_room].append(answer["seq"])
                TALLY["fuzz: stored"] += 1
            elif answer["type"] == "error":
                assert answer["code"] in route.refusals, answer
                assert answer["detail"] and "Traceback" not in answer["detail"]
                TALLY[f"refused: {answer['code']}"] += 1
                TALLY["fuzz: refused"] += 1
            else:
                if answer["type"] == "ready":
                    subscribed.add(answer["room"])
                elif answer["type"] == "unsubscribed":
                    subscribed.discard(answer["room"])
                TALLY[f"fuzz: {answer['type']}"] += 1
        # Nothing answered twice: the next answer after the last frame's is this ping's.
        await ws.send(json.dumps({"type": "ping"}))
        assert (await _answer(ws, route.answers))["type"] == "pong"
    for name_, seqs in acked.items():
        assert seqs == list(range(1, len(seqs) + 1)), (name_, seqs)
    if acked[room]:
        await observer.until_seq(acked[room][-1])
    assert observer.seqs() == acked[room]  # the bystander saw exactly what was stored, in order
    await observer.close()
    conn = await asyncpg.connect(libpq_url(database_url))
    try:
        for name_, seqs in acked.items():
            rows = await conn.fetchval(
                "SELECT count(*) FROM messages JOIN rooms ON rooms.id = room_id WHERE name = $1", name_
            )
            assert rows == len(seqs), name_  # no refused frame left a row
    finally:
        await conn.close()


@pytest.mark.parametrize("route", list(SOCKET_ROUTES))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzzed_frames_get_clear_errors_and_change_nothing(
    fuzz_server: Server, database_url: str, route: str, data: st.DataObject
) -> None:
    """Both socket routes: every frame is answered exactly once (a valid typing frame provably
    not at all), the room holds exactly the acked messages and a bystander sees exactly them."""
    frames = data.draw(st.lists(SOCKET_ROUTES[route].frames, min_size=40, max_size=80), label="frames")
    token, watcher = create_token(database_url), create_token(database_url)
    asyncio.run(_fuzz_once(fuzz_server, route, token, watcher, frames, database_url))


QUERY_VALUES = st.one_of(INTEGERS.map(str), TEXT, CONTROL, st.floats().map(str), st.just(""))
API_PATHS = ["/api/rooms", "/api/rooms/{room}/messages", "/api/rooms/{room}/search", "/api/rooms/{name}/messages"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.sampled_from(API_PATHS),
    name=st.one_of(TEXT, CONTROL, INTEGERS.map(str)),
    params=st.dictionaries(
        st.sampled_from(["before", "after", "limit", "offset", "q", "token", "x"]), QUERY_VALUES, max_size=4
    ),
)
def test_fuzzed_api_requests_get_clear_answers(
    fuzz_server: Server, database_url: str, path: str, name: str, params: dict[str, str]
) -> None:
    """The HTTP API with the same integer extremes and control characters: a status with a
    reason for each, never a 500."""
    token = create_token(database_url)
    room = unique("api")
    with httpx.Client(base_url=fuzz_server.http, headers={"Authorization": f"Bearer {token}"}) as http:
        # A room that exists, so that bounds are reached past the 404.
        with connect_sync(fuzz_server.ws(f"/rooms/{room}/ws?token={token}")):
            pass
        url = path.format(room=room, name=quote(name, safe="") or "x")
        response = http.get(url, params=params)
    assert response.status_code in (200, 400, 404, 422, 429, 503), (url, params, response.text)
    body = response.json()
    if response.status_code != 200:
        assert body["detail"], body
    TALLY[f"api fuzz: {response.status_code}"] += 1


def test_fuzz_server_survived(fuzz_server: Server) -> None:
    assert fuzz_server.proc.poll() is None
    assert httpx.get(f"{fuzz_server.http}/readyz").status_code == 200
    log = fuzz_server.log()
    TALLY["crashes"] += log.count("Traceback") + log.count("Exception in ASGI")
    assert "Traceback" not in log and "Exception in ASGI" not in log


def test_frames_over_the_hard_limit_close_with_1009(fuzz_server: Server, database_url: str) -> None:
    token = create_token(database_url)

    async def run() -> int | None:
        async with connect(
            fuzz_server.ws(f"/rooms/{unique('r')}/ws"), additional_headers={"Cookie": f"session={token}"}, max_size=None
        ) as ws:
            await ws.send(json.dumps({"type": "send", "body": "z" * 300_000}))
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            except ConnectionClosed:
                return ws.close_code

    assert asyncio.run(run()) == 1009
    TALLY["closed: 1009 frame too big"] += 1


# --- attacks at once ------------------------------------------------------------------------------


async def test_a_calm_user_is_served_under_the_attacks_of_items_1_2_and_7_at_once(
    database_url: str, tmp_root: Path, engine: AsyncEngine, make_token: MakeToken
) -> None:
    """Issue 14's done-means: one process under history amplification (item 1: control-character
    bodies, history asked on sockets that never read, and HTTP pages), replay hogs (item 2: 30
    sockets of one user joining a big room with after=0, not reading) and the echo attack (item 7:
    40 foreign-origin sockets and 40 from one address) at the same time. A calm user joins 20
    times with join p99 under 1 s (README's documented bound, not a speed claim), every send of
    theirs is acked, and the process grows by < 128 MB."""
    # The echo closes a socket silent for 1 s: an attacker that never reads its echoes is stuck
    # behind them, and is cut off by that rather than after the default 60 s.
    server = Server(database_url, tmp_root, limits=DEFAULT_LIMITS, env={"CHAT_ECHO_IDLE_SECONDS": "1"})
    try:
        big, amp = unique("big"), unique("amp")
        await fill_room(engine, big, count=20_000, body="y" * 1000)
        await fill_room(engine, amp, count=200, body="\x01" * 16000)
        hog, amplifier, calm = await make_token(), await make_token(), await make_token()
        memory = PeakRss(server.proc.pid)
        hogs = await replay_hogs(server, big, hog)
        try:
            amplification = asyncio.gather(
                history_socket_attack(server, amp, amplifier), history_http_attack(server, amp, amplifier)
            )
            echo = await echo_attack(server, cap=8)  # CHAT_ECHO_CONNECTIONS_PER_ADDRESS's default
            joins: list[float] = []
            for i in range(20):
                started = time.monotonic()
                async with await RoomClient.open(server.ws(f"/rooms/{big}/ws"), calm) as user:
                    await user.ready()
                    joins.append(time.monotonic() - started)
                    await user.send(f"calm {i}", client_id=f"calm-{i}")
                    assert (await user.until("ack", client_id=f"calm-{i}", timeout=15))["seq"] > 20_000
            _, statuses = await amplification
            await echo
        finally:
            for ws in hogs:
                ws.transport.abort()
        growth = await memory.stop()
        assert 429 in statuses  # the amplifier's HTTP pages were rate limited meanwhile
        assert growth < 128, f"the server grew by {growth:.0f} MB"
        assert "Traceback" not in server.log()
    finally:
        server.stop()
    TALLY["under attacks 1, 2, 7: growth MB"] = round(growth)
    TALLY["under attacks 1, 2, 7: calm join p99 ms"] = round(max(joins) * 1000)
    in_order = [round(j * 1000) for j in joins]
    joins.sort()
    print(
        f"\ncalm joins under attacks 1, 2 and 7 (ms, in order): {in_order}; median {joins[10] * 1000:.0f} ms,"
        f" p99 (max of 20) {joins[-1] * 1000:.0f} ms; the process grew by {growth:.0f} MB"
    )
    # The bound is for a machine that is not itself overloaded: on a shared box with several
    # loads per core, the test's own clients (in one process with the attackers) wait for CPU.
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    if joins[-1] >= 1.0 and load > 1.5:
        pytest.xfail(f"join p99 {joins[-1]:.2f} s with the machine at {load:.1f} loads per core")
    assert joins[-1] < 1.0, joins


# --- tokens never reach a log ---------------------------------------------------------------------


def test_tokens_never_reach_the_logs(database_url: str, tmp_root: Path) -> None:
    """A session with the token in every place it can travel; then grep every log for it."""
    server = Server(database_url, tmp_root, env={"CHAT_ALLOWED_ORIGINS": "https://good.example"})
    token = create_token(database_url)
    bad = "chat_" + "Q" * 43  # a well-formed token that does not exist

    async def session() -> None:
        cookie = {"Cookie": f"session={token}"}
        for url in (
            server.ws(f"/rooms/general/ws?token={token}"),
            server.ws(f"/items/foo/ws?token={token}&q=1"),
            server.ws(f"/ws/42?token={token}"),
            # Percent-encoded name and value (issue 14 item 11): the server decodes both.
            server.ws(f"/rooms/general/ws?tok%65n={token.replace('_', '%5F')}"),
        ):
            async with connect(url) as ws:
                await ws.send(json.dumps({"type": "ping"}))
                await ws.recv()
        async with connect(server.ws("/rooms/general/ws"), additional_headers=cookie):
            pass
        for url in (server.ws(f"/rooms/general/ws?token={bad}"), server.ws(f"/rooms/_x/ws?token={token}")):
            try:
                async with connect(url):
                    pass
            except InvalidStatus:
                pass
        try:
            async with connect(server.ws(f"/rooms/general/ws?token={token}"), origin=Origin("https://evil.example")):
                pass
        except InvalidStatus:
            pass
        async with httpx.AsyncClient(base_url=server.http) as http:
            await http.post("/api/session", json={"token": token})
            await http.get("/api/me")
            await http.get(f"/healthz?token={token}")
            await http.get(f"/nowhere?token={token}")
            await http.post("/api/session", json={"token": bad})

    try:
        asyncio.run(session())
    finally:
        server.stop()
    log = server.log()
    assert "WebSocket /rooms/general/ws?token=[redacted]" in log  # the handshakes were logged
    for secret in (token, bad, token[5:25]):
        assert secret not in log
    TALLY["log lines checked for tokens"] += len(log.splitlines())


def test_zz_report(capsys: pytest.CaptureFixture[str]) -> None:
    """The numbers for the closing note (runs last in this module), shown in CI's output; and
    the tally itself must show that the module's checks really ran and found nothing let in."""
    with capsys.disabled():
        print("\nsecurity tally:", json.dumps(dict(sorted(TALLY.items())), indent=1))
    if not TALLY:
        pytest.skip("nothing to report: the module's other tests did not run")
    assert TALLY["unauthenticated accepts"] == 0
    assert TALLY["crashes"] == 0
    if TALLY["closed: 4029 flood"]:
        assert TALLY["refused: rate_limited"] > 0  # throttled before it was closed
    if TALLY["fuzz frames"]:  # every fuzzed frame got exactly one answer (typing: none, shown by a ping)
        answered = sum(n for key, n in TALLY.items() if key.startswith("fuzz: ") and key != "fuzz: refused")
        assert TALLY["fuzz frames"] == answered + TALLY["fuzz: refused"]
