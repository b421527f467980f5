"""Rate and connection limits, per process.

Every frame a client sends costs one token from two buckets: its connection's and its user's
(shared by all of that user's sockets in this process). An empty bucket refuses the frame with
an error frame; a client that keeps going while refused is closed as a flood. Big frames, and big
replies (history), cost more: one token more per `rate_token_bytes`, charged as a debt that later
frames wait out, so a small request cannot buy a large answer again and again. The HTTP API has
a bucket per user of its own. Replays (a join's history) run a few at a time per user.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from chat import protocol
from chat.config import Settings


@dataclass(slots=True)
class TokenBucket:
    rate: float  # tokens per second
    burst: float  # capacity
    tokens: float = -1.0
    stamp: float = field(default_factory=time.monotonic)
    fresh: bool = True  # full until first used

    def _refill(self, now: float) -> None:
        if self.fresh:
            self.tokens, self.fresh = self.burst, False
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, now: float, cost: float = 1.0) -> float:
        """0.0 if `cost` tokens are there (nothing is taken), else the seconds until they will be."""
        self._refill(now)
        return 0.0 if self.tokens >= cost else (cost - self.tokens) / self.rate

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take `cost` tokens; 0.0 if there were enough, else the seconds until there will be
        (and nothing is taken)."""
        wait = self.wait(now, cost)
        if wait == 0.0:
            self.tokens -= cost
        return wait

    def charge(self, now: float, cost: float) -> None:
        """Take `cost` tokens even if they are not there: the debt delays what comes next."""
        self._refill(now)
        self.tokens -= cost


def byte_cost(size: int, token_bytes: int) -> float:
    """Tokens a frame or reply of `size` bytes costs beyond its first one."""
    return size / token_bytes


class RateLimited(Exception):
    def __init__(self, retry_after: float, flood: bool) -> None:
        super().__init__(f"rate limited; retry in {retry_after:.2f}s")
        self.retry_after = retry_after
        self.flood = flood  # refused so often in a row that the socket should be closed

    def frame(self) -> str:
        """The error frame that tells a client when to try again: in hundredths of a second,
        rounded up, so that a wait of a few milliseconds is never told as 0."""
        wait = max(0.01, math.ceil(self.retry_after * 100) / 100)
        return protocol.error_frame("rate_limited", f"slow down: retry in {wait:.2f}s", retry_after=wait)


class FrameGuard:
    """One connection's view of the limits."""

    __slots__ = ("_bucket", "limits", "refused_in_a_row", "user_id")  # one per socket

    def __init__(self, limits: Limits, user_id: int) -> None:
        self.limits = limits
        self.user_id = user_id
        self._bucket: TokenBucket | None = None  # made by the first frame: an idle socket keeps none
        self.refused_in_a_row = 0

    @property
    def bucket(self) -> TokenBucket:
        bucket = self._bucket
        if bucket is None:  # a fresh bucket is full, as if made when the socket opened
            settings = self.limits.settings
            bucket = self._bucket = TokenBucket(settings.rate_per_second, settings.rate_burst)
        return bucket

    @bucket.setter
    def bucket(self, bucket: TokenBucket) -> None:
        self._bucket = bucket

    def check(self) -> None:
        # Both first: a new bucket's stamp must not be after `now`.
        user, bucket = self.limits.user_bucket(self.user_id), self.bucket
        now = time.monotonic()
        # Both buckets or neither: a frame one bucket refuses must not cost the other a token.
        wait = max(bucket.wait(now), user.wait(now))
        if wait == 0.0:
            bucket.take(now)
            user.take(now)
            self.refused_in_a_row = 0
            return
        self.refused_in_a_row += 1
        raise RateLimited(wait, flood=self.refused_in_a_row > self.limits.settings.flood_close_after)

    def charge_bytes(self, size: int) -> None:
        """Charge a frame's or reply's size to both buckets (see byte_cost)."""
        cost = byte_cost(size, self.limits.settings.rate_token_bytes)
        if cost > 0:
            bucket = self.bucket  # before `now`, as in check()
            now = time.monotonic()
            bucket.charge(now, cost)
            self.limits.user_bucket(self.user_id).charge(now, cost)


