"""The history API over HTTP, against a real server: auth, pages at their boundaries, search, and
the query plans (EXPLAIN ANALYZE on a room of 100,000 messages)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chat import db, store
from chat.config import libpq_url
from chat.db import statements_sent
from tests.conftest import MakeToken, unique
from tests.roomclient import RoomClient
from tests.servers import Server

BIG = 100_000


async def make_room(engine: AsyncEngine, bodies: list[str], name: str | None = None) -> str:
    """A room holding these messages (seq 1, 2, …), written with plain SQL like any client."""
    name = name or unique("h")
    async with engine.begin() as conn:
        room_id = await conn.scalar(text("INSERT INTO rooms (name) VALUES (:n) RETURNING id"), {"n": name})
        if bodies:
            await conn.execute(
                text("INSERT INTO messages (room_id, author, body) VALUES (:r, 'bot', :b)"),
                [{"r": room_id, "b": b} for b in bodies],
            )
    return name


async def scoped_token(engine: AsyncEngine, rooms: list[str]) -> str:
    async with engine.connect() as conn:
        _, raw = await store.create_token(conn, user_name=unique("scoped"), ttl=None, rooms=rooms)
    return raw


@pytest.fixture(scope="module")
async def token(make_token: MakeToken) -> str:
    return await make_token()


@pytest.fixture
async def api(server_a: Server, token: str) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=f"{server_a.http}/api", headers=headers, timeout=30) as client:
        yield client


async def page(api: httpx.AsyncClient, room: str, **params: Any) -> tuple[list[int], bool]:
    response = await api.get(f"/rooms/{room}/messages", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    return [m["seq"] for m in body["messages"]], body["has_more"]


# --- auth -------------------------------------------------------------------------------------


async def test_auth_header_cookie_or_query(server_a: Server, engine: AsyncEngine, make_token: MakeToken) -> None:
    room = await make_room(engine, ["hi"])
    url = f"{server_a.http}/api/rooms/{room}/messages"
    raw = await make_token()
    expired = await make_token(ttl=timedelta(seconds=-1))
    async with httpx.AsyncClient(timeout=30) as http:

        async def refusal(**kwargs: Any) -> tuple[int, str]:
            response = await http.get(url, **kwargs)
            return response.status_code, response.json()["detail"]

        assert await refusal() == (401, "missing token")
        assert await refusal(headers={"Authorization": "Bearer chat_bogus"}) == (401, "invalid token")
        assert await refusal(headers={"Authorization": f"Bearer {expired}"}) == (401, "token expired")
        assert await refusal(params={"token": "some-key-token"}) == (401, "invalid token")
        assert await refusal(headers={"Authorization": f"Basic {raw}"}) == (401, "missing token")
        for kwargs in (
            {"headers": {"Authorization": f"Bearer {raw}"}},
            {"headers": {"Cookie": f"session={raw}"}},
            {"params": {"token": raw}},
        ):
            response = await http.get(url, **kwargs)  # type: ignore[arg-type]
            assert response.status_code == 200, kwargs
            assert [m["body"] for m in response.json()["messages"]] == ["hi"]
        # The header wins over a bad cookie; a cookie from another site is refused (browsers send
        # cookies on their own), a header is not (only a holder of the token can send it).
        evil = {"Origin": "http://evil.example"}
        bad_cookie = {"Cookie": "session=chat_bogus"}
        assert (await http.get(url, headers={"Authorization": f"Bearer {raw}", **bad_cookie})).status_code == 200
        assert await refusal(headers={"Cookie": f"session={raw}", **evil}) == (403, "origin not allowed")
        assert (await http.get(url, headers={"Authorization": f"Bearer {raw}", **evil})).status_code == 200
        same_origin = {"Origin": server_a.http, "Cookie": f"session={raw}"}
        assert (await http.get(url, headers=same_origin)).status_code == 200
        # Auth comes before parameter checks: no hints for the unauthenticated.
        assert await refusal(params={"limit": "x"}) == (401, "missing token")


async def test_scoped_token_sees_only_its_rooms(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    mine, theirs = await make_room(engine, ["mine"]), await make_room(engine, ["theirs zebra"])
    raw = await scoped_token(engine, [mine, unique("never-created")])
    headers = {"Authorization": f"Bearer {raw}"}
    listed = (await api.get("/rooms", headers=headers)).json()
    assert listed == [{"name": mine, "last_seq": 1}]
    assert (await api.get(f"/rooms/{mine}/messages", headers=headers)).status_code == 200
    for path in (f"/rooms/{theirs}/messages", f"/rooms/{theirs}/search?q=zebra", "/rooms/nowhere/messages"):
        response = await api.get(path, headers=headers)
        assert (response.status_code, response.json()) == (404, {"detail": "no such room"}), path
    # The unscoped token sees the other room: it exists, the scoped token just may not use it.
    assert (await api.get(f"/rooms/{theirs}/messages")).status_code == 200


# --- rooms ------------------------------------------------------------------------------------


async def test_room_list(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    prefix = unique("list")
    names = [await make_room(engine, ["x"] * i, name=f"{prefix}-{i}") for i in range(3)]
    hidden = await make_room(engine, ["internal"], name=f"_{prefix}")
    everything: list[dict[str, Any]] = []
    after: str | None = None
    while True:  # page through all of them (other tests' rooms too), 25 at a time
        params: dict[str, Any] = {"limit": 25} | ({"after": after} if after else {})
        rooms = (await api.get("/rooms", params=params)).json()
        everything += rooms
        if len(rooms) < 25:
            break
        after = rooms[-1]["name"]
    listed = [r["name"] for r in everything]
    assert len(set(listed)) == len(listed)  # no room twice, none skipped (below)
    assert [r for r in everything if r["name"].startswith(prefix)] == [
        {"name": name, "last_seq": i} for i, name in enumerate(names)
    ]
    assert hidden not in listed and not any(n.startswith("_") for n in listed)
    assert (await api.get(f"/rooms/{hidden}/messages")).status_code == 404
    for limit in (0, 501):
        assert (await api.get("/rooms", params={"limit": limit})).status_code == 422
    assert (await api.get("/rooms", params={"after": "a\x00b"})).status_code == 422


# --- pages ------------------------------------------------------------------------------------


async def test_pages_at_the_boundaries(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    room = await make_room(engine, [f"m{i}" for i in range(1, 6)])  # seqs 1..5
    assert await page(api, room) == ([1, 2, 3, 4, 5], False)
    assert await page(api, room, limit=2) == ([4, 5], True)
    assert await page(api, room, before=1) == ([], False)
    assert await page(api, room, before=2) == ([1], False)
    assert await page(api, room, before=4, limit=2) == ([2, 3], True)
    assert await page(api, room, before=3, limit=2) == ([1, 2], False)
    assert await page(api, room, before=10**6) == ([1, 2, 3, 4, 5], False)
    assert await page(api, room, after=0, limit=2) == ([1, 2], True)
    assert await page(api, room, after=3, limit=2) == ([4, 5], False)
    assert await page(api, room, after=5) == ([], False)
    assert await page(api, room, after=10**6) == ([], False)
    both = await api.get(f"/rooms/{room}/messages", params={"before": 3, "after": 1})
    assert (both.status_code, both.json()) == (400, {"detail": "give before or after, not both"})
    for bad in ({"limit": 0}, {"before": 0}, {"after": -1}, {"before": 2**63}, {"limit": "many"}):
        assert (await api.get(f"/rooms/{room}/messages", params=bad)).status_code == 422, bad
    for missing in (unique("nope"), "_chapter", "bad%20name"):
        response = await api.get(f"/rooms/{missing}/messages")
        assert (response.status_code, response.json()) == (404, {"detail": "no such room"}), missing


async def test_limit_is_clamped_and_pages_walk_the_whole_room(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    room = await make_room(engine, [f"m{i}" for i in range(1, 451)])
    seqs, more = await page(api, room, limit=10**9)  # clamped to CHAT_HISTORY_PAGE_MAX (200)
    assert (seqs, more) == (list(range(251, 451)), True)
    backwards: list[int] = []
    before: int | None = None
    while True:
        seqs, more = await page(api, room, limit=64, **({"before": before} if before else {}))
        backwards = seqs + backwards
        if not more:
            break
        before = seqs[0]
    forwards: list[int] = []
    after = 0
    while True:
        seqs, more = await page(api, room, limit=64, after=after)
        forwards += seqs
        if not more:
            break
        after = seqs[-1]
    assert backwards == forwards == list(range(1, 451))


async def test_messages_are_the_sockets_frames(server_a: Server, api: httpx.AsyncClient, token: str) -> None:
    room = unique("same")
    async with await RoomClient.open(server_a.ws(f"/rooms/{room}/ws"), token) as client:
        await client.ready()
        await client.send("one", client_id="c-1")
        await client.send('two <b>"quoted"</b> ✓')
        await client.until_seq(2)
        frames = [f for f in client.frames if f["type"] == "message"]
    body = (await api.get(f"/rooms/{room}/messages")).json()
    assert body == {"room": room, "messages": frames, "has_more": False}


# --- search -----------------------------------------------------------------------------------


async def search(api: httpx.AsyncClient, room: str, q: str, **params: Any) -> dict[str, Any]:
    response = await api.get(f"/rooms/{room}/search", params={"q": q, **params})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def test_search_ranks_and_pages(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    word = unique("zebra").replace("-", "")
    bodies = [f"a {word} here", "nothing", f"{word} and {word} again", f"{word.upper()} shouted", f"no {word}s"]
    room = await make_room(engine, bodies)
    elsewhere = await make_room(engine, [f"{word} {word} {word} elsewhere"])
    found = await search(api, room, word)
    results = found["results"]
    # Twice ranks above once; equal ranks come newest first; case does not matter; whole words only.
    assert [r["seq"] for r in results] == [3, 4, 1]
    assert results[0]["rank"] > results[1]["rank"] == results[2]["rank"] > 0
    assert {r["room"] for r in results} == {room} and found["has_more"] is False
    assert {k: v for k, v in results[0].items() if k != "rank"} == (
        await api.get(f"/rooms/{room}/messages", params={"after": 2, "limit": 1})
    ).json()["messages"][0]
    first = await search(api, room, word, limit=2)
    second = await search(api, room, word, limit=2, offset=2)
    assert [r["seq"] for r in first["results"]] == [3, 4] and first["has_more"] is True
    assert [r["seq"] for r in second["results"]] == [1] and second["has_more"] is False
    assert (await search(api, room, word, offset=3))["results"] == []
    assert [r["seq"] for r in (await search(api, elsewhere, word))["results"]] == [1]
    # Web-search syntax: a phrase, an exclusion, or.
    assert [r["seq"] for r in (await search(api, room, f'"{word} here"'))["results"]] == [1]
    assert [r["seq"] for r in (await search(api, room, f"{word} -shouted"))["results"]] == [3, 1]
    assert [r["seq"] for r in (await search(api, room, f"nothing or {word}s"))["results"]] == [5, 2]


async def test_search_input_is_safe(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    room = await make_room(engine, ["it's a (test) & more", 'O\'Reilly: 100% "quoted" \\ back|slash'])
    for q in ("'", '"', '"unclosed', "(", "a & b | !c", "test:*", "'); DROP TABLE messages; --", "\\", "%", "ünï ✓"):
        assert isinstance((await search(api, room, q))["results"], list), q
    assert [r["seq"] for r in (await search(api, room, "(test)"))["results"]] == [1]
    assert [r["seq"] for r in (await search(api, room, "o'reilly"))["results"]] == [2]
    for blank in ("", "   ", "\t"):
        response = await api.get(f"/rooms/{room}/search", params={"q": blank})
        assert (response.status_code, response.json()["detail"]) == (400, "q is empty: give words to search for")
    response = await api.get(f"/rooms/{room}/search", params={"q": "a\x00b"})
    assert (response.status_code, response.json()["detail"]) == (400, "q may not contain NUL")
    bad_params: list[dict[str, Any]] = [{}, {"q": "x" * 257}, {"q": "a", "limit": 51}, {"q": "a", "limit": 0}]
    for bad in [*bad_params, {"q": "a", "offset": 1001}]:
        assert (await api.get(f"/rooms/{room}/search", params=bad)).status_code == 422, bad
    assert (await api.get(f"/rooms/{unique('nope')}/search", params={"q": "a"})).status_code == 404


async def test_openapi_documents_the_history_api(server_a: Server) -> None:
    async with httpx.AsyncClient() as http:
        schema = (await http.get(f"{server_a.http}/openapi.json")).json()
    paths = schema["paths"]
    for path in ("/api/rooms", "/api/rooms/{room}/messages", "/api/rooms/{room}/search"):
        get = paths[path]["get"]
        assert {"200", "401", "422"} <= set(get["responses"]), path
        assert {next(iter(s)) for s in get["security"]} == {"HTTPBearer", "APIKeyCookie", "APIKeyQuery"}
    assert "404" in paths["/api/rooms/{room}/messages"]["get"]["responses"]
    assert {"Page", "MessageOut", "SearchResults", "Hit", "RoomOut"} <= set(schema["components"]["schemas"])


async def test_docs_pages_are_off_unless_asked_for(server_a: Server, database_url: str, tmp_root: Path) -> None:
    """Issue 14 item 10: /docs and /redoc load unpinned scripts from a CDN on the chat's origin.
    Off by default (the schema stays at /openapi.json); CHAT_API_DOCS=true turns them on."""
    async with httpx.AsyncClient(base_url=server_a.http) as http:
        for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            assert (await http.get(page)).status_code == 404, page
        assert (await http.get("/openapi.json")).status_code == 200
    server = Server(database_url, tmp_root, env={"CHAT_API_DOCS": "true"})
    try:
        async with httpx.AsyncClient(base_url=server.http) as http:
            for page in ("/docs", "/redoc"):
                assert (await http.get(page)).status_code == 200, page
    finally:
        server.stop()


# --- query plans on a big room ----------------------------------------------------------------


@pytest.fixture(scope="module")
async def big_room(engine: AsyncEngine, database_url: str) -> tuple[str, int]:
    """A room of 100,000 messages plus three with a rare word. Inserted 250 rows per transaction:
    each message bumps its room's row, and one transaction piling up 100,000 versions of that row
    gets slower with each insert (minutes instead of seconds)."""
    name = await make_room(engine, [])
    conn = await asyncpg.connect(libpq_url(database_url))
    try:
        room_id = await conn.fetchval("SELECT id FROM rooms WHERE name = $1", name)
        await conn.execute(f"""
            DO $$ BEGIN
                FOR i IN 0..{BIG // 250 - 1} LOOP
                    INSERT INTO messages (room_id, author, body)
                    SELECT {int(room_id)}, 'bot', 'message ' || g FROM generate_series(i * 250 + 1, i * 250 + 250) g;
                    COMMIT;
                END LOOP;
            END $$""")  # fmt: skip
        await conn.execute(
            f"INSERT INTO messages (room_id, author, body) SELECT {int(room_id)}, 'bot', 'a rare needle' "
            "FROM generate_series(1, 3)"
        )
        # Many changes (issue 12): 500 edits made in SQL (each an 'edit' row after the needles) and
        # three users' reactions on the latest 1,000 messages.
        await conn.execute(
            f"UPDATE messages SET body = body || ' (edited)' WHERE room_id = {int(room_id)} AND seq % 200 = 0"
        )
        await conn.execute(
            "INSERT INTO users (name) SELECT 'reactor-' || g FROM generate_series(1, 3) g ON CONFLICT DO NOTHING"
        )
        await conn.execute(
            f"INSERT INTO message_reactions (room_id, seq, emoji, user_id) SELECT {int(room_id)}, s, e, u.id "
            f"FROM generate_series({BIG - 996}, {BIG + 3}) s, unnest(ARRAY['👍', '🎉']) e, users u "
            "WHERE u.name LIKE 'reactor-%'"
        )
        # As autovacuum would: statistics for the planner, and the GIN index's pending list (where
        # fresh entries wait, unsorted) merged into the index proper.
        await conn.execute("VACUUM ANALYZE messages")
    finally:
        await conn.close()
    return name, int(room_id)


Call = Callable[[AsyncConnection], Awaitable[object]]


async def explain(engine: AsyncEngine, call: Call) -> dict[str, Any]:
    """EXPLAIN (ANALYZE) exactly the SELECT that `call` sends, with its parameters."""
    async with engine.connect() as conn:
        async with statements_sent(conn) as sent:
            await call(conn)
        [*_, last] = [s for s in sent if s.sql.lstrip().upper().startswith("SELECT")]
        await conn.rollback()
        [(found,)] = await db.explain(conn, last, "ANALYZE, FORMAT JSON")
    plan: dict[str, Any] = found[0]["Plan"]
    return plan


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def main_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The plan's nodes outside its sub-selects (InitPlans, SubPlans)."""
    yield plan
    for child in plan.get("Plans", []):
        if child.get("Parent Relationship") not in ("InitPlan", "SubPlan"):
            yield from main_nodes(child)


async def test_pages_are_primary_key_range_scans(
    api: httpx.AsyncClient, engine: AsyncEngine, big_room: tuple[str, int]
) -> None:
    name, room_id = big_room
    limit = 51  # what the API asks for a page of 50: one more, for has_more
    pages: dict[str, Call] = {
        "latest": lambda c: store.messages_before(c, room_id=room_id, before=None, limit=limit),
        "before=50": lambda c: store.messages_before(c, room_id=room_id, before=50, limit=limit),
        "after=99000": lambda c: store.messages_after(c, room_id=room_id, after=99_000, limit=limit),
    }
    # Pages by `before` (and the latest) are current state: messages only, through the partial
    # index of messages (changes are not in it), each with its reactions and quote read by
    # primary key in the same statement (SubPlans): one round trip, `limit` index entries.
    indexes = {"latest": "messages_history_idx", "before=50": "messages_history_idx", "after=99000": "messages_pkey"}
    for label, call in pages.items():
        plan = await explain(engine, call)
        types = [n["Node Type"] for n in nodes(plan)]
        scan = next(n for n in main_nodes(plan) if n["Node Type"].endswith("Scan"))
        assert scan["Node Type"] in ("Index Scan", "Index Only Scan"), (label, plan)
        assert scan["Index Name"] == indexes[label], (label, plan)
        assert "Sort" not in types and "Seq Scan" not in types, (label, plan)
        assert scan["Actual Rows"] <= limit, (label, plan)
        for sub in nodes(plan):
            if sub.get("Relation Name") == "message_reactions":
                assert sub["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan"), (label, plan)
    assert await page(api, name) == (list(range(BIG - 46, BIG + 4)), True)
    assert await page(api, name, before=50) == (list(range(1, 50)), False)
    assert await page(api, name, after=99_000) == (list(range(99_001, 99_051)), True)


async def test_search_uses_the_gin_index(
    api: httpx.AsyncClient, engine: AsyncEngine, big_room: tuple[str, int]
) -> None:
    name, room_id = big_room
    plan = await explain(engine, lambda c: store.search_messages(c, room_id=room_id, query="needle", limit=21))
    bitmap = [n for n in nodes(plan) if n["Node Type"] == "Bitmap Index Scan"]
    assert [n["Index Name"] for n in bitmap if n["Index Name"] == "messages_room_search_idx"], plan
    assert "Seq Scan" not in [n["Node Type"] for n in nodes(plan)], plan
    found = await search(api, name, "needle")
    assert [r["seq"] for r in found["results"]] == [BIG + 3, BIG + 2, BIG + 1]
    # A word in every message is cut off by the statement timeout instead of running on.
    with pytest.raises(DBAPIError) as caught:
        async with engine.connect() as conn:
            await store.search_messages(conn, room_id=room_id, query="message", limit=20, timeout_ms=1)
    assert getattr(caught.value.orig, "sqlstate", None) == "57014"


async def test_search_reads_only_its_own_rooms_entries(
    engine: AsyncEngine, database_url: str, big_room: tuple[str, int]
) -> None:
    """Issue 14 item 24: the index filters by room first (btree_gin on (room_id, search)), so a
    search's work, and so its time, does not depend on how common a word is in other rooms."""
    _, room_id = big_room
    other = await make_room(engine, [])
    conn = await asyncpg.connect(libpq_url(database_url))
    try:
        other_id = await conn.fetchval("SELECT id FROM rooms WHERE name = $1", other)
        await conn.execute(
            f"INSERT INTO messages (room_id, author, body) SELECT {int(other_id)}, 'bot', 'needle ' || g "
            "FROM generate_series(1, 3000) g"
        )
        await conn.execute("VACUUM ANALYZE messages")
    finally:
        await conn.close()
    plan = await explain(engine, lambda c: store.search_messages(c, room_id=room_id, query="needle", limit=21))
    scans = [n for n in nodes(plan) if n["Node Type"] == "Bitmap Index Scan"]
    assert [n["Index Name"] for n in scans] == ["messages_room_search_idx"], plan
    assert "room_id" in scans[0]["Index Cond"], plan  # the room is part of the index search
    # The 3 needles of this room, not the 3,000 of the other one, then dropped by a recheck.
    assert scans[0]["Actual Rows"] == 3, plan
    assert all(n.get("Rows Removed by Filter", 0) == 0 for n in nodes(plan)), plan


async def test_searches_per_user_are_capped(server_a: Server, database_url: str, make_token: MakeToken) -> None:
    """Issue 14 item 24: 20 concurrent slow searches from one user took the pool. While two of a
    user's searches run (here: held by a lock on messages), a third is refused with 429; another
    user's search still goes in. The default is CHAT_SEARCHES_PER_USER=2."""
    room = unique("slow")
    alice, bob = await make_token(), await make_token()
    async with httpx.AsyncClient(base_url=f"{server_a.http}/api", timeout=30) as http:

        def as_user(token: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {token}"}

        async with await RoomClient.open(server_a.ws(f"/rooms/{room}/ws"), alice) as client:
            await client.ready()  # the room exists
        lock = await asyncpg.connect(libpq_url(database_url))
        try:
            held = lock.transaction()
            await held.start()
            await lock.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            url, params = f"/rooms/{room}/search", {"q": "anything"}
            running = [asyncio.create_task(http.get(url, params=params, headers=as_user(alice))) for _ in range(2)]
            # Watched from another connection: a transaction sees one snapshot of pg_stat_activity.
            waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%ts_rank%'"
            watch = await asyncpg.connect(libpq_url(database_url))
            try:
                async with asyncio.timeout(15):  # both are in the database, waiting for the lock
                    while await watch.fetchval(waiting) < 2:
                        await asyncio.sleep(0.02)
            finally:
                await watch.close()
            third = await http.get(url, params=params, headers=as_user(alice))
            other = asyncio.create_task(http.get(url, params=params, headers=as_user(bob)))
            await held.rollback()
        finally:
            await lock.close()
        assert (third.status_code, third.json()["detail"]) == (429, "too many searches at once: wait for one to finish")
        for response in [*await asyncio.gather(*running), await other]:
            assert response.status_code in (200, 503), response.text  # served (or timed out), never refused
        again = await http.get(url, params=params, headers=as_user(alice))
        assert again.status_code == 200  # the slots came back
