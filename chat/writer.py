"""Group commit: every send of a process goes through one writer, which stores whatever is
waiting as one multi-row INSERT (one statement, one transaction, one fsync) and then answers
each send.

No timer: a lone message is stored at once; while one batch is being committed the next one
gathers. Sockets never wait for a commit in their receive loop: they `submit()`, get a future,
and keep at most `CHAT_SOCKET_INFLIGHT` of them in flight (`InFlight`), answering in the order
the sends were received.

What the README's "Delivery guarantees" need, and how they hold here:
- seqs gap-free, in commit order: the BEFORE INSERT trigger bumps rooms.last_seq under the
  room's row lock, and one statement stores the batch; a statement that fails rolls back every
  bump it made. Rows are inserted ordered by (room, arrival), so concurrent writers lock rooms in
  the same order and cannot deadlock each other.
- a socket's messages stored in the order sent: one writer, arrival order within a room.
- `client_id` idempotent: a client_id already stored is found by the same statement and not
  inserted again (duplicate=true, the stored seq); the same one twice in a batch is inserted
  once and both get that seq. A duplicate that races in from another process fails the unique
  index, and the retry below finds the stored row.
- one bad row does not fail its batch: a statement refused for a row's data is split in halves,
  stored in order, until the bad row stands alone and only its sender gets an error.
- a database failure (lost connection, Postgres restarting, a full NOTIFY queue) answers
  `unavailable` to exactly that batch; a resend with the same client_id stores it exactly once.

Fan-out: the statement marks its transaction for the NOTIFY trigger (migration 0007): 'room'
under NOTIFY fan-out (the trigger NOTIFYs each row on its room's channel at commit), 'off' under
Redis fan-out. There, once a batch has committed and its sends are answered, the writer hands
each room's new messages to `on_commit` (one call per room per batch, in seq order), bounded by
`publish_timeout` so that a slow fan-out holds the loop up only that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chat import metrics
from chat.store import QUOTE_CHARS, MessageRecord

log = logging.getLogger("chat.writer")


# --- what a send becomes -------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Stored:
    seq: int
    duplicate: bool  # the client_id had been stored before: nothing new was written


class NotStored(Exception):
    """The message was not stored; `code` and `detail` are safe to show its sender."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


UNAVAILABLE = "unavailable"  # the database did not take it: send it again (same client_id)
REJECTED = "rejected"  # the database refused this message itself: sending it again will not help


def unavailable(detail: str = "the message was not stored; send it again") -> NotStored:
    return NotStored(UNAVAILABLE, detail)


@dataclass(slots=True, eq=False)
class Pending:
    """One send waiting for the writer."""

    room_id: int
    author_id: int | None
    author: str
    body: str
    kind: str = "text"
    client_id: str | None = None
    target_seq: int | None = None  # a change (edit, delete, react, unreact): the message it changes
    reply_to: int | None = None
    future: asyncio.Future[Stored] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    # What it weighs in a batch (the body dominates; UTF-8 is at most 4 bytes a character):
    # counted once, it is read four times on the way through the writer.
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.body) + len(self.author) + len(self.client_id or "") + 64

    @property
    def key(self) -> tuple[int, int, str] | None:
        """Its idempotency key, as the unique index sees it (no key without author or client_id)."""
        if self.client_id is None or self.author_id is None:
            return None
        return (self.room_id, self.author_id, self.client_id)


# --- pure batching logic (unit-tested without a database) ----------------------------------------


def take_batch(waiting: deque[Pending], *, max_rows: int, max_bytes: int) -> list[Pending]:
    """Take from the front of `waiting` up to `max_rows` rows and `max_bytes` bytes (always at
    least one, however big), in arrival order."""
    batch: list[Pending] = []
    size = 0
    while waiting and len(batch) < max_rows:
        weight = waiting[0].size
        if batch and size + weight > max_bytes:
            break
        batch.append(waiting.popleft())
        size += weight
    return batch


def fold_duplicates(batch: Sequence[Pending]) -> tuple[list[Pending], dict[int, list[Pending]]]:
    """Split a batch into the rows to insert and, per inserted row (by index in that list), the
    later rows with the same idempotency key: those are answered with the first one's seq."""
    rows: list[Pending] = []
    first: dict[tuple[int, int, str], int] = {}
    followers: dict[int, list[Pending]] = defaultdict(list)
    for item in batch:
        key = item.key
        if key is not None and key in first:
            followers[first[key]].append(item)
            continue
        if key is not None:
            first[key] = len(rows)
        rows.append(item)
    return rows, dict(followers)


