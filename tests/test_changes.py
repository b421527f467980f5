"""Messages that change (issue 12): edit, delete, react, unreact and replies, on both socket
routes and two server processes; permissions; erasure; changes made in SQL; exact resume."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from chat.config import libpq_url
from tests.conftest import MakeToken, unique
from tests.roomclient import Frame, RoomClient
from tests.roomstate import RoomState
from tests.servers import Server

_ids = itertools.count()


async def request(client: RoomClient, frame: Frame, *, room: str | None = None) -> Frame:
    """Send a frame with a fresh client_id (unless it has one); its ack or its error frame."""
    frame = {"client_id": f"c{next(_ids)}", **frame}
    if room is not None:
        frame["room"] = room
    await client.ws.send(json.dumps(frame))
    async with asyncio.timeout(15):
        while True:
            client._changed.clear()
            for index, got in enumerate(client.frames):
                mine = got["type"] in ("ack", "error") and got.get("client_id") == frame["client_id"]
                if mine and index not in client._taken:
                    client._taken.add(index)
                    return got
            await client._wait()


async def acked(client: RoomClient, frame: Frame, **kwargs: Any) -> int:
    answer = await request(client, frame, **kwargs)
    assert answer["type"] == "ack", answer
    return int(answer["seq"])


async def refused(client: RoomClient, frame: Frame, **kwargs: Any) -> str:
    answer = await request(client, frame, **kwargs)
    assert answer["type"] == "error", answer
    return str(answer["code"])


def state_of(client: RoomClient, me: str) -> RoomState:
    state = RoomState(me)
    for frame in client.frames:
        state.apply(frame)
    return state


async def until_head(client: RoomClient, seq: int) -> None:
    async with asyncio.timeout(30):
        while state_of(client, "").last_seq < seq:
            client._changed.clear()
            await client._wait()


async def test_author_edits_owner_deletes_others_are_refused(server_a: Server, make_token: MakeToken) -> None:
    room = unique("perm")
    path = f"/rooms/{room}/ws"
    owner_name, alice_name, bob_name = unique("owner"), unique("alice"), unique("bob")
    async with (
        await RoomClient.open(server_a.ws(path), await make_token(owner_name)) as owner,
        await RoomClient.open(server_a.ws(path), await make_token(alice_name)) as alice,
        await RoomClient.open(server_a.ws(path), await make_token(bob_name)) as bob,
    ):
        await owner.ready()  # the first to join made the room: its owner
        await alice.ready()
        await bob.ready()
        first = await acked(alice, {"type": "send", "body": "helo"})
        second = await acked(alice, {"type": "send", "body": "second"})
        # The author edits; the edit is an event with its own seq, naming the message.
        edit = await acked(alice, {"type": "edit", "target_seq": first, "body": "hello"})
        assert edit == second + 1
        seen = await bob.until("message", kind="edit")
        assert (seen["seq"], seen["target_seq"], seen["body"], seen["author"]) == (edit, first, "hello", alice_name)
        # Others may not edit or delete it; bad targets are refused with clear codes.
        assert await refused(bob, {"type": "edit", "target_seq": first, "body": "mine now"}) == "forbidden"
        assert await refused(bob, {"type": "delete", "target_seq": first}) == "forbidden"
        assert await refused(owner, {"type": "edit", "target_seq": first, "body": "owner edit"}) == "forbidden"
        assert await refused(bob, {"type": "edit", "target_seq": 999, "body": "x"}) == "not_found"
        assert (
            await refused(alice, {"type": "edit", "target_seq": edit, "body": "an edit is no message"}) == "not_found"
        )
        assert await refused(bob, {"type": "send", "body": "re", "reply_to": 999}) == "not_found"
        assert await refused(bob, {"type": "unreact", "target_seq": first, "emoji": "👍"}) == "not_reacted"
        await acked(bob, {"type": "react", "target_seq": first, "emoji": "👍"})
        assert await refused(bob, {"type": "react", "target_seq": first, "emoji": "👍"}) == "already_reacted"
        # The room's owner deletes anyone's message; then it is gone for every change.
        await acked(owner, {"type": "delete", "target_seq": second})
        deleted = await acked(alice, {"type": "delete", "target_seq": first})
        assert await refused(alice, {"type": "edit", "target_seq": first, "body": "again"}) == "deleted"
        assert await refused(bob, {"type": "react", "target_seq": first, "emoji": "🎉"}) == "deleted"
        assert await refused(alice, {"type": "delete", "target_seq": first}) == "deleted"
        assert await refused(bob, {"type": "send", "body": "re", "reply_to": first}) == "deleted"
        # Bad frames: a clear error, the socket stays open.
        assert await refused(bob, {"type": "react", "target_seq": first, "emoji": "two words"}) == "invalid_frame"
        assert await refused(bob, {"type": "edit", "target_seq": 0, "body": "x"}) == "invalid_frame"
        assert await refused(alice, {"type": "edit", "target_seq": first, "body": "  "}) == "empty"
        # Idempotent like send: the same client_id stores once.
        third = await acked(alice, {"type": "send", "body": "third"})
        again = {"type": "edit", "target_seq": third, "body": "third!", "client_id": "same-edit"}
        answers = [await request(alice, again), await request(alice, again)]
        assert [a["seq"] for a in answers] == [answers[0]["seq"]] * 2
        assert [a["duplicate"] for a in answers] == [False, True]
        await until_head(bob, answers[0]["seq"])
        assert [f["kind"] for f in bob.frames if f["type"] == "message" and f.get("target_seq") == third] == ["edit"]
        assert deleted < answers[0]["seq"]


async def test_history_shows_current_state(server_a: Server, make_token: MakeToken) -> None:
    room = unique("now")
    path = f"/rooms/{room}/ws"
    alice_name, bob_name = unique("alice"), unique("bob")
    alice_token, bob_token = await make_token(alice_name), await make_token(bob_name)
    async with (
        await RoomClient.open(server_a.ws(path), alice_token) as alice,
        await RoomClient.open(server_a.ws(path), bob_token) as bob,
    ):
        await alice.ready()
        await bob.ready()
        original = await acked(alice, {"type": "send", "body": "the original " + "x" * 300})
        reply = await acked(bob, {"type": "send", "body": "a reply", "reply_to": original})
        live_reply = await alice.until("message", seq=reply)
        assert live_reply["quote"] == {
            "author": alice_name,
            "body": ("the original " + "x" * 300)[:200],
            "deleted": False,
        }
        await acked(alice, {"type": "edit", "target_seq": original, "body": "edited"})
        await acked(bob, {"type": "react", "target_seq": original, "emoji": "👍"})
        await acked(alice, {"type": "react", "target_seq": original, "emoji": "👍"})
        await acked(alice, {"type": "react", "target_seq": original, "emoji": "🎉"})
        head = await acked(alice, {"type": "unreact", "target_seq": original, "emoji": "🎉"})
        await until_head(bob, head)
        await bob.ws.send(json.dumps({"type": "history", "before": head + 1}))
        page = await bob.until("history")
    assert [m["seq"] for m in page["messages"]] == [original, reply]  # changes are folded in
    assert page["as_of"] == head
    first, second = page["messages"]
    assert first["body"] == "edited" and "edited_at" in first
    assert first["reactions"] == [{"emoji": "👍", "count": 2, "mine": True}]
    assert second["quote"] == {"author": alice_name, "body": "edited", "deleted": False}
    # The same over HTTP, for another reader ("mine" is the reader's).
    async with httpx.AsyncClient(base_url=server_a.http, headers={"Authorization": f"Bearer {alice_token}"}) as api:
        body = (await api.get(f"/api/rooms/{room}/messages")).json()
    assert [m["seq"] for m in body["messages"]] == [original, reply]
    assert body["messages"][0]["reactions"] == [{"emoji": "👍", "count": 2, "mine": True}]
    assert body["messages"][1]["quote"]["body"] == "edited"
    # A new joiner sees the same current state, then the stream from there.
    async with await RoomClient.open(server_a.ws(path), await make_token()) as carol:
        ready = await carol.ready()
        assert ready["last_seq"] == head
        shown = [f for f in carol.frames if f["type"] == "message"]
    assert [m["seq"] for m in shown] == [original, reply]
    assert shown[0]["reactions"] == [{"emoji": "👍", "count": 2, "mine": False}]
    assert {k: v for k, v in shown[0].items() if k != "reactions"} == {
        k: v for k, v in first.items() if k != "reactions"
    }
    assert shown[1] == second


async def test_delete_erases_the_body_and_its_edits_from_the_table(
    server_a: Server, make_token: MakeToken, database_url: str
) -> None:
    room = unique("erase")
    alice_token = await make_token()
    async with await RoomClient.open(server_a.ws(f"/rooms/{room}/ws"), alice_token) as alice:
        await alice.ready()
        secret = await acked(alice, {"type": "send", "body": "my secret zanzibar"})
        reply = await acked(alice, {"type": "send", "body": "see above", "reply_to": secret})
        await acked(alice, {"type": "edit", "target_seq": secret, "body": "my secret zanzibar edited quokka"})
        await acked(alice, {"type": "react", "target_seq": secret, "emoji": "👍"})
        async with httpx.AsyncClient(base_url=server_a.http, headers={"Authorization": f"Bearer {alice_token}"}) as api:
            found = (await api.get(f"/api/rooms/{room}/search", params={"q": "quokka"})).json()
            assert [r["seq"] for r in found["results"]] == [secret]  # search follows edits
            assert (await api.get(f"/api/rooms/{room}/search", params={"q": "zanzibar"})).json()["results"][0][
                "body"
            ] == "my secret zanzibar edited quokka"
            delete = await acked(alice, {"type": "delete", "target_seq": secret})
            for word in ("zanzibar", "quokka", "secret"):
                assert (await api.get(f"/api/rooms/{room}/search", params={"q": word})).json()["results"] == []
            page = (await api.get(f"/api/rooms/{room}/messages")).json()["messages"]
    tombstone = next(m for m in page if m["seq"] == secret)
    assert tombstone["deleted"] is True and tombstone["body"] == "" and "reactions" not in tombstone
    assert next(m for m in page if m["seq"] == reply)["quote"] == {
        "author": tombstone["author"],
        "body": "",
        "deleted": True,
    }
    conn = await asyncpg.connect(libpq_url(database_url))
    try:
        room_id = await conn.fetchval("SELECT id FROM rooms WHERE name = $1", room)
        rows = await conn.fetch(
            "SELECT seq, kind, body, search::text AS search, deleted_at FROM messages WHERE room_id = $1 ORDER BY seq",
            room_id,
        )
        leftovers = await conn.fetchval("SELECT count(*) FROM message_reactions WHERE room_id = $1", room_id)
    finally:
        await conn.close()
    for row in rows:
        assert "zanzibar" not in row["body"] and "quokka" not in row["body"], row
        assert "zanzibar" not in row["search"] and "quokka" not in row["search"], row
    assert [r["kind"] for r in rows if r["seq"] == delete] == ["delete"]
    assert next(r for r in rows if r["seq"] == secret)["deleted_at"] is not None
    assert leftovers == 0


async def test_sql_update_and_delete_are_delivered_live_on_both_processes(
    server_a: Server, server_b: Server, make_token: MakeToken, database_url: str
) -> None:
    room = unique("sql")
    path = f"/rooms/{room}/ws"
    async with (
        await RoomClient.open(server_a.ws(path), await make_token()) as on_a,
        await RoomClient.open(server_b.ws(path), await make_token()) as on_b,
    ):
        await on_a.ready()
        await on_b.ready()
        seq = await acked(on_a, {"type": "send", "body": "typo"})
        conn = await asyncpg.connect(libpq_url(database_url))
        try:
            room_id = await conn.fetchval("SELECT id FROM rooms WHERE name = $1", room)
            await conn.execute("UPDATE messages SET body = 'fixed' WHERE room_id = $1 AND seq = $2", room_id, seq)
            for client in (on_a, on_b):
                edit = await client.until("message", kind="edit")
                assert (edit["seq"], edit["target_seq"], edit["body"]) == (seq + 1, seq, "fixed")
            await conn.execute("DELETE FROM messages WHERE room_id = $1 AND seq = $2", room_id, seq)
            for client in (on_a, on_b):
                gone = await client.until("message", kind="delete")
                assert (gone["seq"], gone["target_seq"]) == (seq + 2, seq)
            row = await conn.fetchrow(
                "SELECT body, deleted_at FROM messages WHERE room_id = $1 AND seq = $2", room_id, seq
            )
            edits = await conn.fetch("SELECT body FROM messages WHERE room_id = $1 AND kind = 'edit'", room_id)
        finally:
            await conn.close()
    assert row is not None and row["body"] == "" and row["deleted_at"] is not None  # a tombstone
    assert [e["body"] for e in edits] == [""]  # the edit's body is erased too


async def test_changes_on_the_multiplexed_socket(server_a: Server, server_b: Server, make_token: MakeToken) -> None:
    room = unique("mux")
    token = await make_token()
    async with (
        connect(server_a.ws("/socket"), additional_headers={"Cookie": f"session={token}"}) as ws,
        await RoomClient.open(server_b.ws(f"/rooms/{room}/ws"), await make_token()) as other,
    ):
        mux = RoomClient(ws)
        await ws.send(json.dumps({"type": "subscribe", "room": room}))
        await mux.until("ready", room=room)
        await other.ready()
        seq = await acked(mux, {"type": "send", "body": "hi"}, room=room)
        await acked(mux, {"type": "edit", "target_seq": seq, "body": "hi!"}, room=room)
        await acked(other, {"type": "react", "target_seq": seq, "emoji": "👍"})
        assert await refused(other, {"type": "edit", "target_seq": seq, "body": "no"}) == "forbidden"
        assert await refused(mux, {"type": "delete", "target_seq": 77}, room=room) == "not_found"
        last = await acked(mux, {"type": "delete", "target_seq": seq}, room=room)
        await until_head(other, last)
        await until_head(mux, last)
        assert state_of(mux, "").view() == state_of(other, "").view()
        tombstone = state_of(other, "").messages[seq]
        assert (tombstone.body, tombstone.deleted, tombstone.reactions) == ("", True, {})
        assert tombstone.edited_at is not None


async def test_edit_window(database_url: str, tmp_root: Path, make_token: MakeToken) -> None:
    server = Server(database_url, tmp_root, env={"CHAT_EDIT_WINDOW_SECONDS": "60"})
    try:
        room = unique("window")
        async with await RoomClient.open(server.ws(f"/rooms/{room}/ws"), await make_token()) as alice:
            await alice.ready()
            old = await acked(alice, {"type": "send", "body": "old"})
            fresh = await acked(alice, {"type": "send", "body": "fresh"})
            conn = await asyncpg.connect(libpq_url(database_url))
            try:
                await conn.execute(
                    "UPDATE messages SET created_at = now() - interval '2 minutes' "
                    "WHERE seq = $1 AND room_id = (SELECT id FROM rooms WHERE name = $2)",
                    old,
                    room,
                )
            finally:
                await conn.close()
            assert await refused(alice, {"type": "edit", "target_seq": old, "body": "late"}) == "edit_window"
            await acked(alice, {"type": "edit", "target_seq": fresh, "body": "in time"})
            await acked(alice, {"type": "delete", "target_seq": old})  # deleting has no window
    finally:
        server.stop()


# --- exact resume: a property over random interleavings ------------------------------------------

EMOJI = ("👍", "🎉")
operation = st.one_of(
    st.tuples(st.just("send"), st.integers(0, 1), st.integers(0, 30), st.booleans()),
    st.tuples(st.just("edit"), st.integers(0, 1), st.integers(0, 30), st.booleans()),
    st.tuples(st.just("delete"), st.integers(0, 1), st.integers(0, 30), st.booleans()),
    st.tuples(st.just("react"), st.integers(0, 1), st.integers(0, 30), st.booleans()),
    st.tuples(st.just("unreact"), st.integers(0, 1), st.integers(0, 30), st.booleans()),
    st.tuples(st.just("disconnect"), st.integers(0, 1), st.integers(0, 30), st.booleans()),
)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(operations=st.lists(operation, min_size=5, max_size=25))
async def test_resuming_ends_in_the_state_of_never_disconnecting(
    server_a: Server, server_b: Server, make_token: MakeToken, operations: list[tuple[str, int, int, bool]]
) -> None:
    """Two writers (one per process) send, edit, delete, react and unreact at random; a watcher on
    each process; the one on B drops at random and resumes with after=its last seq. Both end in
    the same state, and so does a newcomer shown the current state (history on join)."""
    room = unique("prop")
    path = f"/rooms/{room}/ws"
    servers = (server_a, server_b)
    names = [unique("w0"), unique("w1")]
    writers = [await RoomClient.open(servers[i].ws(path), await make_token(names[i])) for i in (0, 1)]
    steady = await RoomClient.open(server_a.ws(path), await make_token())
    watcher_token = await make_token()
    resumed = RoomState("")
    dropping = await RoomClient.open(server_b.ws(path), watcher_token)
    try:
        for client in (*writers, steady, dropping):
            await client.ready()
        sent: list[int] = []
        head = 0
        for kind, who, pick, flag in operations:
            writer = writers[who]
            if kind == "disconnect":
                for received in dropping.frames:
                    resumed.apply(received)
                await dropping.close()
                dropping = await RoomClient.open(servers[who].ws(path), watcher_token, after=resumed.last_seq)
                continue
            if kind == "send" or not sent:
                frame: Frame = {"type": "send", "body": f"m{len(sent)}"}
                if flag and sent:
                    frame["reply_to"] = sent[pick % len(sent)]
            else:
                target = sent[pick % len(sent)]
                frame = {"type": kind, "target_seq": target}
                if kind == "edit":
                    frame["body"] = f"edit of {target} by {who}"
                elif kind in ("react", "unreact"):
                    frame["emoji"] = EMOJI[int(flag)]
            answer = await request(writer, frame)
            if answer["type"] == "ack":
                head = max(head, answer["seq"])
                if frame["type"] == "send":
                    sent.append(answer["seq"])
            else:
                assert answer["code"] in ("forbidden", "deleted", "already_reacted", "not_reacted"), answer
        await until_head(steady, head)
        if head > resumed.last_seq:
            await until_head(dropping, head)
        for frame in dropping.frames:
            resumed.apply(frame)
        assert resumed.view() == state_of(steady, "").view()
        assert resumed.last_seq == head
        async with await RoomClient.open(server_b.ws(path), watcher_token) as newcomer:
            ready = await newcomer.ready()
            fresh = state_of(newcomer, "")
        shown = {seq: m for seq, m in state_of(steady, "").view().items() if seq >= min(fresh.messages, default=0)}
        # A newcomer's reactions are counts, with "mine" for the watcher (who never reacts).
        assert fresh.view() == shown
        assert ready["last_seq"] == head
    finally:
        for client in (*writers, steady, dropping):
            await client.close()
