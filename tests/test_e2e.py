"""End to end: the chat page in Debian's chromium (driven by Playwright), real server processes,
the test Postgres. Screenshots of the main states go to test-artifacts/e2e/."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Request, async_playwright, expect

from tests.browser import (
    CHROMIUM_ARGS,
    ChatPage,
    insert_message,
    require_chromium,
    screenshot,
    seed_room,
    strictly_increasing,
)
from tests.conftest import MakeToken, unique
from tests.roomclient import RoomClient
from tests.servers import Server
from tests.test_writer import commit_together

OpenPage = Callable[..., Awaitable[ChatPage]]


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    executable = require_chromium()
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest.fixture
async def open_page(browser: Browser, make_token: MakeToken) -> AsyncIterator[OpenPage]:
    """open_page(server, "alice") -> a new user with a new token, signed in in a context of their own."""
    pages: list[ChatPage] = []

    async def open_(server: Server, prefix: str, **context_options: Any) -> ChatPage:
        user = unique(prefix)
        page = await ChatPage.open(browser, server.http, await make_token(user), user, **context_options)
        pages.append(page)
        return page

    yield open_
    for page in pages:
        await page.close()


def assert_clean(*pages: ChatPage) -> None:
    for page in pages:
        assert page.errors == [], f"{page.user}'s page threw: {page.errors}"
        assert page.dialogs == [], f"{page.user}'s page opened dialogs: {page.dialogs}"


async def test_two_users_on_two_servers(
    open_page: OpenPage, server_a: Server, server_b: Server, database_url: str
) -> None:
    """History on join, live messages both ways across processes, join and leave notices."""
    room = unique("two")
    await seed_room(database_url, room, 3)
    history = [(i, "bot", f"message {i}") for i in (1, 2, 3)]

    alice = await open_page(server_a, "alice")
    await alice.join(room)
    await alice.wait_seqs([1, 2, 3])
    assert await alice.rows() == history
    await screenshot(alice.page, "signed-in")

    bob = await open_page(server_b, "bob")
    await bob.join(room)
    await bob.wait_seqs([1, 2, 3])
    assert await bob.rows() == history
    await alice.wait_event(f"{bob.user} joined")

    await alice.send("hello from alice, on server a")
    await bob.wait_body("hello from alice, on server a", mine=False)
    await bob.send("hello from bob, on server b")
    await alice.wait_body("hello from bob, on server b", mine=False)

    expected = [
        *history,
        (4, alice.user, "hello from alice, on server a"),
        (5, bob.user, "hello from bob, on server b"),
    ]
    for page in (alice, bob):
        await page.wait_seqs([1, 2, 3, 4, 5])
        assert await page.rows() == expected
    assert await alice.page.locator("#messages .msg.mine").count() == 1
    assert await bob.page.locator("#messages .msg.mine").count() == 1
    await screenshot(alice.page, "two-users")

    await bob.page.click("#signout")
    await expect(bob.page.locator("#signin-form")).to_be_visible()
    await alice.wait_event(f"{bob.user} left")
    assert await alice.events() == [f"{bob.user} joined", f"{bob.user} left"]
    assert_clean(alice, bob)


async def test_late_joiner_sees_the_history_in_order(open_page: OpenPage, server_a: Server, server_b: Server) -> None:
    room = unique("late")
    alice = await open_page(server_a, "alice")
    bob = await open_page(server_b, "bob")
    await alice.join(room)
    await bob.join(room)
    expected: list[tuple[int, str, str]] = []
    for i in range(1, 7):  # alternating; each send returns once stored, so the order is known
        sender = alice if i % 2 else bob
        await sender.send(f"line {i} from {sender.user}")
        expected.append((i, sender.user, f"line {i} from {sender.user}"))

    carol = await open_page(server_b, "carol")
    await carol.join(room)
    await carol.wait_seqs(list(range(1, 7)))
    assert await carol.rows() == expected
    assert await carol.page.locator("#messages .msg.mine").count() == 0
    for page in (alice, bob):
        await page.wait_event(f"{carol.user} joined")
        assert await page.rows() == expected
    assert_clean(alice, bob, carol)


async def test_page_reconnects_when_its_server_restarts(
    open_page: OpenPage, server_b: Server, database_url: str, tmp_root: Path
) -> None:
    """Messages sent while the page's server is down show after the restart, each once, in order;
    one written into the outbox meanwhile is sent once."""
    room = unique("restart")
    await seed_room(database_url, room, 3)
    server = await asyncio.to_thread(Server, database_url, tmp_root)
    try:
        alice = await open_page(server, "alice")
        bob = await open_page(server_b, "bob")
        await alice.join(room)
        await bob.join(room)
        await alice.send("before the restart")  # seq 4
        await bob.wait_body("before the restart")

        port = server.port
        await asyncio.to_thread(server.stop)
        await expect(alice.page.locator("#status")).not_to_have_attribute("data-state", "connected")

        meanwhile = [f"meanwhile {i} from bob" for i in (5, 6, 7)]
        for body in meanwhile:
            await bob.send(body)
        await insert_message(database_url, room, "deploy-bot", "meanwhile 8 from psql")
        await bob.wait_body("meanwhile 8 from psql")
        await alice.page.fill("#message-input", "written while offline")
        await alice.page.press("#message-input", "Enter")
        await expect(alice.page.locator("#outbox .pending")).to_have_count(1)
        await expect(alice.page.locator("#outbox .pending .state")).to_have_text("sending…")
        assert await alice.seqs() == [1, 2, 3, 4]

        server = await asyncio.to_thread(Server, database_url, tmp_root, port=port)
        await alice.wait_connected(timeout=RECONNECT_MS)
        await alice.wait_body("written while offline", mine=True)
        await expect(alice.page.locator("#outbox > *")).to_have_count(0)
        for page in (alice, bob):
            await page.wait_seqs(list(range(1, 10)))
            seqs = await page.seqs()
            assert strictly_increasing(seqs) and len(set(seqs)) == len(seqs)
        rows = await alice.rows()
        assert [body for _, _, body in rows[4:]] == [*meanwhile, "meanwhile 8 from psql", "written while offline"]
        assert rows[-1][1] == alice.user
        assert await alice.rows() == await bob.rows()
        await screenshot(alice.page, "reconnected")

        await bob.send("after the restart")  # and live again, across processes
        await alice.wait_body("after the restart", mine=False)
        await alice.wait_seqs(list(range(1, 11)))
        assert_clean(alice, bob)
    finally:
        await asyncio.to_thread(server.stop)


# The page backs off up to 10 s (plus jitter) between attempts while its server is down.
RECONNECT_MS = 30_000

XSS_BODIES = ["<img src=x onerror=alert(1)>", "<script>alert(2)</script>", "<b>bold?</b> &amp; &lt;"]


async def test_markup_in_messages_shows_as_literal_text(
    open_page: OpenPage, server_a: Server, server_b: Server, database_url: str
) -> None:
    room = unique("xss")
    alice = await open_page(server_a, "alice")
    bob = await open_page(server_b, "bob")
    fetched: list[str] = []

    def record(request: Request) -> None:
        fetched.append(request.url)

    for page in (alice, bob):
        page.page.on("request", record)
    await alice.join(room)
    await bob.join(room)

    for body in XSS_BODIES:
        await alice.send(body)
    evil_author = "<img src=x onerror=alert(3)>"
    await insert_message(database_url, room, evil_author, "<script>alert(4)</script>")
    expected = [(i + 1, alice.user, body) for i, body in enumerate(XSS_BODIES)]
    expected.append((len(XSS_BODIES) + 1, evil_author, "<script>alert(4)</script>"))

    for page in (alice, bob):
        await page.wait_seqs([seq for seq, _, _ in expected])
        assert await page.rows() == expected
        for tag in ("img", "script", "b"):
            assert await page.page.locator(f"#messages {tag}, #outbox {tag}").count() == 0
    # A round trip after the markup rendered: any handler it had planted had its chance to run.
    await bob.send("still fine")
    await alice.wait_body("still fine", mine=False)
    await screenshot(bob.page, "xss")
    assert not [url for url in fetched if url.rstrip("/").endswith("/x")], fetched
    assert_clean(alice, bob)


async def test_paging_back_through_500_messages(open_page: OpenPage, server_a: Server, database_url: str) -> None:
    room = unique("paging")
    await seed_room(database_url, room, 500)
    alice = await open_page(server_a, "alice")
    await alice.join(room)
    await alice.wait_seqs(list(range(451, 501)))  # CHAT_HISTORY_ON_JOIN

    load_older = alice.page.locator("#load-older")
    low = 451
    while low > 1:
        await expect(load_older).to_be_visible()
        await expect(load_older).to_have_attribute("aria-disabled", "false")
        await load_older.click()
        previous_top = alice.page.locator(f'#messages .msg[data-seq="{low}"]')
        low -= 50
        await alice.wait_seqs(list(range(low, 501)))
        await expect(previous_top).to_be_in_viewport()  # the view stays where the reader was
    await expect(load_older).to_be_hidden()  # the beginning of the room

    rows = await alice.rows()
    assert rows == [(i, "bot", f"message {i}") for i in range(1, 501)]
    await alice.page.locator('#messages .msg[data-seq="1"]').scroll_into_view_if_needed()
    await screenshot(alice.page, "history-paged")

    await alice.send("501st")  # the paged page still takes live messages, at the end
    await alice.wait_seqs(list(range(1, 502)))
    assert_clean(alice)


async def test_phone_layout(open_page: OpenPage, server_a: Server, database_url: str) -> None:
    room = unique("phone")
    await seed_room(database_url, room, 60)
    alice = await open_page(server_a, "alice", viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    await alice.join(room)
    await alice.wait_seqs(list(range(11, 61)))
    await alice.send("sent from a phone")
    page = alice.page
    for selector in ("#message-input", "#send", "#status"):
        await expect(page.locator(selector)).to_be_in_viewport()
    await expect(page.locator("#messages .msg.mine")).to_be_in_viewport()  # the newest stays in view
    overflow = await page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow}px"
    await screenshot(page, "phone")
    assert_clean(alice)


async def test_online_list_and_typing(open_page: OpenPage, server_a: Server, server_b: Server) -> None:
    """Who is online, across processes, and who is typing; both update live."""
    room = unique("room")
    alice = await open_page(server_a, "alice")
    await alice.join(room)
    bob = await open_page(server_b, "bob")
    await bob.join(room)
    for page in (alice, bob):
        await expect(page.page.locator("#online-list li")).to_have_text(sorted([alice.user, bob.user]))
        await expect(page.page.locator("#online-count")).to_have_text("2 online")

    await bob.page.locator("#message-input").press_sequentially("hel")  # typing, not yet sent
    await expect(alice.page.locator("#typing")).to_have_text(f"{bob.user} is typing…")
    await bob.page.press("#message-input", "Enter")  # the message ends the indicator
    await alice.wait_body("hel", mine=False)
    await expect(alice.page.locator("#typing")).to_have_text("")
    await screenshot(alice.page, "online-and-typing")

    await bob.close()
    await expect(alice.page.locator("#online-list li")).to_have_text([alice.user])
    assert_clean(alice)


# Delivers the frames of the page's sockets in a forced order: each of its own messages before
# the ack of its send ("message-first"), or after it ("ack-first"). Both happen for real: the ack
# follows the commit, the copy comes through NOTIFY on another connection (README: Protocol).
# window.__delivered records what the page got, in order, as [type, client_id].
REORDER_FRAMES = """
(() => {
  const order = ORDER;
  const Native = window.WebSocket;
  window.__delivered = [];
  window.WebSocket = class extends Native {
    send(data) {
      try { const f = JSON.parse(data); if (f.client_id) (this.__mine ||= new Set()).add(f.client_id); } catch (e) {}
      return super.send(data);
    }
    set onmessage(handler) {
      const held = new Map(), done = new Set(), mine = () => this.__mine || new Set();
      const deliver = (ev, f) => { if (f) window.__delivered.push([f.type, f.client_id]); handler && handler(ev); };
      super.onmessage = handler && ((ev) => {
        let f = null;
        try { f = JSON.parse(ev.data); } catch (e) { return deliver(ev, null); }
        const id = f && f.client_id;
        const first = order === 'message-first' ? 'message' : 'ack';
        const second = order === 'message-first' ? 'ack' : 'message';
        if (!id || !mine().has(id) || (f.type !== 'message' && f.type !== 'ack')) return deliver(ev, f);
        if (f.type === second && !done.has(id)) { held.set(id, ev); return; }
        deliver(ev, f);
        if (f.type === first) {
          done.add(id);
          if (held.has(id)) { const later = held.get(id); held.delete(id); deliver(later, JSON.parse(later.data)); }
        }
      });
    }
  };
})();
"""


@pytest.mark.parametrize("order", ["message-first", "ack-first"])
async def test_ack_and_own_copy_in_either_order(
    browser: Browser, server_a: Server, make_token: MakeToken, order: str
) -> None:
    """The ack and the sender's own copy may come in either order; the page matches them by
    client_id: each message shows once, and nothing stays in the outbox."""
    user = unique("order")
    script = REORDER_FRAMES.replace("ORDER", repr(order))
    page = await ChatPage.open(browser, server_a.http, await make_token(user), user, init_script=script)
    try:
        await page.join(unique("order"))
        bodies = [f"{order} {i}" for i in range(3)]
        for body in bodies:
            await page.send(body)  # waits for the message, once, and an empty outbox
        assert await page.page.locator("#messages .msg.mine").count() == len(bodies)
        delivered: list[list[str]] = await page.page.evaluate("window.__delivered")
        ids = {cid for kind, cid in delivered if kind == "ack"}
        assert len(ids) == len(bodies)
        first = "message" if order == "message-first" else "ack"
        for cid in ids:
            kinds = [kind for kind, c in delivered if c == cid and kind in ("message", "ack")]
            assert kinds[0] == first and sorted(kinds) == ["ack", "message"], (cid, kinds)
        assert_clean(page)
    finally:
        await page.close()


async def test_paging_reaches_the_beginning_with_small_pages(
    open_page: OpenPage, database_url: str, tmp_root: Path
) -> None:
    """Issue 14 item 19: pages clamped below the page's 50 (CHAT_HISTORY_PAGE_MAX=10) still page
    all the way back, instead of taking the first short page for the beginning of the room."""
    server = Server(database_url, tmp_root, env={"CHAT_HISTORY_PAGE_MAX": "10", "CHAT_HISTORY_ON_JOIN": "5"})
    try:
        room = unique("smallpages")
        await seed_room(database_url, room, 32)
        alice = await open_page(server, "alice")
        await alice.join(room)
        await alice.wait_seqs(list(range(28, 33)))
        load_older = alice.page.locator("#load-older")
        for low in (18, 8, 1):
            await expect(load_older).to_be_visible()
            await expect(load_older).to_have_attribute("aria-disabled", "false")
            await load_older.click()
            await alice.wait_seqs(list(range(low, 33)))
        await expect(load_older).to_be_hidden()
        assert_clean(alice)
    finally:
        server.stop()


async def test_a_sign_in_link_asks_before_switching_accounts(
    browser: Browser, server_a: Server, make_token: MakeToken
) -> None:
    """Issue 14 item 13 (login CSRF): a #token= link opened while signed in switches accounts only
    when the user says yes; each account keeps its own saved rooms."""
    alice, bob = unique("alice"), unique("bob")
    alice_token, bob_token = await make_token(alice), await make_token(bob)
    context = await browser.new_context()
    try:
        page = await context.new_page()
        answers: list[bool] = []  # what to answer the next dialogs, in order
        asked: list[str] = []

        async def on_dialog(dialog: Any) -> None:
            asked.append(dialog.message)
            await (dialog.accept() if answers.pop(0) else dialog.dismiss())

        page.on("dialog", on_dialog)
        me, rooms = page.locator("#me"), page.locator("#room-list")
        await page.goto(f"{server_a.http}/#token={alice_token}")  # signed out: no question
        await expect(me).to_have_text(alice)
        await page.fill("#room-input", "alices-room")
        await page.click("#room-join")
        await expect(rooms.locator('[data-room="alices-room"]')).to_be_visible()
        assert asked == []

        answers.append(False)
        await page.goto(f"{server_a.http}/#token={bob_token}")  # say no: nothing changes
        async with asyncio.timeout(15):
            while not asked:
                await asyncio.sleep(0.05)
        assert alice in asked[0]
        await expect(me).to_have_text(alice)
        assert (await page.request.get(f"{server_a.http}/api/me")).ok
        assert (await (await page.request.get(f"{server_a.http}/api/me")).json())["user"] == alice
        await page.reload()  # still alice after a reload: the cookie was never replaced
        await expect(me).to_have_text(alice)

        answers.append(True)
        await page.goto(f"{server_a.http}/#token={bob_token}")  # say yes: bob, with his own rooms
        await expect(me).to_have_text(bob)
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        await expect(rooms.locator('[data-room="alices-room"]')).to_have_count(0)

        answers.append(True)
        await page.goto(f"{server_a.http}/#token={alice_token}")
        await expect(me).to_have_text(alice)
        await expect(rooms.locator('[data-room="alices-room"]')).to_be_visible()
        assert len(asked) == 3
    finally:
        await context.close()


async def test_edit_delete_react_reply_live_and_after_reload(
    open_page: OpenPage, server_a: Server, server_b: Server
) -> None:
    """Issue 12: alice (server a) edits with ↑ and deletes; bob (server b) replies and reacts;
    each sees the other's changes live, and bob sees the same after a reload."""
    room = unique("changes")
    alice = await open_page(server_a, "alice")
    bob = await open_page(server_b, "bob")
    await alice.join(room)
    await bob.join(room)
    await alice.send("helo wrold")
    await alice.send("take this back")
    await bob.wait_body("take this back", mine=False)

    # ↑ in the empty composer edits her last message; Esc leaves it unchanged.
    await alice.page.press("#message-input", "ArrowUp")
    await expect(alice.page.locator("#message-input")).to_have_value("take this back")
    await alice.page.press("#message-input", "Escape")
    await expect(alice.page.locator("#message-input")).to_have_value("")
    first = alice.page.locator("#messages .msg").filter(has=alice.page.locator(".body", has_text="helo wrold"))
    await first.focus()
    await first.locator(".act.edit").click()
    await expect(alice.page.locator("#message-input")).to_have_value("helo wrold")
    await alice.page.fill("#message-input", "hello world")
    await alice.page.press("#message-input", "Enter")
    edited = bob.page.locator("#messages .msg").filter(has=bob.page.locator(".body", has_text="hello world"))
    await expect(edited.locator(".edited")).to_have_text("(edited)")

    # bob reacts and replies, by keyboard focus (no hover), on the other server.
    await edited.focus()
    await edited.locator('.act.emoji[data-emoji="👍"]').click()
    mine = alice.page.locator("#messages .msg").filter(has=alice.page.locator(".body", has_text="hello world"))
    await expect(mine.locator(".reaction")).to_have_text("👍 1")
    second = bob.page.locator("#messages .msg").filter(has=bob.page.locator(".body", has_text="take this back"))
    await second.focus()
    await second.locator(".act.reply").click()
    await expect(bob.page.locator("#compose-mode")).to_contain_text("Replying to")
    await bob.send("no, keep it")
    reply = alice.page.locator("#messages .msg").filter(has=alice.page.locator(".body", has_text="no, keep it"))
    await expect(reply.locator(".quote-body")).to_have_text("take this back")

    # alice deletes, after a confirm; bob's page shows the tombstone and the reply's quote follows.
    await alice.page.evaluate(
        "() => { window.asked = []; window.confirm = (text) => { window.asked.push(text); return true; }; }"
    )
    gone = alice.page.locator("#messages .msg").filter(has=alice.page.locator(".body", has_text="take this back"))
    await gone.focus()
    await gone.locator(".act.delete").click()
    assert await alice.page.evaluate("window.asked") == ["Delete this message for everyone?"]
    tombstone = bob.page.locator("#messages .msg.deleted")
    await expect(tombstone.locator(".body")).to_have_text("This message was deleted.")
    bob_reply = bob.page.locator("#messages .msg").filter(has=bob.page.locator(".body", has_text="no, keep it"))
    await expect(bob_reply.locator(".quote-body")).to_have_text("deleted message")
    await screenshot(bob.page, "changes")

    async def check(page: ChatPage) -> None:
        rows = await page.rows()
        assert [body for _, _, body in rows] == ["hello world", "This message was deleted.", "no, keep it"]
        kept = page.page.locator("#messages .msg").filter(has=page.page.locator(".body", has_text="hello world"))
        await expect(kept.locator(".edited")).to_have_count(1)
        await expect(kept.locator(".reaction")).to_have_text("👍 1")
        await expect(kept.locator(".reaction")).to_have_attribute("aria-pressed", "true")
        answer = page.page.locator("#messages .msg").filter(has=page.page.locator(".body", has_text="no, keep it"))
        await expect(answer.locator(".quote-body")).to_have_text("deleted message")

    await check(bob)
    await bob.page.reload()
    await bob.wait_connected()
    await expect(bob.page.locator("#messages .msg")).to_have_count(3)
    await check(bob)

    # At phone width, with touch: a tap on a message shows its actions, within the screen.
    carol = await open_page(server_a, "carol", viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    await carol.join(room)
    tapped = carol.page.locator("#messages .msg").filter(has=carol.page.locator(".body", has_text="hello world"))
    await tapped.locator(".body").tap()
    party = tapped.locator('.act.emoji[data-emoji="🎉"]')
    await expect(party).to_be_in_viewport()
    await party.tap()
    await expect(mine.locator('.reaction[data-emoji="🎉"]')).to_have_text("🎉 1")
    overflow = await carol.page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow}px"
    await screenshot(carol.page, "changes-phone")
    assert_clean(alice, bob, carol)


