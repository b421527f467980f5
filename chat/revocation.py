"""Revoked or expired tokens lose their open sockets within seconds, not only new ones."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.ext.asyncio import AsyncEngine

from chat import store
from chat.hub import Hub
from chat.protocol import CLOSE_TOKEN_REFUSED

log = logging.getLogger("chat.revocation")


async def watch_tokens(hub: Hub, engine: AsyncEngine, *, interval: float) -> None:
    """Every `interval` seconds, one query for the tokens of this process's open sockets; a
    socket whose token was revoked or has expired is closed with CLOSE_TOKEN_REFUSED."""
    while True:
        await asyncio.sleep(interval)
        clients = [c for c in hub.clients() if c.identity is not None]
        if not clients:
            continue
        try:
            async with engine.connect() as conn:
                refused = await store.refused_tokens(
                    conn, token_ids=sorted({c.identity.token_id for c in clients if c.identity})
                )
        except Exception as exc:  # the database is down: check again next time
            log.warning("token check failed: %r", exc)
            continue
        for client in clients:
            assert client.identity is not None
            if reason := refused.get(client.identity.token_id):
                log.info("closing a socket of %s: %s", client.identity.name, reason)
                client.kick(CLOSE_TOKEN_REFUSED, reason)