def assign_seqs(rows: Sequence[Pending], existing: dict[int, int], inserted: Iterable[tuple[int, int]]) -> list[Stored]:
    """Match the statement's results to its rows. `existing`: row index -> seq already stored
    (duplicates); `inserted`: (room_id, seq) of each new row. Rows of one room were inserted in
    index order, so within a room the k-th new row got the k-th smallest new seq."""
    seqs: dict[int, list[int]] = defaultdict(list)
    for room_id, seq in inserted:
        seqs[room_id].append(seq)
    for room_seqs in seqs.values():
        room_seqs.sort(reverse=True)  # pop() from the end: smallest first
    results: list[Stored] = []
    for index, row in enumerate(rows):
        if index in existing:
            results.append(Stored(existing[index], duplicate=True))
        else:
            results.append(Stored(seqs[row.room_id].pop(), duplicate=False))
    if any(seqs.values()):
        raise RuntimeError("the INSERT returned more rows than it was given")
    return results


def halves(rows: Sequence[Pending]) -> tuple[Sequence[Pending], Sequence[Pending]]:
    middle = len(rows) // 2
    return rows[:middle], rows[middle:]


# Errors that are about a row's data: the statement is split to find the row. Class 22: data
# exception; 23: integrity (a foreign key, a check, a unique index); P0: raised by a trigger;
# 40: a deadlock or serialization failure, which a retry of smaller parts gets past.
_ROW_ERROR_CLASSES = frozenset({"22", "23", "P0", "40"})
UNIQUE_VIOLATION = "23505"


def sqlstate_of(exc: BaseException) -> str | None:
    if isinstance(exc, DBAPIError):
        exc = exc.orig if exc.orig is not None else exc
        exc = getattr(exc, "__cause__", None) or exc
    code = getattr(exc, "sqlstate", None)
    return code if isinstance(code, str) else None


# The triggers of migration 0008 refuse a bad change (or reply) with HINT 'chat:<code>': the
# code and the message go to its sender as they are.
CHANGE_CODES = frozenset({"not_found", "deleted", "forbidden", "edit_window", "already_reacted", "not_reacted"})


def change_refusal(exc: BaseException) -> NotStored | None:
    if isinstance(exc, DBAPIError):
        exc = exc.orig if exc.orig is not None else exc
        exc = getattr(exc, "__cause__", None) or exc
    hint = getattr(exc, "hint", None)
    if not isinstance(hint, str) or not hint.startswith("chat:") or hint[5:] not in CHANGE_CODES:
        return None
    detail = getattr(exc, "message", None) or str(exc).splitlines()[0]
    return NotStored(hint[5:], str(detail))


def is_row_error(exc: BaseException) -> bool:
    """True when the database refused the statement because of what a row holds; anything else
    (a lost connection, Postgres shutting down, a full NOTIFY queue) is the database's failure."""
    code = sqlstate_of(exc)
    return code is not None and code[:2] in _ROW_ERROR_CLASSES


def never_sent(exc: BaseException) -> bool:
    """True when the statement certainly never reached the server, so running it again cannot
    store anything twice: the connection was found closed before sending, or asyncpg refused to
    start because the connection had just received its backend's FATAL error (terminated, and
    the close not yet seen)."""
    if isinstance(exc, asyncpg.InterfaceError):
        return "connection is closed" in str(exc)
    return isinstance(exc, asyncpg.exceptions.InternalClientError) and "cannot switch to state" in str(exc)


# --- the statement -------------------------------------------------------------------------------

