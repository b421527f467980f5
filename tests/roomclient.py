"""A test client for the room protocol over a real socket. Like a browser, it reads all the
time (a background task), so the server never sees it as a slow consumer."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

Frame = dict[str, Any]


class RoomClient:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[Frame] = []  # everything received, in order
        self._taken: set[int] = set()  # indexes of frames until() has returned
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, token: str, *, after: int | None = None, **kwargs: Any) -> RoomClient:
        query = f"?after={after}" if after is not None else ""
        ws = await connect(url + query, additional_headers={"Cookie": f"session={token}"}, **kwargs)
        return cls(ws)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.frames.append(json.loads(raw))
                self._changed.set()
        except ConnectionClosed:
            pass
        finally:
            self._changed.set()

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code if self._reader.done() else None

    async def _wait(self) -> None:
        if self._reader.done():
            raise ConnectionError(f"the socket closed with {self.ws.close_code} {self.ws.close_reason!r}")
        await self._changed.wait()

    async def until(self, type_: str, timeout: float = 15.0, **match: Any) -> Frame:
        """The first frame of this type (and these fields) that until() has not returned yet."""
        async with asyncio.timeout(timeout):
            while True:
                self._changed.clear()
                for index, frame in enumerate(self.frames):
                    if index in self._taken or frame["type"] != type_:
                        continue
                    if all(frame.get(k) == v for k, v in match.items()):
                        self._taken.add(index)
                        return frame
                await self._wait()

    async def ready(self) -> Frame:
        return await self.until("ready")

    async def until_seq(self, seq: int, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while True:
                self._changed.clear()
                if self.seqs() and self.seqs()[-1] >= seq:
                    return
                await self._wait()

    async def wait_closed(self, timeout: float = 15.0) -> int | None:
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        return self.ws.close_code

    async def send(self, body: str, client_id: str | None = None) -> None:
        frame: Frame = {"type": "send", "body": body}
        if client_id is not None:
            frame["client_id"] = client_id
        await self.ws.send(json.dumps(frame))

    def messages(self) -> list[Frame]:
        """Every message received, in order: `message` frames, and those in `messages` frames."""
        out: list[Frame] = []
        for frame in self.frames:
            if frame["type"] == "message":
                out.append(frame)
            elif frame["type"] == "messages":
                out += frame["messages"]
        return out

    def seqs(self) -> list[int]:
        return [m["seq"] for m in self.messages()]

    def bodies(self) -> list[str]:
        return [m["body"] for m in self.messages()]

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.gather(self._reader, return_exceptions=True)

    @staticmethod
    def refused() -> type[Exception]:
        """What open() raises for a socket refused before accept (an HTTP status)."""
        return InvalidStatus

    async def __aenter__(self) -> RoomClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
