"""Log redaction, as a pure function: no token reaches a log, however it is spelled."""

from __future__ import annotations

import logging

import pytest

from chat.logs import RedactTokens, redact

TOKEN = "chat_" + "Ab3-_x" * 7 + "Z"  # the shape of a real token (43 characters after chat_)


@pytest.mark.parametrize(
    "line",
    [
        f"GET /rooms/general/ws?token={TOKEN} HTTP/1.1",
        f"GET /rooms/general/ws?tok%65n={TOKEN} HTTP/1.1",  # issue 14 item 11
        f"GET /rooms/general/ws?%74%6F%6B%65%6E={TOKEN}&after=3",
        f"GET /rooms/general/ws?TOKEN={TOKEN}",
        f"GET /ws?a=1&tok%2565n={TOKEN}",  # encoded twice
        f"Cookie: session={TOKEN}; theme=dark",
        f"GET /x?anything=%63hat%5F{TOKEN[5:]}",  # the value itself percent-encoded
        f"GET /x?anything={TOKEN[:20]}%41{TOKEN[20:]}",  # broken up by an escape
        f"bare {TOKEN} in a message",
        f"GET /x?token=not-shaped-like-one-{TOKEN[5:25]}",
    ],
)
def test_tokens_are_redacted(line: str) -> None:
    out = redact(line)
    assert "[redacted]" in out
    assert TOKEN[5:25] not in out and TOKEN[25:] not in out


@pytest.mark.parametrize(
    "line",
    [
        "GET /rooms/general/ws?after=12&x=y HTTP/1.1",
        "event=close room=general code=1000 seconds=1.2",
        "GET /api/rooms/general/search?q=chat HTTP/1.1",
    ],
)
def test_other_lines_are_kept(line: str) -> None:
    assert redact(line) == line


def test_the_filter_redacts_arguments() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, "%s %s", ("GET", f"/x?tok%65n={TOKEN}"), None
    )
    assert RedactTokens().filter(record)
    assert TOKEN not in record.getMessage() and "[redacted]" in record.getMessage()
