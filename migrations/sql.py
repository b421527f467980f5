"""SQL that a later migration shares with an earlier one, read from the earlier file, not copied.

A downgrade restores the trigger function an earlier migration made: it loads that migration's
module and takes its definition, so the two can never drift apart.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

VERSIONS = Path(__file__).with_name("versions")


def earlier_definition(migration: str, name: str) -> str:
    """The SQL string `name` defined by migrations/versions/<migration>.py, e.g. ("0001_initial",
    "NOTIFY_FUNCTION")."""
    path = VERSIONS / f"{migration}.py"
    spec = importlib.util.spec_from_file_location(f"chat_migration_{migration}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sql = getattr(module, name)
    if not isinstance(sql, str):
        raise TypeError(f"{path}: {name} is not SQL text")
    return sql


def earlier_function(migration: str, name: str) -> str:
    """An earlier migration's function definition, as CREATE OR REPLACE: the function exists (its
    trigger depends on it), so a downgrade replaces its body rather than dropping it."""
    sql = earlier_definition(migration, name).lstrip()
    create = "CREATE FUNCTION "
    if sql.startswith(create):
        sql = "CREATE OR REPLACE FUNCTION " + sql.removeprefix(create)
    if not sql.startswith("CREATE OR REPLACE FUNCTION "):
        raise ValueError(f"{migration}: {name} does not define a function")
    return sql
