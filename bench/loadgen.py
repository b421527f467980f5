"""The load generator: worker processes, each an asyncio (uvloop) loop holding many WebSocket clients.

A client is a thin asyncio Protocol around the `websockets` package's sans-I/O ClientProtocol, not
its asyncio client: no reader task, no message queue and no future per frame, so one worker
process reads tens of thousands of frames per second. Frames are parsed with bytes.find on
the fields we need (seq, the send timestamp in the body), falling back to json for anything else.

Messages carry their send time (CLOCK_MONOTONIC, the same clock in every process on a Linux
machine) in the body and the client_id: `<20-digit ns> <6-digit sender id> <n>`. A receiver's
latency is its receive time minus that; the sender's own copy is counted as a delivery but
not as a latency sample ("delivery at every other member").

The orchestrator drives a worker over a pipe with (command, arguments) pairs; each command
answers with one dict.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import resource
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from bench.stats import summary

now_ns = time.monotonic_ns
TIMELINE_STEP = 100_000_000  # ns

MESSAGE = b'{"type":"message"'
MESSAGES = b'{"type":"messages"'
ACK = b'{"type":"ack"'
SEQ = b'"seq":'
BODY = b'"body":"'
CLIENT_ID = b'"client_id":"'


def message_text(sender: int, n: int) -> bytes:
    t = now_ns()
    return b'{"type":"send","body":"%020d %06d %d","client_id":"%020d-%06d-%d"}' % (t, sender, n, t, sender, n)


@dataclass
class Sink:
    """What one worker measured since the last reset."""

    measure_from: int = 0  # latency samples: messages *sent* in [measure_from, measure_to] (ns)
    measure_to: int = 0
    latencies: array[int] = field(default_factory=lambda: array("q"))  # ns, other members only
    ack_latencies: array[int] = field(default_factory=lambda: array("q"))  # send -> ack (committed), ns
    deliveries: int = 0  # message frames received live (after ready), sender's own copy included
    window_deliveries: int = 0  # ... of which received inside [measure_from, measure_to]
    acks: int = 0
    acked_seq: dict[str, int] = field(default_factory=dict)  # room -> highest acked seq
    errors: Counter[str] = field(default_factory=Counter)
    closed: Counter[int] = field(default_factory=Counter)  # close codes of sockets we did not close
    events: int = 0  # join/leave and other frames
    # Worst latency per TIMELINE_STEP of send time over the whole load (warm-up included), to see
    # when stalls happen: deliveries (other members) and acks.
    timeline_start: int = 0
    timeline: array[int] = field(default_factory=lambda: array("q"))
    ack_timeline: array[int] = field(default_factory=lambda: array("q"))

    def reset(self) -> None:
        """Start measuring afresh; clients keep their reference to this object."""
        fresh = Sink()
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))


class WsClient(asyncio.Protocol):
    """One WebSocket client connection."""

    def __init__(self, gid: int, url: str, room: str | None, token: str | None, sink: Sink, *, deflate: bool) -> None:
        self.gid = gid
        self.url = url
        self.room = room or ""
        self.token = token
        self.sink = sink
        extensions = [ClientPerMessageDeflateFactory(client_max_window_bits=True)] if deflate else None
        self.ws = ClientProtocol(parse_uri(url), max_size=None, extensions=extensions)
        loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[int] = loop.create_future()  # ns when the 101 arrived
        self.ready: asyncio.Future[int] = loop.create_future()  # last_seq from the ready frame
        self.closed: asyncio.Future[None] = loop.create_future()
        self.reply: asyncio.Future[bytes] | None = None  # a history/pong answer being waited for
        self.transport: asyncio.Transport | None = None
        self.is_ready = room is None
        self.start_seq = 0
        self.last_seq = 0
        self.received = 0  # live messages, unique and in order
        self.replayed = 0  # messages before ready
        self.duplicates = 0
        self.gaps = 0
        self.sent = 0
        self.acked = 0
        self.closing = False  # we asked for the close
        self.readies = 0  # ready frames: one per room subscribed on /socket
        self.subscribed: asyncio.Future[None] | None = None  # done at `wanted` ready frames
        self.wanted = 0
        self.on_message: Callable[[int, int], None] | None = None  # (seq, sender) hook for probes

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        request = self.ws.connect()
        if self.token:
            request.headers["Cookie"] = f"session={self.token}"
        self.ws.send_request(request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        now = now_ns()
        ws = self.ws
        ws.receive_data(data)
        events = ws.events_received()
        self._flush()  # pongs, close replies
        for event in events:
            if isinstance(event, Frame):
                if event.opcode is Opcode.TEXT:
                    self._on_text(bytes(event.data), now)
            elif not self.handshake.done():  # the handshake response
                if ws.handshake_exc is not None:
                    self.handshake.set_exception(ws.handshake_exc)
                else:
                    self.handshake.set_result(now)
                    if self.room == "":
                        self.ready.set_result(0)

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closing:
            code = self.ws.close_rcvd.code if self.ws.close_rcvd is not None else 1006
            self.sink.closed[code] += 1
        error = ConnectionError(f"closed: {exc or self.ws.close_rcvd}")
        for future in (self.handshake, self.ready):
            if not future.done():
                future.set_exception(error)
                future.exception()  # mark retrieved: nobody may be waiting any more
        if self.reply is not None and not self.reply.done():
            self.reply.set_exception(error)
        if self.subscribed is not None and not self.subscribed.done():
            self.subscribed.set_exception(error)
            self.subscribed.exception()
        if not self.closed.done():
            self.closed.set_result(None)

    # --- frames ----------------------------------------------------------------------------------

    def _on_text(self, data: bytes, now: int) -> None:
        if data.startswith(MESSAGES):
            # A replay's batch, or (live=batch) the messages one commit stored: each is its own
            # `message` frame's JSON, and a string in JSON never holds an unescaped quote, so
            # each message starts where MESSAGE occurs.
            start = data.find(MESSAGE, len(MESSAGES))
            while start >= 0:
                end = data.find(MESSAGE, start + 1)
                self._on_message(data[start : end if end >= 0 else len(data)], now)
                start = end
        elif data.startswith(MESSAGE):
            self._on_message(data, now)
        else:
            self._on_other(data, now)

    def _on_message(self, data: bytes, now: int) -> None:
        sink = self.sink
        i = data.find(SEQ) + 6
        seq = int(data[i : data.find(b",", i)])
        if not self.is_ready:
            self.replayed += 1
            return
        if seq <= self.last_seq:
            self.duplicates += 1
            return
        if seq != self.last_seq + 1:
            self.gaps += seq - self.last_seq - 1
        self.last_seq = seq
        self.received += 1
        sink.deliveries += 1
        if sink.measure_from <= now <= sink.measure_to:
            sink.window_deliveries += 1
        k = data.find(BODY) + 8
        try:
            sent = int(data[k : k + 20])
            sender = int(data[k + 21 : k + 27])
        except ValueError:
            return  # not one of ours (history room)
        if sender != self.gid:
            if sink.measure_from <= sent <= sink.measure_to:
                sink.latencies.append(now - sent)
            b = (sent - sink.timeline_start) // TIMELINE_STEP
            if 0 <= b < len(sink.timeline) and now - sent > sink.timeline[b]:
                sink.timeline[b] = now - sent
        if self.on_message is not None:
            self.on_message(seq, sender)

    def _on_other(self, data: bytes, now: int) -> None:
        sink = self.sink
        if data.startswith(ACK):
            k = data.find(CLIENT_ID) + 13
            i = data.find(SEQ) + 6
            sent = int(data[k : k + 20])
            seq = int(data[i : data.find(b",", i)])
            self.acked += 1
            sink.acks += 1
            if seq > sink.acked_seq.get(self.room, 0):
                sink.acked_seq[self.room] = seq
            if sink.measure_from <= sent <= sink.measure_to:
                sink.ack_latencies.append(now - sent)
            b = (sent - sink.timeline_start) // TIMELINE_STEP
            if 0 <= b < len(sink.ack_timeline) and now - sent > sink.ack_timeline[b]:
                sink.ack_timeline[b] = now - sent
        else:
            frame = json.loads(data)
            kind = frame.get("type")
            if kind == "ready":
                self.readies += 1
                if self.subscribed is not None and self.readies >= self.wanted and not self.subscribed.done():
                    self.subscribed.set_result(None)
                self.start_seq = self.last_seq = int(frame.get("last_seq") or 0)
                self.is_ready = True
                if not self.ready.done():
                    self.ready.set_result(self.start_seq)
            elif kind in ("history", "pong"):
                if self.reply is not None and not self.reply.done():
                    self.reply.set_result(data)
            elif kind == "error":
                sink.errors[str(frame.get("code"))] += 1
                if self.reply is not None and not self.reply.done() and "client_id" not in frame:
                    self.reply.set_result(data)  # the answer to a request was a refusal
            else:
                sink.events += 1

    # --- sending ---------------------------------------------------------------------------------

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            self.ws.data_to_send()
            return
        for chunk in self.ws.data_to_send():
            if chunk:
                transport.write(chunk)
            elif transport.can_write_eof():
                transport.write_eof()

    @property
    def open(self) -> bool:
        return self.transport is not None and self.is_ready and not self.closing

    def send_text(self, text: bytes) -> None:
        self.ws.send_text(text)
        self._flush()

    def send_message(self) -> None:
        self.sent += 1
        self.send_text(message_text(self.gid, self.sent))

    async def request(self, frame: dict[str, Any], timeout: float = 10.0) -> bytes:
        self.reply = asyncio.get_running_loop().create_future()
        self.send_text(json.dumps(frame).encode())
        return await asyncio.wait_for(self.reply, timeout)

    async def close(self, timeout: float = 5.0) -> None:
        self.closing = True
        if self.transport is None:
            return
        with contextlib.suppress(Exception):
            self.ws.send_close(1000)
            self._flush()
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            if self.transport is not None:
                self.transport.abort()


async def connect(
    gid: int, url: str, room: str | None, token: str | None, sink: Sink, *, deflate: bool, timeout: float = 30.0
) -> tuple[WsClient, dict[str, float]]:
    """Open a client; for a room socket, wait for its ready frame. Returns the client and its
    timings in ms from the start of the TCP connect: tcp, handshake (101 received), ready."""
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    client = WsClient(gid, url, room, token, sink, deflate=deflate)
    t0 = now_ns()
    async with asyncio.timeout(timeout):
        await loop.create_connection(lambda: client, parts.hostname or "127.0.0.1", parts.port or 80)
        t1 = now_ns()
        shaken = await client.handshake
        await client.ready
    t2 = now_ns()
    return client, {"tcp": (t1 - t0) / 1e6, "handshake": (shaken - t0) / 1e6, "ready": (t2 - t0) / 1e6}


def _ms(samples: array[int]) -> list[float]:
    return [x / 1e6 for x in samples]


class Worker:
    """The worker side: holds clients between commands; one command at a time."""

    def __init__(self, index: int, pipe: multiprocessing.connection.Connection) -> None:
        self.index = index
        self.pipe = pipe
        self.sink = Sink()
        self.clients: dict[int, WsClient] = {}
        self.deflate = True

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        commands: dict[str, Callable[..., Coroutine[Any, Any, dict[str, Any]]]] = {
            "open": self.open,
            "load": self.load,
            "drain": self.drain,
            "close": self.close,
            "joins": self.joins,
            "socket_joins": self.socket_joins,
            "probe": self.probe,
            "history": self.history,
            "count": self.count,
            "subscribe": self.subscribe,
            "configure": self.configure,
        }
        while True:
            command, args = await loop.run_in_executor(None, self.pipe.recv)
            if command == "exit":
                await self.close()
                self.pipe.send({})
                return
            try:
                result = await commands[command](**args)
            except Exception as exc:
                result = {"_error": f"{command}: {exc!r}\n{traceback.format_exc()}"}
            self.pipe.send(result)

    async def configure(self, *, deflate: bool) -> dict[str, Any]:
        self.deflate = deflate
        return {}

    async def open(
        self, *, specs: Sequence[tuple[int, str, str | None, str | None]], concurrency: int = 16, timeout: float = 60.0
    ) -> dict[str, Any]:
        """Open clients (gid, url, room, token), `concurrency` at a time; keep them."""
        gate = asyncio.Semaphore(concurrency)
        failures: Counter[str] = Counter()
        ready_ms: list[float] = []

        async def one(gid: int, url: str, room: str | None, token: str | None) -> None:
            async with gate:
                try:
                    client, times = await connect(
                        gid, url, room, token, self.sink, deflate=self.deflate, timeout=timeout
                    )
                except Exception as exc:
                    failures[type(exc).__name__ + ": " + str(exc)[:120]] += 1
                    return
                self.clients[gid] = client
                ready_ms.append(times["ready"])

        await asyncio.gather(*(one(*spec) for spec in specs))
        return {"opened": len(ready_ms), "failed": dict(failures), "ready_ms": summary(ready_ms)}

    async def subscribe(
        self,
        *,
        specs: Sequence[tuple[int, str, str | None, Sequence[str]]],
        concurrency: int = 16,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Open `/socket` clients (gid, url, token, rooms) and subscribe each to its rooms, all at
        once; keep them. Per client: ms from the TCP connect to the last room's ready frame."""
        gate = asyncio.Semaphore(concurrency)
        failures: Counter[str] = Counter()
        ready_ms: list[float] = []

        async def one(gid: int, url: str, token: str | None, rooms: Sequence[str]) -> None:
            async with gate:
                t0 = now_ns()
                try:
                    client, _ = await connect(gid, url, None, token, self.sink, deflate=self.deflate, timeout=timeout)
                    self.clients[gid] = client
                    client.wanted = len(rooms)
                    client.subscribed = asyncio.get_running_loop().create_future()
                    if not rooms:
                        client.subscribed.set_result(None)  # nothing to wait for
                    for room in rooms:
                        client.send_text(b'{"type":"subscribe","room":"%s"}' % room.encode())
                    await asyncio.wait_for(asyncio.shield(client.subscribed), timeout)
                except Exception as exc:
                    failures[type(exc).__name__ + ": " + str(exc)[:120]] += 1
                    return
                ready_ms.append((now_ns() - t0) / 1e6)

        await asyncio.gather(*(one(*spec) for spec in specs))
        return {
            "opened": len(ready_ms),
            "failed": dict(failures),
            "ready_ms": ready_ms,
            "errors": dict(self.sink.errors),
        }

    async def load(
        self, *, start_at: int, warmup: float, duration: float, rate: float, senders: Sequence[int], ack_timeout: float
    ) -> dict[str, Any]:
        """Send `rate` messages/s, spread over `senders` in turn, from start_at (monotonic ns) for
        `duration` seconds; then wait (bounded) for every ack. The latency window starts after
        `warmup`."""
        sink = self.sink
        sink.reset()
        sink.measure_from = start_at + int(warmup * 1e9)
        end = start_at + int(duration * 1e9)
        sink.measure_to = end
        sink.timeline_start = start_at
        steps = int(duration * 1e9) // TIMELINE_STEP + 1
        sink.timeline = array("q", bytes(8 * steps))
        sink.ack_timeline = array("q", bytes(8 * steps))
        clients = [self.clients[g] for g in senders if g in self.clients]
        base = {id(c): c.acked for c in clients}  # acks from before this load do not count
        lags = array("q")
        sent = skipped = 0
        if clients and rate > 0:
            interval = 1e9 / rate
            due = float(start_at)
            i = 0
            n = len(clients)
            while due < end:
                now = now_ns()
                if now < due:
                    await asyncio.sleep((due - now) / 1e9)
                    continue
                while due <= now and due < end:
                    client = clients[i % n]
                    i += 1
                    if client.open:
                        client.send_message()
                        sent += 1
                    else:
                        skipped += 1
                    lags.append(now_ns() - int(due))
                    due += interval
                await asyncio.sleep(0)  # let frames in between bursts
        deadline = now_ns() + int(ack_timeout * 1e9)
        while now_ns() < deadline and any(c.transport is not None for c in clients):
            answered = sum(c.acked - base[id(c)] for c in clients) + sum(sink.errors.values())
            if answered >= sent:
                break
            await asyncio.sleep(0.02)
        acked = sum(c.acked - base[id(c)] for c in clients)
        return {
            "sent": sent,
            "skipped": skipped,
            "acked": acked,
            "errors": dict(sink.errors),
            "acked_seq": dict(sink.acked_seq),
            "lag_ms": summary(_ms(lags)),
        }

    async def drain(self, *, final: dict[str, int], timeout: float) -> dict[str, Any]:
        """Wait until each member of the rooms in `final` has every seq up to final[room] (or the
        timeout); then report what was delivered, lost and measured."""
        members = [c for c in self.clients.values() if c.room in final]
        deadline = now_ns() + int(timeout * 1e9)
        # Polling: "every member has caught up" is a condition over thousands of clients.
        while now_ns() < deadline and any(c.last_seq < final[c.room] and c.transport is not None for c in members):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        expected = sum(max(0, final[c.room] - c.start_seq) for c in members)
        received = sum(c.received for c in members)
        sink = self.sink
        return {
            "members": len(members),
            "expected": expected,
            "received": received,
            "missing": sum(max(0, final[c.room] - c.last_seq) for c in members) + sum(c.gaps for c in members),
            "duplicates": sum(c.duplicates for c in members),
            "deliveries": sink.deliveries,
            "window_deliveries": sink.window_deliveries,
            "latencies_ns": sink.latencies.tobytes(),
            "ack_latencies_ns": sink.ack_latencies.tobytes(),
            "timeline_ns": list(sink.timeline),
            "ack_timeline_ns": list(sink.ack_timeline),
            "closed": dict(sink.closed),
            "errors": dict(sink.errors),
            "events": sink.events,
        }

    async def close(self, *, gids: Sequence[int] | None = None) -> dict[str, Any]:
        chosen = list(self.clients) if gids is None else [g for g in gids if g in self.clients]
        clients = [self.clients.pop(g) for g in chosen]
        for start in range(0, len(clients), 500):  # in batches: a close costs the server a leave event
            await asyncio.gather(*(c.close() for c in clients[start : start + 500]))
        return {"closed": len(clients)}

    async def count(self) -> dict[str, Any]:
        alive = sum(1 for c in self.clients.values() if c.transport is not None)
        return {"open": alive, "held": len(self.clients), "closed": dict(self.sink.closed)}

    async def joins(
        self,
        *,
        urls: Sequence[str],
        room: str | None,
        token: str | None,
        n: int,
        concurrent: bool = False,
        gid_base: int = 900_000,
        tokens: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Join cost: open n clients (one after another, or all at once), timing each from the
        TCP connect to ready (room) or to the handshake (bare accept); close each afterwards.
        With `tokens`, the i-th client uses the i-th of them (in turn) instead of `token`."""
        sink = Sink()
        timings: list[dict[str, float]] = []
        replayed: list[int] = []
        failures: Counter[str] = Counter()

        async def one(i: int) -> WsClient | None:
            try:
                client, times = await connect(
                    gid_base + i, urls[i % len(urls)], room, tokens[i % len(tokens)] if tokens else token, sink,
                    deflate=self.deflate,
                )  # fmt: skip
            except Exception as exc:
                failures[type(exc).__name__ + ": " + str(exc)[:120]] += 1
                return None
            timings.append(times)
            replayed.append(client.replayed)
            return client

        t0 = now_ns()
        if concurrent:
            opened = await asyncio.gather(*(one(i) for i in range(n)))
            wall = (now_ns() - t0) / 1e9
            await asyncio.gather(*(c.close() for c in opened if c is not None))
        else:
            for i in range(n):
                client = await one(i)
                if client is not None:
                    await client.close()
            wall = (now_ns() - t0) / 1e9
        return {
            "ready_ms": [t["ready"] for t in timings],
            "handshake_ms": [t["handshake"] for t in timings],
            "replayed": summary(replayed),
            "failed": dict(failures),
            "wall_s": wall,
        }

    async def socket_joins(self, *, urls: Sequence[str], room: str, token: str, n: int) -> dict[str, Any]:
        """Join cost on `/socket`: n clients one after another, each timed from the TCP connect
        to the `ready` of its one subscribe (the replay comes as `messages` batch frames); each
        closed before the next."""
        sink = Sink()
        timings: list[dict[str, float]] = []
        replayed: list[int] = []
        failures: Counter[str] = Counter()
        subscribe = json.dumps({"type": "subscribe", "room": room}).encode()
        t0 = now_ns()
        for i in range(n):
            start = now_ns()
            try:
                client, times = await connect(950_000 + i, urls[i % len(urls)], None, token, sink, deflate=self.deflate)
                # connect() took the handshake for ready (no room in the URL): wait for the room's.
                client.ready = asyncio.get_running_loop().create_future()
                client.is_ready = False  # messages before the subscribe's ready are its replay
                client.send_text(subscribe)
                await asyncio.wait_for(asyncio.shield(client.ready), 30)
            except Exception as exc:
                failures[type(exc).__name__ + ": " + str(exc)[:120]] += 1
                continue
            times["ready"] = (now_ns() - start) / 1e6
            timings.append(times)
            replayed.append(client.replayed)
            await client.close()
        return {
            "ready_ms": [t["ready"] for t in timings],
            "handshake_ms": [t["handshake"] for t in timings],
            "replayed": summary(replayed),
            "failed": dict(failures),
            "wall_s": (now_ns() - t0) / 1e9,
        }

    async def probe(self, *, url: str, room: str, token: str, n: int) -> dict[str, Any]:
        """Responsiveness: a fresh join, then n messages one at a time, each timed from send to
        its delivery back to the sender."""
        sink = Sink()
        client, times = await connect(800_000 + self.index, url, room, token, sink, deflate=self.deflate)
        loop = asyncio.get_running_loop()
        rtts: list[float] = []
        waiter: asyncio.Future[int] | None = None

        def seen(seq: int, sender: int) -> None:
            if waiter is not None and not waiter.done() and sender == client.gid:
                waiter.set_result(seq)

        client.on_message = seen
        try:
            for _ in range(n):
                waiter = loop.create_future()
                t = now_ns()
                client.send_message()
                await asyncio.wait_for(waiter, 10.0)
                rtts.append((now_ns() - t) / 1e6)
        finally:
            await client.close()
        return {"join_ms": times["ready"], "rtt_ms": rtts}

    async def history(self, *, url: str, room: str, token: str, befores: Sequence[int], limit: int) -> dict[str, Any]:
        """History requests on one socket, one at a time; round trip per request in ms."""
        sink = Sink()
        client, times = await connect(700_000 + self.index, url, room, token, sink, deflate=self.deflate)
        rtts: list[float] = []
        counts: list[int] = []
        try:
            for before in befores:
                t = now_ns()
                reply = await client.request({"type": "history", "before": before, "limit": limit})
                if not reply.startswith(b'{"type":"history"'):
                    raise RuntimeError(f"history request refused: {reply[:200]!r}")
                rtts.append((now_ns() - t) / 1e6)
                counts.append(reply.count(b'"type":"message"'))
        finally:
            await client.close()
        return {"rtt_ms": rtts, "messages": summary(counts), "join_ms": times["ready"], "replayed": client.replayed}


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def worker_main(index: int, pipe: multiprocessing.connection.Connection) -> None:
    _raise_fd_limit()
    try:
        import uvloop

        runner: Callable[[Coroutine[Any, Any, None]], None] = uvloop.run
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        runner = asyncio.run
    runner(Worker(index, pipe).serve())


class LoadGen:
    """The orchestrator's handle on the worker processes."""

    def __init__(self, processes: int, *, deflate: bool = True) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[multiprocessing.connection.Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for index in range(processes):
            ours, theirs = context.Pipe()
            proc = context.Process(target=worker_main, args=(index, theirs), name=f"loadgen-{index}", daemon=True)
            proc.start()
            theirs.close()
            self.pipes.append(ours)
            self.procs.append(proc)
        # Replies still owed by a worker for commands whose wait timed out: the worker runs one
        # command at a time, so they come before the answer to the next one and are skipped.
        self.stale = [0] * processes
        self.all("configure", [{"deflate": deflate}] * processes)

    def __len__(self) -> int:
        return len(self.procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def send(self, index: int, command: str, args: dict[str, Any]) -> None:
        self.pipes[index].send((command, args))

    def recv(self, index: int, timeout: float = 900.0) -> dict[str, Any]:
        pipe = self.pipes[index]
        while self.stale[index] and pipe.poll(timeout):
            pipe.recv()
            self.stale[index] -= 1
        if self.stale[index] or not pipe.poll(timeout):
            self.stale[index] += 1
            raise TimeoutError(f"load generator {index} did not answer in {timeout:.0f}s")
        result: dict[str, Any] = pipe.recv()
        if "_error" in result:
            raise RuntimeError(f"load generator {index} failed: {result['_error']}")
        return result

    def send_all(self, command: str, args: Sequence[dict[str, Any]]) -> None:
        for index, arg in enumerate(args):
            self.send(index, command, arg)

    def recv_all(self, timeout: float = 900.0) -> list[dict[str, Any]]:
        return [self.recv(i, timeout) for i in range(len(self.procs))]

    def all(self, command: str, args: Sequence[dict[str, Any]], timeout: float = 900.0) -> list[dict[str, Any]]:
        self.send_all(command, args)
        return self.recv_all(timeout)

    def call(self, index: int, command: str, args: dict[str, Any], timeout: float = 900.0) -> dict[str, Any]:
        self.send(index, command, args)
        return self.recv(index, timeout)

    def stop(self) -> None:
        for index, proc in enumerate(self.procs):
            if proc.is_alive():
                with contextlib.suppress(OSError, BrokenPipeError):
                    self.send(index, "exit", {})
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