class TooManyConnections(Exception):
    pass


class ReplayBusy(Exception):
    """The user's replay slots stayed taken."""


class Limits:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connections: Counter[int] = Counter()  # open sockets per user id
        self._user_buckets: dict[int, TokenBucket] = {}
        self.addresses = Slots(settings.echo_connections_per_address)  # the chapter's echo socket
        self.searches = Slots(settings.searches_per_user)  # running searches per user id
        self._api_buckets: dict[int, TokenBucket] = {}
        self._replays: dict[int, tuple[asyncio.Semaphore, int]] = {}  # per user: slots, users of it

    def api_check(self, user_id: int, *, size: int = 0) -> float:
        """One HTTP API request of `user_id` (plus `size` bytes it answered with, charged after
        the fact): 0.0 if allowed, else the seconds to wait."""
        bucket = self._api_buckets.get(user_id)
        if bucket is None:
            bucket = self._api_buckets[user_id] = TokenBucket(
                self.settings.api_rate_per_second, self.settings.api_rate_burst
            )
            if len(self._api_buckets) > 10_000:  # forget the oldest (dicts keep insertion order)
                del self._api_buckets[next(iter(self._api_buckets))]
        now = time.monotonic()
        if size:
            bucket.charge(now, byte_cost(size, self.settings.rate_token_bytes))
            return 0.0
        return bucket.take(now)

    @asynccontextmanager
    async def replay_slot(self, user_id: int, timeout: float) -> AsyncIterator[None]:
        """Hold one of the user's replay slots (waiting up to `timeout`, then ReplayBusy)."""
        slots, users = self._replays.get(user_id) or (asyncio.Semaphore(self.settings.replays_per_user), 0)
        self._replays[user_id] = (slots, users + 1)
        try:
            try:
                async with asyncio.timeout(timeout):
                    await slots.acquire()
            except TimeoutError:
                raise ReplayBusy from None
            try:
                yield
            finally:
                slots.release()
        finally:
            slots, users = self._replays[user_id]
            if users <= 1:
                del self._replays[user_id]
            else:
                self._replays[user_id] = (slots, users - 1)

    def user_bucket(self, user_id: int) -> TokenBucket:
        bucket = self._user_buckets.get(user_id)
        if bucket is None:
            bucket = TokenBucket(self.settings.user_rate_per_second, self.settings.user_rate_burst)
            self._user_buckets[user_id] = bucket
        return bucket

    def open(self, user_id: int) -> FrameGuard:
        if self.connections[user_id] >= self.settings.max_connections_per_user:
            raise TooManyConnections
        self.connections[user_id] += 1
        if len(self._user_buckets) > 4 * len(self.connections) + 1000:
            self._prune()
        return FrameGuard(self, user_id)

    def close(self, user_id: int) -> None:
        self.connections[user_id] -= 1
        if self.connections[user_id] <= 0:
            del self.connections[user_id]
        # The user's bucket stays: reconnecting must not refill it.

    def _prune(self) -> None:
        """Forget buckets of users with no socket whose bucket has refilled anyway."""
        now = time.monotonic()
        for user_id, bucket in list(self._user_buckets.items()):
            if user_id not in self.connections and now - bucket.stamp > bucket.burst / bucket.rate:
                del self._user_buckets[user_id]


class Slots:
    """A cap on open things per key (sockets per client address, searches per user)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open: Counter[object] = Counter()

    def take(self, key: object) -> bool:
        if self.open[key] >= self.cap:
            return False
        self.open[key] += 1
        return True

    def give_back(self, key: object) -> None:
        self.open[key] -= 1
        if self.open[key] <= 0:
            del self.open[key]