async def test_the_owner_deletes_anyones_message_and_a_background_badge_follows(
    open_page: OpenPage, server_a: Server, server_b: Server
) -> None:
    """The room's owner (alice, the first to join) gets Delete on every message, behind the same
    confirm; nobody else does. Bob has the room in the background: the deleted message leaves his
    unread and mention badge at once, as GET /api/me/rooms counts it."""
    room, elsewhere = unique("owned"), unique("elsewhere")
    alice = await open_page(server_a, "alice")
    await alice.join(room)
    await alice.send("welcome")
    bob = await open_page(server_b, "bob")
    await bob.join(room)
    await bob.wait_body("welcome", mine=False)
    welcome = bob.page.locator("#messages .msg").filter(has=bob.page.locator(".body", has_text="welcome"))
    await welcome.focus()
    await expect(welcome.locator(".act.reply")).to_be_visible()
    await expect(welcome.locator(".act.delete")).to_be_hidden()  # bob does not own the room
    await bob.join(elsewhere)

    carol = await open_page(server_a, "carol")
    await carol.join(room)
    await carol.send(f"@{bob.user} buy now")
    await carol.send("a real question")
    badge = bob.page.locator(f'#room-list [data-room="{room}"] .badge')
    await expect(badge).to_have_text("2")
    await expect(badge).to_have_class("badge mention-badge")
    await expect(
        carol.page.locator("#messages .msg")
        .filter(has=carol.page.locator(".body", has_text="welcome"))
        .locator(".act.delete")
    ).to_be_hidden()

    await alice.page.evaluate(
        "() => { window.asked = []; window.confirm = (text) => { window.asked.push(text); return true; }; }"
    )
    question = alice.page.locator("#messages .msg").filter(has=alice.page.locator(".body", has_text="a real question"))
    await question.focus()
    await expect(question.locator(".act.delete")).to_be_visible()
    await expect(question.locator(".act.edit")).to_have_count(0)  # an owner deletes, only the author edits
    spam = alice.page.locator("#messages .msg").filter(has=alice.page.locator(".body", has_text="buy now"))
    await spam.focus()
    await spam.locator(".act.delete").click()
    assert await alice.page.evaluate("window.asked") == ["Delete this message for everyone?"]
    for page in (alice, carol):
        tombstone = page.page.locator("#messages .msg.deleted")
        await expect(tombstone.locator(".body")).to_have_text("This message was deleted.")
        await expect(tombstone.locator(".act")).to_have_count(0)
    await question.focus()
    await screenshot(alice.page, "owner-deletes")

    # Bob's badge follows live: one unread left, no mention; the server's list says the same.
    await expect(badge).to_have_text("1")
    await expect(badge).to_have_class("badge")
    await screenshot(bob.page, "owner-deleted-background-badge")
    listed = await bob.page.evaluate("() => fetch('/api/me/rooms').then((r) => r.json())")
    [entry] = [r for r in listed if r["name"] == room]
    assert (entry["unread"], entry["mentions"]) == (1, 0)

    # After a reload the badge is the list's count (whose messages, the page does not know): a
    # delete of one of them reads the list again.
    await bob.page.reload()
    await bob.wait_connected()
    await expect(bob.page.locator("#current-room")).to_have_text(elsewhere)
    await expect(badge).to_have_text("1")
    await question.focus()
    await question.locator(".act.delete").click()
    await expect(alice.page.locator("#messages .msg.deleted")).to_have_count(2)
    await expect(badge).to_have_count(0)
    assert_clean(alice, bob, carol)


