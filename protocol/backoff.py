"""Reconnect backoff: exponential with full jitter (docs/protocol.md section 6).

The delay before attempt n is uniform(0, min(cap, base * 2**n)). The
exponent resets once a connection has stayed healthy for ``stable_after``
seconds. An authentication rejection jumps straight to the cap, and a
broker ``drain`` hint replaces the schedule with uniform(0, retry window).
Pure and clock-free: callers pass times and a random source.
"""

from __future__ import annotations

import random

import attrs


@attrs.define
class Backoff:
    base: float = 1.0
    cap: float = 30.0
    stable_after: float = 30.0
    rng: random.Random = attrs.field(factory=random.Random, repr=False)
    attempt: int = 0
    _hint: float | None = None
    _to_cap: bool = False

    def __attrs_post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base:
            raise ValueError("backoff needs 0 < base <= cap")

    def ceiling(self) -> float:
        """The upper bound of the next delay (what the logs show)."""
        if self._hint is not None:
            return self._hint
        if self._to_cap:
            return self.cap
        return min(self.cap, self.base * 2.0 ** min(self.attempt, 62))

    def next_delay(self) -> float:
        """Delay before the next attempt; advances the schedule."""
        delay = self.rng.uniform(0.0, self.ceiling())
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
