"""Logging set-up. A raw token must never reach a log: uvicorn logs every WebSocket handshake
with its query string, so every handler redacts tokens, whatever logger the record came from."""

from __future__ import annotations

import copy
import logging
import logging.config
import os
import re
from typing import Any
from urllib.parse import unquote_plus

from starlette.requests import HTTPConnection
from uvicorn.config import LOGGING_CONFIG

_SECRET_NAMES = {"token", "session", "access_token", "authorization"}
# A parameter `name=value` as it appears in a query string or a cookie header.
_PARAMETER = re.compile(r"(?P<name>[^\s&;?=\"']+)=(?P<value>[^&\s\"';]*)")
_TOKEN_SHAPED = re.compile(r"chat_[A-Za-z0-9_-]{16,}")


def _decoded(text: str) -> str:
    """Percent-decoded until stable (a few rounds): `tok%65n` and `tok%2565n` both read `token`."""
    if "%" not in text and "+" not in text:
        return text  # nothing to decode: most log lines, each redacted as it is written
    for _ in range(4):
        decoded = unquote_plus(text)
        if decoded == text:
            break
        text = decoded
    return text


def _parameter(match: re.Match[str]) -> str:
    name, value = match.group("name"), match.group("value")
    if _decoded(name).lower() in _SECRET_NAMES or _TOKEN_SHAPED.search(_decoded(value)):
        return f"{name}=[redacted]"
    return match.group(0)


def redact(text: str) -> str:
    """Secrets out of a log line: any parameter whose decoded name is a token's, any value that
    decodes to something shaped like a token, and anything token-shaped left anywhere."""
    if "=" not in text and "chat_" not in text:
        return text  # neither a parameter nor a token: `connection open`
    return _TOKEN_SHAPED.sub("[redacted]", _PARAMETER.sub(_parameter, text))


# uvicorn 0.54 logs this after every HTTP denial response, which is how we refuse sockets: the
# refusal itself is logged (by us and by uvicorn's "connection rejected"), so the line is noise.
_DENIAL_NOISE = "ASGI callable returned without completing handshake."


class RedactTokens(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _DENIAL_NOISE:
            return False
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


_events = logging.getLogger("chat.events")


def address(conn: HTTPConnection) -> str:
    """The connection's client address, for the events it logs. Read from the scope after
    uvicorn's proxy-headers middleware, so behind a proxy that FORWARDED_ALLOW_IPS trusts, this
    is the address from X-Forwarded-For, not the proxy's. (Not a middleware with a context
    variable: an open socket would keep its frame and a context copy for its whole life.)"""
    client = conn.scope.get("client")
    return str(client[0]) if client else "-"


def event(name: str, *, client: str = "-", **fields: object) -> None:
    """One structured line per connection event, as logfmt: `event=close room=general code=1000
    client=203.0.113.7 pid=4242`. Fields never include a token (and the handlers would redact one
    anyway). `client` is the client's address (see address()), `pid` the serving process."""
    fields = {**fields, "client": client, "pid": os.getpid()}
    parts = [f"event={name}"]
    for key, value in fields.items():
        text = str(value)
        if not text or any(c in text for c in ' "=\\'):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    _events.info(" ".join(parts))


def log_config(level: str = "INFO") -> dict[str, Any]:
    """uvicorn's own logging config, plus our loggers, with the redaction on every handler."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact": {"()": "chat.logs.RedactTokens"}}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact"]
    config["loggers"]["chat"] = {"handlers": ["default"], "level": level, "propagate": False}
    config["loggers"]["uvicorn"]["level"] = level
    return config


def configure(level: str = "INFO") -> None:
    logging.config.dictConfig(log_config(level))