# One round trip. `existing` finds client_ids stored before; `inserted` stores the rest ordered
# by (room, arrival) so that seqs follow arrival order and rooms are locked in one global order.
# $9 is the fan-out mark ('room' or 'off', migration 0007): set_config(..., true) is local to the
# statement's transaction (so also safe through a transaction-mode pooler), and runs on every
# input row before that row can reach the trigger. {returning}: what publishing needs besides
# what the writer already holds (a reply's quote as the trigger builds it, from the original,
# committed before: its seq was acked before anyone could reply to it); left out under NOTIFY.
_INSERT_BATCH = """
WITH input AS (
    SELECT * FROM unnest(
        $1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::bigint[]
    ) WITH ORDINALITY AS t(room_id, author_id, author, body, kind, client_id, target_seq, reply_to, ord)
    WHERE set_config('chat.notify', $9::text, true) = $9::text
), existing AS (
    SELECT i.ord, m.seq FROM input i
    JOIN messages m ON m.room_id = i.room_id AND m.author_id = i.author_id AND m.client_id = i.client_id
), inserted AS (
    INSERT INTO messages AS new (room_id, author_id, author, body, kind, client_id, target_seq, reply_to)
    SELECT room_id, author_id, author, body, kind, client_id, target_seq, reply_to FROM input
    WHERE ord NOT IN (SELECT ord FROM existing)
        AND (kind <> 'edit' OR chat_edit_window_check(room_id, target_seq, kind, $10::float8))
    ORDER BY room_id, ord
    RETURNING room_id, seq{returning}
)
SELECT 0 AS existing, room_id, seq, 0::bigint AS ord{columns} FROM inserted
UNION ALL
SELECT 1, 0, seq, ord{no_columns} FROM existing
"""
INSERT_BATCH = _INSERT_BATCH.format(returning="", columns="", no_columns="")
_QUOTE = f"""(
    SELECT json_build_object(
        'author', o.author, 'body', left(o.body, {QUOTE_CHARS}), 'deleted', o.deleted_at IS NOT NULL
    ) FROM messages o WHERE o.room_id = new.room_id AND o.seq = new.reply_to
)::text"""
INSERT_BATCH_TIMED = _INSERT_BATCH.format(
    returning=f", created_at, {_QUOTE} AS quote",
    columns=", created_at, quote",
    no_columns=", NULL::timestamptz, NULL::text",
)
NOTIFY_MARK = "room"  # the trigger NOTIFYs the room's channel (and not the relay's)
PUBLISH_MARK = "off"  # no NOTIFY: on_commit publishes the batch

FIND_STORED = """
SELECT seq FROM messages WHERE room_id = $1 AND author_id = $2 AND client_id = $3
"""


def batch_arguments(rows: Sequence[Pending]) -> tuple[list[Any], ...]:
    return (
        [r.room_id for r in rows],
        [r.author_id for r in rows],
        [r.author for r in rows],
        [r.body for r in rows],
        [r.kind for r in rows],
        [r.client_id for r in rows],
        [r.target_seq for r in rows],
        [r.reply_to for r in rows],
    )


Returned = tuple[datetime, str | None]  # what INSERT_BATCH_TIMED returns of a new row


def new_messages(
    rows: Sequence[Pending], results: Sequence[Stored | NotStored], times: dict[tuple[int, int], Returned]
) -> dict[int, list[MessageRecord]]:
    """Per room, in seq order, the messages a batch newly stored (no duplicates, no failures);
    `times`: (room_id, seq) -> (created_at, a reply's quote), as the statement returned them."""
    rooms: dict[int, list[MessageRecord]] = defaultdict(list)
    for row, result in zip(rows, results, strict=True):
        if isinstance(result, Stored) and not result.duplicate:
            sent_at, quote = times[(row.room_id, result.seq)]
            rooms[row.room_id].append(
                MessageRecord(
                    seq=result.seq,
                    author=row.author,
                    body=row.body,
                    kind=row.kind,
                    author_id=row.author_id,
                    client_id=row.client_id,
                    sent_at=sent_at,
                    target_seq=row.target_seq,
                    reply_to=row.reply_to,
                    quote=None if quote is None else json.loads(quote),
                )
            )
    for records in rooms.values():
        records.sort(key=lambda record: record.seq)
    return dict(rooms)


OnCommit = Callable[[int, list[MessageRecord]], Awaitable[None]]


# --- the writer ----------------------------------------------------------------------------------


