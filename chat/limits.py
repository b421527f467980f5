"""Rate and connection limits, per process.

Every frame a client sends costs one token from two buckets: its connection's and its user's
(shared by all of that user's sockets in this process). An empty bucket refuses the frame with
an error frame; a client that keeps going while refused is closed as a flood.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from chat.config import Settings


@dataclass(slots=True)
class TokenBucket:
    rate: float  # tokens per second
    burst: float  # capacity
    tokens: float = -1.0
    stamp: float = field(default_factory=time.monotonic)

    def wait(self, now: float) -> float:
        """Refill; 0.0 if a token is there, else the seconds until there will be one (takes none)."""
        if self.tokens < 0:
            self.tokens = self.burst
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def take(self, now: float) -> float:
        """Take one token; 0.0 if there was one, else the seconds until there will be."""
        wait = self.wait(now)
        if wait == 0.0:
            self.tokens -= 1.0
        return wait


class RateLimited(Exception):
    def __init__(self, retry_after: float, flood: bool) -> None:
        super().__init__(f"rate limited; retry in {retry_after:.2f}s")
        self.retry_after = retry_after
        self.flood = flood  # refused so often in a row that the socket should be closed


class FrameGuard:
    """One connection's view of the limits."""

    def __init__(self, limits: Limits, user_id: int) -> None:
        self.limits = limits
        self.user_id = user_id
        settings = limits.settings
        self.bucket = TokenBucket(settings.rate_per_second, settings.rate_burst)
        self.refused_in_a_row = 0

    def check(self) -> None:
        user = self.limits.user_bucket(self.user_id)  # first: a new bucket's stamp must not be after `now`
        now = time.monotonic()
        # Both buckets or neither: a frame one bucket refuses must not cost the other a token.
        wait = max(self.bucket.wait(now), user.wait(now))
        if wait == 0.0:
            self.bucket.take(now)
            user.take(now)
            self.refused_in_a_row = 0
            return
        self.refused_in_a_row += 1
        raise RateLimited(wait, flood=self.refused_in_a_row > self.limits.settings.flood_close_after)


class TooManyConnections(Exception):
    pass


class Limits:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connections: Counter[int] = Counter()  # open sockets per user id
        self._user_buckets: dict[int, TokenBucket] = {}
        self.addresses = Slots(settings.echo_connections_per_address)  # the chapter's echo socket
        self.searches = Slots(settings.searches_per_user)  # running searches per user id

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
