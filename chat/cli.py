"""The `chat` command: serve, migrate, and token management."""

from __future__ import annotations

import asyncio
import getpass
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from chat import logs
from chat.config import Settings, get_settings
from chat.embedded import EmbeddedError, EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def database(settings: Settings, *, own: bool = False) -> Iterator[tuple[str, bool]]:
    """Yield (url, embedded). Without DATABASE_URL, use the embedded Postgres in the data folder:
    one already running there (unless `own`: then we start it, keep it running, and stop it on
    the way out)."""
    if settings.database_url:
        yield settings.database_url, False
        return
    pg = EmbeddedPostgres(settings.data_dir)
    if not own and (url := pg.running_url()):
        yield url, True
        return
    try:
        url = pg.start()
    except EmbeddedError as exc:
        raise click.ClickException(str(exc)) from None
    if own:
        pg.supervise()
    try:
        yield url, True
    finally:
        pg.stop()


def run_migrations(url: str, revision: str = "head") -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["url"] = url
    config.attributes["configure_logging"] = False
    command.upgrade(config, revision)


def parse_ttl(value: str) -> timedelta | None:
    if value in ("never", "0"):
        return None
    match = re.fullmatch(r"(\d+)([smhdw])", value)
    if not match:
        raise click.BadParameter("use a number and a unit (30s, 90m, 12h, 30d, 2w) or 'never'")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[match.group(2)]
    return timedelta(**{unit: int(match.group(1))})