async def test_messages_that_commit_together_arrive_in_one_frame(
    open_page: OpenPage, server_a: Server, server_b: Server, make_token: MakeToken, database_url: str
) -> None:
    """The page's socket asks for live batches (`/socket?live=batch`): five messages that waited
    behind a locked room commit together and reach the page in one `messages` frame. The open
    room shows them in order; a page with the room in the background counts all five."""
    room, elsewhere = unique("together"), unique("elsewhere")
    alice = await open_page(server_a, "alice")
    live_frames: list[str] = []
    alice.page.on("websocket", lambda ws: ws.on("framereceived", lambda data: live_frames.append(str(data))))
    await alice.page.reload()  # so that the socket is watched from its start
    await alice.wait_connected()
    await alice.join(room)
    bob = await open_page(server_b, "bob")
    await bob.join(room)
    await bob.join(elsewhere)
    author = unique("carol")
    async with await RoomClient.open(server_b.ws(f"/rooms/{room}/ws"), await make_token(author)) as carol:
        await carol.ready()
        await commit_together(carol, database_url, room, ["one", "two", "three", "four", "five"], "c")
    await alice.wait_seqs([1, 2, 3, 4, 5])
    assert await alice.rows() == [
        (n, author, body) for n, body in enumerate(["one", "two", "three", "four", "five"], 1)
    ]
    batches = [json.loads(f) for f in live_frames if f.startswith('{"type":"messages"')]
    assert any(len(b["messages"]) >= 4 and b["room"] == room for b in batches), live_frames
    await expect(bob.page.locator(f'#room-list [data-room="{room}"] .badge')).to_have_text("5")
    assert_clean(alice, bob)
