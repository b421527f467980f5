"""Engine options (pure; the pooler itself is tests/test_pgbouncer.py)."""

from __future__ import annotations

from chat.config import Settings
from chat.db import connect_args, statement_name


def test_direct_connections_keep_asyncpgs_statement_cache() -> None:
    args = connect_args(Settings(database_pooler="none"))
    assert args == {"server_settings": {"application_name": "chat"}}


def test_transaction_pooler_gets_unique_names_and_no_caches() -> None:
    args = connect_args(Settings(database_pooler="transaction"))
    assert args["statement_cache_size"] == 0 and args["prepared_statement_cache_size"] == 0
    name = args["prepared_statement_name_func"]
    names = {name() for _ in range(1000)}
    assert len(names) == 1000 and all(n.startswith("__asyncpg_") for n in names)
    assert statement_name() not in names