async def _with_conn(url: str, work):  # type: ignore[no-untyped-def]
    from chat.db import create_engine

    engine = create_engine(get_settings(), url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            return await work(conn)
    finally:
        await engine.dispose()


async def _link_token(url: str, data_dir: Path, name: str) -> str:
    """The sign-in link's token: kept in the data folder (0600, like a .pgpass) and reused while
    it has more than a day to live, so the link survives restarts and tokens do not pile up."""
    from chat import store
    from chat.db import create_engine

    path = data_dir / "serve-token"
    engine = create_engine(get_settings(), url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            if path.exists():
                raw = path.read_text().strip()
                with suppress(store.TokenRefused):
                    who = await store.identity_for_token(conn, raw=raw)
                    if who.expires_at is None or who.expires_at - datetime.now(UTC) > timedelta(days=1):
                        return raw
            _, raw = await store.create_token(conn, user_name=name, ttl=timedelta(days=30), label="serve link")
    finally:
        await engine.dispose()
    path.touch(mode=0o600)
    path.write_text(raw + "\n")
    return raw


@click.group()
@click.option("--log-level", default="INFO", show_default=True)
def main(log_level: str) -> None:
    """A real-time chat server on PostgreSQL."""
    logs.configure(log_level.upper())


@main.command()
@click.option("--host", help="Address to bind [CHAT_HOST, default 127.0.0.1].")
@click.option("--port", type=int, help="Port [CHAT_PORT, default 8000].")
@click.option("--workers", type=int, help="Server processes [CHAT_WORKERS, default 1].")
@click.option("--no-link", is_flag=True, help="Do not create a sign-in link (embedded Postgres only).")
@click.option(
    "--link-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the sign-in link to this file (0600) instead of the terminal.",
)
def serve(host: str | None, port: int | None, workers: int | None, no_link: bool, link_file: Path | None) -> None:
    """Migrate and serve; with no DATABASE_URL, on the embedded Postgres."""
    settings = get_settings()
    host = host or settings.host
    port = settings.port if port is None else port
    workers = workers or settings.workers
    unwinding = threading.Event()

    def on_sigterm(*_: object) -> None:
        # Unwind through `finally`, so the embedded Postgres is stopped too: during start-up, and
        # when uvicorn re-raises SIGTERM after its own shutdown. A SystemExit raised while Python
        # runs a weakref or __del__ callback is swallowed ("Exception ignored"); then the signal
        # is sent again a moment later, to whichever handler is in place by then (uvicorn's).
        def resend() -> None:
            if not unwinding.wait(1.0):
                os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=resend, daemon=True).start()
        sys.exit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        _serve(settings, host, port, workers, no_link, link_file)
    finally:
        unwinding.set()


def _serve(settings: Settings, host: str, port: int, workers: int, no_link: bool, link_file: Path | None) -> None:
    import uvicorn

    with ExitStack() as stack, database(settings, own=True) as (url, embedded):
        run_migrations(url)
        os.environ["DATABASE_URL"] = url  # for the app, in this process and in the workers
        get_settings.cache_clear()
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        address = f"http://{shown}:{port}/"
        if embedded:
            click.echo(f"embedded Postgres: {settings.data_dir / 'pgdata'}")
        if embedded and not no_link:
            name = re.sub(r"[^\w.-]", "", getpass.getuser()) or "guest"
            raw = asyncio.run(_link_token(url, settings.data_dir, name))
            # In the fragment, which browsers never send to the server, so it reaches no access log.
            # Not on a stdout that is not a terminal: journald and docker keep that for anyone
            # who may read the logs.
            link = f"{address}#token={raw}"
            if link_file is not None:
                link_file.touch(mode=0o600)
                link_file.chmod(0o600)
                link_file.write_text(link + "\n")
                click.echo(f"chat is running at {address}: the sign-in link (as {name}) is in {link_file}")
            elif sys.stdout.isatty():
                click.echo(f"chat is running: open {link}  (signed in as {name})")
            else:
                click.echo(
                    f"chat is running at {address}: sign-in link not shown, as stdout is not a terminal "
                    "(use --link-file PATH, or `chat token create NAME`)"
                )
        else:
            click.echo(f"chat is running at {address}")
        if workers > 1:
            os.environ["CHAT_SUPERVISOR_PID"] = str(os.getpid())
            # One folder where every worker's metrics meet, so /metrics shows the sum.
            metrics_dir = tempfile.mkdtemp(prefix="chat-metrics-")
            stack.callback(shutil.rmtree, metrics_dir, ignore_errors=True)
            os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", metrics_dir)
        with suppress(KeyboardInterrupt):
            uvicorn.run(
                "chat.app:create_app",
                factory=True,
                host=host,
                port=port,
                workers=workers,
                ws=settings.ws,
                ws_max_size=settings.frame_limit,
                ws_per_message_deflate=settings.ws_deflate,
                log_config=logs.log_config(),
                timeout_graceful_shutdown=10,
            )


@main.command()
@click.argument("revision", default="head")
def migrate(revision: str) -> None:
    """Upgrade the database schema (alembic upgrade REVISION)."""
    with database(get_settings()) as (url, _):
        run_migrations(url, revision)
    click.echo(f"database is at {revision}")


@main.group()
def token() -> None:
    """Create, list and revoke access tokens (the database keeps only their hashes)."""


@token.command("create")
@click.argument("name")
@click.option("--ttl", default="30d", show_default=True, help="Lifetime: 30s, 90m, 12h, 30d, 2w or never.")
@click.option("--label", default="", help="A note to tell tokens apart.")
@click.option("--room", "rooms", multiple=True, help="Only this room (repeat for several); default: any room.")
def token_create(name: str, ttl: str, label: str, rooms: tuple[str, ...]) -> None:
    """Create a token for user NAME (created if new); the raw token is the last line."""
    from chat import store

    lifetime = parse_ttl(ttl)
    with database(get_settings()) as (url, _):
        run_migrations(url)
        token_id, raw = asyncio.run(
            _with_conn(
                url,
                lambda c: store.create_token(c, user_name=name, ttl=lifetime, label=label, rooms=list(rooms) or None),
            )
        )
    click.echo(f"token {token_id} for {name}, expires {'never' if lifetime is None else f'in {ttl}'}", err=True)
    click.echo(raw)


@token.command("list")
@click.option("--user", "user_name", help="Only this user's tokens.")
def token_list(user_name: str | None) -> None:
    """List tokens (never their values)."""
    from chat import store

    with database(get_settings()) as (url, _):
        rows = asyncio.run(_with_conn(url, lambda c: store.list_tokens(c, user_name=user_name)))
    click.echo(f"{'id':>5}  {'user':<20} {'state':<8} {'created':<17} {'expires':<17} {'rooms':<20} label")
    for r in rows:
        state = "revoked" if r.revoked_at else "active"
        expires = r.expires_at.strftime("%Y-%m-%d %H:%M") if r.expires_at else "never"
        rooms = ",".join(r.rooms) if r.rooms is not None else "any"
        click.echo(
            f"{r.id:>5}  {r.name:<20} {state:<8} {r.created_at:%Y-%m-%d %H:%M} {expires:<17} {rooms:<20} {r.label}"
        )


@token.command("revoke")
@click.argument("token_ids", nargs=-1, type=int)
@click.option("--user", "user_name", help="Revoke all of this user's tokens.")
def token_revoke(token_ids: tuple[int, ...], user_name: str | None) -> None:
    """Revoke tokens by id (see `chat token list`), or all of a user's."""
    from chat import store

    if not token_ids and not user_name:
        raise click.UsageError("name token ids or --user")
    with database(get_settings()) as (url, _):
        count = asyncio.run(
            _with_conn(
                url,
                lambda c: store.revoke_tokens(c, token_ids=list(token_ids) or None, user_name=user_name),
            )
        )
    click.echo(f"revoked {count} token(s)")


@main.group()
def room() -> None:
    """Make, list and delete rooms; invite and remove members."""


@room.command("create")
@click.argument("name")
@click.option("--owner", required=True, help="The user who owns it (its first member).")
@click.option("--private", is_flag=True, help="Only members see it; default: public.")
@click.option("--topic", default="", help="Its topic.")
def room_create(name: str, owner: str, private: bool, topic: str) -> None:
    """Make room NAME owned by --owner (not counted against CHAT_MAX_ROOMS_PER_USER)."""
    from sqlalchemy.ext.asyncio import AsyncConnection

    from chat import membership
    from chat.socket_frames import ROOM_NAME

    if not ROOM_NAME.fullmatch(name) or name.startswith(membership.DM_PREFIX):
        raise click.BadParameter(
            "1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit, not dm.", param_hint="NAME"
        )

    async def run(conn: AsyncConnection) -> int | None:
        owner_id = await membership.user_id(conn, name=owner)
        if owner_id is None:
            raise click.ClickException(f"no such user: {owner}")
        visibility = membership.PRIVATE if private else membership.PUBLIC
        return await membership.create(
            conn, name=name, creator_id=owner_id, visibility=visibility, topic=topic, max_per_user=2**62
        )

    with database(get_settings()) as (url, _):
        if asyncio.run(_with_conn(url, run)) is None:
            raise click.ClickException(f"room name taken: {name}")
    click.echo(f"created {'private' if private else 'public'} room {name}, owned by {owner}")


async def _member_change(url: str, room: str, user: str, *, add: bool) -> bool:
    """Invite or remove, as the API does: a notice in the room's stream; a removal also ends the
    user's subscriptions to the room on every process (a `removed` event on its channel)."""
    from sqlalchemy import func, select, text
    from sqlalchemy.ext.asyncio import AsyncConnection

    from chat import membership, notify, store
    from chat.protocol import dumps

    async def run(conn: AsyncConnection) -> bool:
        room_id = await store.room_id(conn, name=room, create=False)
        if room_id is None:
            raise click.ClickException(f"no such room: {room}")
        if add:
            try:
                changed = await membership.invite(conn, room_id=room_id, user_name=user)
            except membership.NoSuchUser:
                raise click.ClickException(f"no such user: {user}") from None
            except membership.TooManyMembers as exc:
                raise click.ClickException(str(exc)) from None
        else:
            removed = await membership.remove(conn, room_id=room_id, user_name=user)
            changed = removed is not None
        if changed:
            async with conn.begin():
                if not add:
                    assert removed is not None
                    event = notify.event_payload("removed", user, user_id=removed)
                    await conn.execute(select(func.pg_notify(notify.room_channel(room_id), event)))
                    # With Redis fan-out the servers hear the room through the relay (0007).
                    relayed = dumps({"type": "removed", "user": user, "user_id": removed, "room_id": room_id})
                    await conn.execute(select(func.pg_notify(notify.RELAY_CHANNEL, relayed)))
                # The user's /socket connections read their room list again (chat/connection.py).
                user_id = removed if not add else await membership.user_id(conn, name=user)
                if user_id is not None:
                    await conn.execute(select(func.pg_notify(notify.user_channel(user_id), notify.ROOMS_CHANGED)))
                    told = dumps({"type": "rooms", "user_id": user_id})
                    await conn.execute(select(func.pg_notify(notify.RELAY_CHANNEL, told)))
                body = f"{user} was {'added' if add else 'removed'} by an administrator"
                await conn.execute(
                    text("INSERT INTO messages (room_id, author, kind, body) VALUES (:r, 'chat', 'notice', :b)"),
                    {"r": room_id, "b": body},
                )
        return changed

    return bool(await _with_conn(url, run))


@room.command("invite")
@click.argument("name")
@click.argument("users", nargs=-1, required=True)
def room_invite(name: str, users: tuple[str, ...]) -> None:
    """Add USERS to room NAME."""
    with database(get_settings()) as (url, _):
        for user in users:
            changed = asyncio.run(_member_change(url, name, user, add=True))
            click.echo(f"{user}: {'added' if changed else 'already a member'}")


@room.command("remove")
@click.argument("name")
@click.argument("users", nargs=-1, required=True)
def room_remove(name: str, users: tuple[str, ...]) -> None:
    """Remove USERS from room NAME; their open sockets leave the room at once."""
    with database(get_settings()) as (url, _):
        for user in users:
            changed = asyncio.run(_member_change(url, name, user, add=False))
            click.echo(f"{user}: {'removed' if changed else 'not a member'}")


@room.command("list")
def room_list() -> None:
    """List rooms: name, last seq, when and by whom created."""
    from chat import store

    with database(get_settings()) as (url, _):
        rows = asyncio.run(_with_conn(url, lambda c: store.list_rooms(c)))
    click.echo(f"{'name':<30} {'last_seq':>10} {'visibility':<10} {'members':>7}  {'created':<17} created by")
    for r in rows:
        click.echo(
            f"{r.name:<30} {r.last_seq:>10} {r.visibility:<10} {r.members:>7}  "
            f"{r.created_at:%Y-%m-%d %H:%M} {r.created_by or '-'}"
        )


@room.command("delete")
@click.argument("names", nargs=-1, required=True)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def room_delete(names: tuple[str, ...], yes: bool) -> None:
    """Delete rooms NAMES with all their messages. Sockets still in them get `unavailable` for
    what they send; deleting a room its users still use is rarely what you want."""
    from chat import store

    if not yes:
        click.confirm(f"Delete {', '.join(names)} and every message in them?", abort=True)
    with database(get_settings()) as (url, _):
        deleted = asyncio.run(_with_conn(url, lambda c: store.delete_rooms(c, names=list(names))))
    missing = sorted(set(names) - set(deleted))
    click.echo(f"deleted {len(deleted)} room(s){': ' + ', '.join(deleted) if deleted else ''}")
    if missing:
        raise click.ClickException(f"no such room: {', '.join(missing)}")


@main.command()
@click.option("--older-than", "older_than", required=True, help="Age: 90d, 12w, 36h …; older messages go.")
@click.option("--room", help="Only this room; default: every room.")
@click.option(
    "--batch-size", default=10_000, show_default=True, type=click.IntRange(min=1), help="Rows per transaction."
)
@click.option("--dry-run", is_flag=True, help="Count what would go; delete nothing.")
def prune(older_than: str, room: str | None, batch_size: int, dry_run: bool) -> None:
    """Delete messages older than --older-than, in short batches. Seqs are never reused: each
    room keeps its last seq, so clients' cursors stay valid."""
    from sqlalchemy.ext.asyncio import AsyncConnection

    from chat import store

    age = parse_ttl(older_than)
    if age is None:
        raise click.BadParameter("give an age such as 90d", param_hint="--older-than")

    async def run(conn: AsyncConnection) -> store.Pruned:
        room_id = None
        if room is not None and (room_id := await store.room_id(conn, name=room, create=False)) is None:
            raise click.ClickException(f"no such room: {room}")
        return await store.prune_messages(conn, age=age, room_id=room_id, batch=batch_size, dry_run=dry_run)

    with database(get_settings()) as (url, _):
        pruned = asyncio.run(_with_conn(url, run))
    where = f" in {room}" if room else ""
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {pruned.count} message(s){where} older than {pruned.cutoff:%Y-%m-%d %H:%M:%S %Z}")
