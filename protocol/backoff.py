"""Reconnect backoff: exponential with full jitter (docs/protocol.md section 6).

The delay before attempt n is uniform(0, min(cap, base * 2**n)). The
exponent resets once a connection has stayed healthy for ``stable_after``
seconds. An authentication rejection jumps straight to the cap, and a
broker ``drain`` hint replaces the schedule with uniform(0, retry window),
and an overloaded broker's retry hint (``503 overloaded`` with
``tether-retry-after``) with uniform(hint, 1.25 x hint), never past the cap.
Pure and clock-free: callers pass times and a random source.
"""

from __future__ import annotations

import random

import attrs

#: An overloaded broker's retry hint is waited out to between 1x and this x.
RETRY_JITTER = 1.25


@attrs.define
class Backoff:
    base: float = 1.0
    cap: float = 30.0
    stable_after: float = 30.0
    rng: random.Random = attrs.field(factory=random.Random, repr=False)
    attempt: int = 0
    _hint: float | None = None
    _retry: float | None = None
    _to_cap: bool = False

    def __attrs_post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base:
            raise ValueError("backoff needs 0 < base <= cap")

    def ceiling(self) -> float:
        """The upper bound of the next delay (what the logs show)."""
        if self._retry is not None:
            return min(self.cap, self._retry * RETRY_JITTER)
        if self._hint is not None:
            return self._hint
        if self._to_cap:
            return self.cap
        return min(self.cap, self.base * 2.0 ** min(self.attempt, 62))

    def next_delay(self) -> float:
        """Delay before the next attempt; advances the schedule."""
        if self._retry is not None:
            delay = min(self.cap, self.rng.uniform(self._retry, self._retry * RETRY_JITTER))
        else:
            delay = self.rng.uniform(0.0, self.ceiling())
        self._retry = None
        self._hint = None
        self._to_cap = False
        self.attempt += 1
        return delay

    def connected_for(self, seconds: float) -> None:
        """Report how long the last connection stayed healthy."""
        if seconds >= self.stable_after:
            self.attempt = 0

    def rejected(self) -> None:
        """Authentication or authorisation failure: do not hammer the broker."""
        self._to_cap = True

    def drain_hint(self, retry_window: float) -> None:
        """The broker asked us to reconnect within ``retry_window`` seconds."""
        self._hint = max(0.0, retry_window)

    def retry_hint(self, seconds: float) -> None:
        """An overloaded broker asked us to dial again in ``seconds``."""
        self._retry = max(0.0, seconds)
