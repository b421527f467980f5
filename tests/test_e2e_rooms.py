"""Issue 11 end to end in Debian's chromium: a private room invisible to an outsider, a DM between
two users on two servers with a highlighted mention, an unread badge that clears on the other
device, and a search result that jumps to its message. Screenshots go to test-artifacts/e2e/."""

from __future__ import annotations

from typing import Any

from playwright.async_api import Browser, Page, expect

from tests.browser import ChatPage, screenshot, seed_room
from tests.conftest import MakeToken, unique
from tests.servers import Server
from tests.test_e2e import OpenPage, assert_clean, browser, open_page  # noqa: F401 (fixtures)

FETCH = """([method, path, body]) => fetch(path, {
    method, headers: {'Content-Type': 'application/json'}, body: body === null ? undefined : JSON.stringify(body),
}).then(async (r) => [r.status, await r.json().catch(() => null)])"""


async def call(page: Page, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """The page's own fetch: its session cookie, its origin."""
    status, data = await page.evaluate(FETCH, [method, path, body])
    return int(status), data


async def test_private_rooms_dms_mentions_and_unread_across_devices(
    open_page: OpenPage,  # noqa: F811
    browser: Browser,  # noqa: F811
    server_a: Server,
    server_b: Server,
    make_token: MakeToken,
) -> None:
    alice = await open_page(server_a, "alice")
    bob = await open_page(server_b, "bob")
    carol = await open_page(server_a, "carol")
    secret = unique("secret")
    assert (await call(alice.page, "POST", "/api/rooms", {"name": secret, "visibility": "private"}))[0] == 201
    assert (await call(alice.page, "POST", f"/api/rooms/{secret}/members", {"user": bob.user}))[0] == 200
    await alice.join(secret)
    await alice.send("the plan is secret")
    await expect(bob.page.locator(f'#room-list [data-room="{secret}"]')).to_have_count(1)  # from the server's list

    # The outsider: not listed, not readable, not searchable.
    await expect(carol.page.locator("#room-list [data-room]")).not_to_have_count(0)
    await expect(carol.page.locator(f'#room-list [data-room="{secret}"]')).to_have_count(0)
    assert (await call(carol.page, "GET", f"/api/rooms/{secret}/messages"))[0] == 404
    assert (await call(carol.page, "GET", f"/api/rooms/{secret}/search?q=plan"))[0] == 404
    listed = (await call(carol.page, "GET", "/api/me/rooms"))[1]
    assert secret not in [r["name"] for r in listed]
    await screenshot(carol.page, "private-room-outsider")

    # Alice's second device, on the other server, opened before the DM exists.
    laptop = await ChatPage.open(browser, server_b.http, await make_token(alice.user), alice.user)
    try:
        # Bob opens a DM with alice from the page (server b) and mentions her.
        await bob.page.fill("#dm-input", alice.user)
        await bob.page.click("#dm-open")
        await expect(bob.page.locator("#current-room")).to_have_text(f"@{alice.user}")
        await bob.wait_connected()
        await bob.send(f"@{alice.user} are you there?")
        dms = [r for r in (await call(bob.page, "GET", "/api/me/rooms"))[1] if r["dm_with"] == alice.user]
        assert len(dms) == 1
        dm = dms[0]["name"]

        # Both of alice's devices list it under bob's name, with a mention badge.
        for device in (alice, laptop):
            entry = device.page.locator(f'#room-list [data-room="{dm}"]')
            await expect(entry.locator(".room-name")).to_have_text(f"@{bob.user}")
            await expect(entry.locator(".badge.mention-badge")).to_have_text("1")
        await screenshot(laptop.page, "unread-badge")

        # Alice reads it on one device: highlighted; the other device's badge clears.
        await alice.page.click(f'#room-list [data-room="{dm}"]')
        await alice.wait_connected()
        mention = alice.page.locator("#messages .msg.mentions-me mark.mention")
        await expect(mention).to_have_text(f"@{alice.user}")
        await screenshot(alice.page, "mention-highlighted")
        await expect(laptop.page.locator(f'#room-list [data-room="{dm}"] .badge')).to_have_count(0)
        await screenshot(laptop.page, "unread-cleared-on-other-device")
        unread = {r["name"]: r["unread"] for r in (await call(laptop.page, "GET", "/api/me/rooms"))[1]}
        assert unread[dm] == 0
        assert_clean(alice, bob, carol, laptop)
    finally:
        await laptop.close()


async def test_a_search_result_jumps_to_its_message(
    open_page: OpenPage,  # noqa: F811
    server_a: Server,
    database_url: str,
) -> None:
    room = unique("find")
    await seed_room(database_url, room, 300)
    alice = await open_page(server_a, "alice")
    await alice.join(room)
    await expect(alice.page.locator('#messages .msg[data-seq="300"]')).to_have_count(1)
    await expect(alice.page.locator('#messages .msg[data-seq="40"]')).to_have_count(0)
    await alice.page.fill("#search-input", "40")
    await alice.page.press("#search-input", "Enter")
    hit = alice.page.locator('#search-results button[data-seq="40"]')
    await expect(hit).to_contain_text("message 40")
    await screenshot(alice.page, "search-results")
    await hit.click()
    target = alice.page.locator('#messages .msg.hit[data-seq="40"]')
    await expect(target).to_be_in_viewport()
    await expect(alice.page.locator('#messages .msg[data-seq="39"]')).to_have_count(1)  # with its context
    await screenshot(alice.page, "search-jumped")
    assert_clean(alice)
