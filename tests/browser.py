"""Helpers for the end-to-end tests: Debian's chromium driven by Playwright, and the chat page seen
through its stable selectors (README, "the page")."""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from playwright.async_api import Browser, BrowserContext, Dialog, Locator, Page, expect
from playwright.async_api import TimeoutError as PlaywrightTimeout

from chat.config import libpq_url

CHROMIUM = Path(os.environ.get("E2E_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "e2e"
TIMEOUT_MS = 15_000  # generous: the tests wait for conditions, never for a fixed time

expect.set_options(timeout=TIMEOUT_MS)


def require_chromium() -> str:
    """The browser's path; a failure in CI (.ci/run installs it), a skip elsewhere."""
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return str(CHROMIUM)
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing in CI (.ci/run installs it with apt-get install chromium)")
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")


async def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def seed_room(database_url: str, room: str, count: int, author: str = "bot") -> None:
    """Creates `room` with `count` messages "message 1".."message N" (seqs 1..N, from the trigger)."""
    await seed_bodies(database_url, room, [f"message {n}" for n in range(1, count + 1)], author)


async def seed_bodies(database_url: str, room: str, bodies: list[str], author: str = "bot") -> None:
    """Creates `room` with one message per body, in order (seqs 1..N, from the trigger)."""
    conn = await asyncpg.connect(libpq_url(database_url))
    try:
        await conn.execute("INSERT INTO rooms (name) VALUES ($1)", room)
        await conn.execute(
            "INSERT INTO messages (room_id, author, body) SELECT r.id, $2, b.body"
            " FROM rooms r, unnest($3::text[]) WITH ORDINALITY b(body, n) WHERE r.name = $1 ORDER BY b.n",
            room,
            author,
            bodies,
        )
    finally:
        await conn.close()


async def insert_message(database_url: str, room: str, author: str, body: str) -> None:
    conn = await asyncpg.connect(libpq_url(database_url))
    try:
        await conn.execute(
            "INSERT INTO messages (room_id, author, body) SELECT id, $2, $3 FROM rooms WHERE name = $1",
            room,
            author,
            body,
        )
    finally:
        await conn.close()


class ChatPage:
    """One user in one browser context, signed in on one server."""

    def __init__(self, context: BrowserContext, page: Page, user: str) -> None:
        self.context = context
        self.page = page
        self.user = user
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", self._on_dialog)
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    async def _on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    @classmethod
    async def open(
        cls, browser: Browser, base_url: str, token: str, user: str, *, init_script: str | None = None, **options: Any
    ) -> ChatPage:
        """A fresh context (own cookies and localStorage), signed in through the #token= link.
        `init_script` runs in the page before its own scripts."""
        context = await browser.new_context(**options)
        context.set_default_timeout(TIMEOUT_MS)
        if init_script is not None:
            await context.add_init_script(init_script)
        page = await context.new_page()
        chat = cls(context, page, user)
        await page.goto(f"{base_url}/#token={token}")
        await expect(page.locator("#me")).to_have_text(user)
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        assert "token=" not in page.url  # the page strips the token from the address
        return chat

    async def close(self) -> None:
        await self.context.close()

    async def join(self, room: str) -> None:
        page = self.page
        await page.fill("#room-input", room)
        await page.click("#room-join")
        await expect(page.locator("#current-room")).to_have_text(room)
        await expect(page.locator(f'#room-list [data-room="{room}"]')).to_have_attribute("aria-current", "true")
        await self.wait_connected()

    async def wait_connected(self, timeout: float = TIMEOUT_MS) -> None:
        status = self.page.locator("#status")
        await expect(status).to_have_attribute("data-state", "connected", timeout=timeout)
        await expect(self.page.locator("#scroller")).to_have_attribute("data-ready", "true")

    async def send(self, body: str) -> None:
        """Types and sends; returns once the message is stored and shown (its own .msg with a seq)."""
        await self.page.fill("#message-input", body)
        await self.page.press("#message-input", "Enter")
        await expect(self.page.locator("#message-input")).to_have_value("")
        await self.wait_body(body, mine=True)
        await expect(self.page.locator("#outbox > *")).to_have_count(0)

    async def wait_body(self, body: str, *, mine: bool | None = None) -> None:
        selector = "#messages .msg" + {None: "", True: ".mine", False: ":not(.mine)"}[mine]
        await expect(self.page.locator(selector).filter(has=self._body(body))).to_have_count(1)

    def _body(self, body: str) -> Locator:
        return self.page.locator(".body").get_by_text(body, exact=True)

    async def wait_event(self, text: str) -> None:
        await expect(self.page.locator("#messages .event").filter(has_text=text)).to_have_count(1)

    async def wait_seqs(self, expected: list[int]) -> None:
        """Waits until the rendered seqs are exactly `expected`, then checks what the list holds."""
        with contextlib.suppress(PlaywrightTimeout):  # the assertion below says what the page shows instead
            await self.page.wait_for_function(
                "expected => JSON.stringify([...document.querySelectorAll('#messages .msg')]"
                ".map(n => Number(n.dataset.seq))) === JSON.stringify(expected)",
                arg=expected,
            )
        assert await self.seqs() == expected

    async def seqs(self) -> list[int]:
        values: list[str] = await self.page.eval_on_selector_all(
            "#messages .msg", "nodes => nodes.map(n => n.dataset.seq)"
        )
        return [int(v) for v in values]

    async def rows(self) -> list[tuple[int, str, str]]:
        """(seq, author, body) of every rendered message, in page order, as the user reads them."""
        rows: list[list[Any]] = await self.page.eval_on_selector_all(
            "#messages .msg",
            "nodes => nodes.map(n => [Number(n.dataset.seq), n.querySelector('.author').textContent,"
            " n.querySelector('.body').textContent])",
        )
        return [(int(seq), str(author), str(body)) for seq, author, body in rows]

    async def events(self) -> list[str]:
        texts: list[str] = await self.page.eval_on_selector_all(
            "#messages .event", "nodes => nodes.map(n => n.textContent)"
        )
        return texts


def strictly_increasing(values: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))