class Writer:
    """This process's one writer of messages."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_rows: int,
        max_bytes: int,
        queue_rows: int,
        queue_bytes: int,
        transactional: bool = False,
        on_commit: OnCommit | None = None,
        publish_timeout: float = 3.0,
        edit_window_seconds: float = 0.0,
    ) -> None:
        self.engine = engine
        # Called after each committed batch with each room's new messages (Redis fan-out); None
        # under NOTIFY, where the trigger fans out and the statement returns no more than seqs.
        self.on_commit = on_commit
        self.publish_timeout = publish_timeout
        self._times: dict[tuple[int, int], Returned] = {}  # (room, seq) -> created_at, quote: this batch
        self.edit_window_seconds = edit_window_seconds  # 0: edits at any age (CHAT_EDIT_WINDOW_SECONDS)
        # Behind a transaction-mode pooler, asyncpg's prepare and execute (two round trips) must
        # share one transaction, or the pooler may run them on two server connections.
        self.transactional = transactional
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.queue_rows = queue_rows
        self.queue_bytes = queue_bytes
        self._waiting: deque[Pending] = deque()
        self._waiting_bytes = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # nothing waiting and no batch being stored
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the running loop, from start()
        self._closing = False
        self._conn: tuple[AsyncConnection, asyncpg.Connection] | None = None  # see _driver()
        self.batches = 0  # statements that stored a batch (for tests and the bench)

    # --- for sockets -----------------------------------------------------------------------------

    def submit(
        self,
        *,
        room_id: int,
        author_id: int | None,
        author: str,
        body: str,
        kind: str = "text",
        client_id: str | None = None,
        target_seq: int | None = None,
        reply_to: int | None = None,
    ) -> asyncio.Future[Stored]:
        """Queue one message or change; the future gives its seq once committed, or raises NotStored."""
        # The loop's own create_future: asyncio.get_running_loop() costs a getpid() per message.
        loop = self._loop or asyncio.get_running_loop()
        item = Pending(room_id, author_id, author, body, kind, client_id, target_seq, reply_to, loop.create_future())
        if self._closing or self._task is None:
            item.future.set_exception(unavailable("the server is shutting down; send it again"))
        elif len(self._waiting) >= self.queue_rows or self._waiting_bytes + item.size > self.queue_bytes:
            # Bounded: with the database this far behind, refusing is kinder than queueing.
            metrics.REFUSALS.labels("write queue full").inc()
            item.future.set_exception(unavailable("the server is busy; send it again"))
        else:
            self._waiting.append(item)
            self._waiting_bytes += item.size
            self._idle.clear()
            self._wake.set()
        return item.future

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="writer")

    async def stop(self, timeout: float = 5.0) -> None:
        """Store what is waiting (bounded by `timeout`), then refuse the rest as unavailable."""
        self._closing = True
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        await self._release_connection()
        while self._waiting:
            item = self._waiting.popleft()
            if not item.future.done():
                item.future.set_exception(unavailable("the server is shutting down; send it again"))

    # --- the loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            batch = take_batch(self._waiting, max_rows=self.max_rows, max_bytes=self.max_bytes)
            self._waiting_bytes -= sum(item.size for item in batch)
            if not self._waiting:
                self._wake.clear()
            if not batch:
                continue
            try:
                await self.store(batch)
            except asyncio.CancelledError:
                _fail(batch, unavailable("the server is shutting down; send it again"))
                raise
            except Exception as exc:  # a bug: answer, log, and keep writing for everyone else
                log.exception("storing a batch failed")
                _fail(batch, unavailable(f"the message was not stored ({type(exc).__name__}); send it again"))
            if not self._waiting:
                self._idle.set()

    async def store(self, batch: Sequence[Pending]) -> None:
        """Store a batch and resolve every future in it."""
        rows, followers = fold_duplicates(batch)
        self._times.clear()
        results = await self._store_rows(rows)
        for index, (row, result) in enumerate(zip(rows, results, strict=True)):
            _settle(row.future, result)
            for follower in followers.get(index, ()):
                if isinstance(result, Stored):
                    _settle(follower.future, Stored(result.seq, duplicate=True))
                else:
                    _settle(follower.future, result)
        metrics.MESSAGES_IN.inc(sum(1 for r in results if isinstance(r, Stored) and not r.duplicate))
        if self.on_commit is not None:
            await self._publish(new_messages(rows, results, self._times))

    async def _publish(self, rooms: dict[int, list[MessageRecord]]) -> None:
        """Hand each room's new messages to on_commit, one call per room, all at once and bounded:
        the senders have their acks already, and a fan-out that does not answer in time is its
        own to catch up on (the Redis backend wakes the rooms it owes once it answers again)."""
        if not rooms:
            return
        assert self.on_commit is not None
        calls = [self.on_commit(room_id, records) for room_id, records in rooms.items()]
        try:
            await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), self.publish_timeout)
        except TimeoutError:
            log.warning("publishing %d room(s) took over %gs; moving on", len(rooms), self.publish_timeout)

    async def _store_rows(self, rows: Sequence[Pending]) -> list[Stored | NotStored]:
        """One statement for all `rows`; on a row's error, halves in order, down to the bad row."""
        try:
            return list(await self._insert(rows))
        except NotStored as failed:
            return [failed] * len(rows)
        except Exception as exc:
            if not is_row_error(exc):
                log.warning("storing %d message(s) failed: %r", len(rows), exc)
                return [unavailable()] * len(rows)
            if len(rows) > 1:
                first, second = halves(rows)
                stored = await self._store_rows(first)
                return stored + await self._store_rows(second)
            return [await self._alone(rows[0], exc)]

    async def _alone(self, row: Pending, exc: Exception) -> Stored | NotStored:
        """A row the database refused on its own: a client_id another process stored first is a
        duplicate; anything else is this row's error, answered to its sender alone."""
        if sqlstate_of(exc) == UNIQUE_VIOLATION and row.key is not None:
            try:
                seq = await self._run_statement(FIND_STORED, row.room_id, row.author_id, row.client_id, fetch="val")
            except Exception as again:
                log.warning("looking up a duplicate failed: %r", again)
                return unavailable()
            if isinstance(seq, int):
                return Stored(seq, duplicate=True)
        refused = change_refusal(exc)
        if refused is not None:
            return refused
        log.info("the database refused a message: %r", exc)
        detail = getattr(exc, "message", None) or str(exc).splitlines()[0]
        return NotStored(REJECTED, f"the database refused the message: {detail}")

    async def _insert(self, rows: Sequence[Pending]) -> list[Stored]:
        publish = self.on_commit is not None
        sql, mark = (INSERT_BATCH_TIMED, PUBLISH_MARK) if publish else (INSERT_BATCH, NOTIFY_MARK)
        records = await self._run_statement(sql, *batch_arguments(rows), mark, self.edit_window_seconds, fetch="all")
        assert isinstance(records, list)
        existing = {int(r["ord"]) - 1: int(r["seq"]) for r in records if r["existing"]}
        inserted = [(int(r["room_id"]), int(r["seq"])) for r in records if not r["existing"]]
        if publish:
            self._times.update(
                ((int(r["room_id"]), int(r["seq"])), (r["created_at"], r["quote"]))
                for r in records
                if not r["existing"]
            )
        self.batches += 1
        return assign_seqs(rows, existing, inserted)

    async def _run_statement(self, sql: str, *args: Any, fetch: str) -> Any:
        """Run one autocommit statement on the writer's pooled connection: its implicit
        transaction holds the seq bumps, the rows and the NOTIFYs, and commits them together, in
        one round trip. A statement that never reached the server (its connection was found
        closed) is tried once more on a fresh connection."""
        for attempt in (1, 2):
            driver = await self._driver()
            try:
                async with driver.transaction() if self.transactional else contextlib.nullcontext():
                    if fetch == "all":
                        return await driver.fetch(sql, *args)
                    return await driver.fetchval(sql, *args)
            except Exception as exc:
                if driver.is_closed() or never_sent(exc) or isinstance(exc, (OSError, asyncpg.InterfaceError)):
                    await self._drop_connection()  # never use this connection again
                if attempt == 1 and never_sent(exc):
                    log.info("retrying a statement that never reached the server")
                    continue
                raise
        raise AssertionError("unreachable")

    async def _driver(self) -> asyncpg.Connection:
        """The writer's connection, checked out of the pool once and kept: a checkout and a
        check-in per batch (SQLAlchemy's pool, through greenlets) cost more CPU than the
        statement. One found closed (its backend was terminated, Postgres restarted) is dropped
        and a fresh one checked out, as the pool's checkout does."""
        held = self._conn
        if held is not None:
            if not held[1].is_closed():
                return held[1]
            await self._drop_connection()
        conn = await self.engine.connect()
        try:
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            assert isinstance(driver, asyncpg.Connection)
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        self._conn = (conn, driver)
        return driver

    async def _drop_connection(self) -> None:
        held, self._conn = self._conn, None
        if held is not None:
            with contextlib.suppress(Exception):
                await held[0].invalidate()
            with contextlib.suppress(Exception):
                await held[0].close()

    async def _release_connection(self) -> None:
        held, self._conn = self._conn, None
        if held is not None:
            with contextlib.suppress(Exception):
                await held[0].close()


def _settle(future: asyncio.Future[Stored], result: Stored | NotStored) -> None:
    if future.done():  # its socket is gone and cancelled it
        return
    if isinstance(result, Stored):
        future.set_result(result)
    else:
        future.set_exception(result)


def _fail(batch: Iterable[Pending], error: NotStored) -> None:
    for item in batch:
        _settle(item.future, error)


# --- one socket's sends in flight ----------------------------------------------------------------

Render = Callable[["asyncio.Future[Stored]"], str | None]  # the answer to a send, once it is settled


class InFlight:
    """One socket's sends in flight: at most `limit` at a time, and about `max_bytes` of their
    text, answered in the order they were received. `reserve()` waits for a free slot (and for
    the bytes in flight to fall under `max_bytes`), so a socket at its bound stops reading and
    TCP pushes back on the client. `settle()` waits until every answer has gone out (a graceful
    close flushes the acks of sends still in flight)."""

    # One per socket, and most sockets are idle: the semaphore, the queue and the events are
    # made when first needed (an idle socket keeps none of them).
    __slots__ = ("_bytes", "_deliver", "_empty", "_limit", "_queue", "_room", "_slots", "max_bytes")

    def __init__(self, limit: int, deliver: Callable[[str], object], *, max_bytes: int | None = None) -> None:
        self._limit = limit
        self._deliver = deliver
        # A batch's commit brings this socket the echoes of all its sends in it at once: their
        # text must fit its queue's byte bound beside what is queued already. None: unbounded.
        self.max_bytes = max_bytes
        self._bytes = 0
        self._slots: asyncio.Semaphore | None = None
        self._queue: deque[tuple[asyncio.Future[Stored] | None, Render | str | None, int]] | None = None
        self._empty: asyncio.Event | None = None  # set when the queue empties, for settle()
        self._room: asyncio.Event | None = None  # made when a reserve first waits for bytes

    @property
    def count(self) -> int:
        return len(self._queue) if self._queue else 0

    async def reserve(self) -> None:
        slots = self._slots
        if slots is None:
            slots = self._slots = asyncio.Semaphore(self._limit)
        await slots.acquire()
        try:
            # Over the byte bound only while something is in flight, whose answer makes room.
            while self.max_bytes is not None and self._bytes >= self.max_bytes:
                if self._room is None:
                    self._room = asyncio.Event()
                self._room.clear()
                await self._room.wait()
        except BaseException:
            slots.release()
            raise

    def add(self, future: asyncio.Future[Stored], render: Render, size: int = 0) -> None:
        """A send now in flight (after `reserve()`), `size` characters of text: its answer goes
        out after every earlier one."""
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        queue.append((future, render, size))
        self._bytes += size
        future.add_done_callback(self._flush)

    def answer(self, text: str) -> None:
        """An answer to a send that needed no commit (an error): in order behind those in flight."""
        if not self._queue:
            self._deliver(text)
            return
        self._queue.append((None, text, 0))

    def _flush(self, _: object = None) -> None:
        queue = self._queue
        while queue:
            future, reply, size = queue[0]
            if future is not None and not future.done():
                return
            queue.popleft()
            if future is not None:
                assert self._slots is not None
                self._slots.release()
                self._bytes -= size
                if self._room is not None:
                    self._room.set()
                assert callable(reply)
                text = reply(future)
            else:
                assert isinstance(reply, str)
                text = reply
            if text is not None:
                self._deliver(text)
        if self._queue is queue:
            self._queue = None
        if (empty := self._empty) is not None:
            self._empty = None
            empty.set()

    async def settle(self) -> None:
        """Until every answer in flight has gone out."""
        if not self._queue:
            return
        empty = self._empty
        if empty is None:
            empty = self._empty = asyncio.Event()
        await empty.wait()
