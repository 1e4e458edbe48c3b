"""Garbage-collector pauses at fleet scale: what survives a full collection
is tenured (docs/operations.md, "Garbage collection").

CPython's full collection (generation 2) scans every object it tracks. A
broker with 10,000 agents holds about 3 million, and one full collection
took 0.5-1.6 s there. While a fleet reconnects after a crash the object
count climbs from zero, and CPython runs a full collection each time the old
generation grew by a quarter: 22 of them in a 45 s storm, 9 s of CPU, each a
stall of every connection and of ``/healthz`` (p99 362-435 ms).

Tenuring: after each full collection, what survived it moves to the
permanent generation (:func:`gc.freeze`), which collections do not scan. The
next full collection scans only what is newer, so a pause follows the growth
since the last one, not the size of the process (the same storm: 41 full
collections, 1.9 s of CPU in all, ``/healthz`` p99 69 ms).

The price: a reference cycle among tenured objects that later becomes
garbage is not collected while tenured (objects freed by their reference
count, most of them, go as usual). So every ``full_every`` seconds, once
the process is quiet, :meth:`Tenure.release` hands everything back
(:func:`gc.unfreeze`) and collects it all in one pause, then tenuring goes
on; a process that is never quiet (a long storm, or a peer that keeps a
handshake in progress all the time) releases after :data:`LATEST`
intervals all the same. What tenured garbage can hold is bounded by what
becomes cyclic garbage in that time.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import trio

#: Seconds between releases: full collections of everything.
FULL_EVERY = 300.0
#: How often the release task looks whether one is due and the process quiet.
CHECK_EVERY = 5.0
#: A process never quiet (a storm, or a peer keeping a handshake open all the
#: time) still releases after this many intervals: tenured garbage stays bounded.
LATEST = 4


class Tenure:
    """Tenures the survivors of every full collection while installed.

    ``on_pause(generation, seconds)`` is called after every collection (a
    metric); ``clock`` is what :meth:`release_due` measures intervals with.
    """

    def __init__(
        self,
        *,
        full_every: float = FULL_EVERY,
        on_pause: Callable[[int, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.full_every = full_every
        self._on_pause = on_pause
        self._clock = clock
        self._started = 0.0
        self._last_release = clock()
        self.installed = False
        #: Full collections seen, and releases made, while installed.
        self.full_collections = 0
        self.releases = 0

    @property
    def tenured(self) -> int:
        """Objects in the permanent generation now."""
        return gc.get_freeze_count()

    def install(self) -> None:
        """Start tenuring (idempotent)."""
        if not self.installed:
            gc.callbacks.append(self._callback)
            self.installed = True

    def uninstall(self) -> None:
        """Stop, and hand every tenured object back to the collector."""
        if self.installed:
            gc.callbacks.remove(self._callback)
            self.installed = False
            gc.unfreeze()

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._on_pause is not None:
            self._on_pause(int(info["generation"]), time.perf_counter() - self._started)
        if info["generation"] == 2:
            # After the collection: what is left is live, and stays out of
            # the next ones' scans.
            self.full_collections += 1
            gc.freeze()

    def release_due(self, quiet: bool) -> bool:
        """Whether :meth:`release` should run now: an interval passed and
        the process is quiet, or :data:`LATEST` intervals passed."""
        elapsed = self._clock() - self._last_release
        return elapsed >= self.full_every * (1 if quiet else LATEST)

    def release(self) -> int:
        """Hand tenured objects back and collect everything (one long pause;
        the collection's survivors are tenured again). Unreachable objects
        found."""
        self._last_release = self._clock()
        self.releases += 1
        gc.unfreeze()
        return gc.collect()

    async def run(self, quiet: Callable[[], bool], check_every: float = CHECK_EVERY) -> None:
        """A task: tenure while it runs, release when due and ``quiet()``."""
        self.install()
        try:
            while True:
                await trio.sleep(check_every)
                if self.release_due(quiet()):
                    self.release()
        finally:
            self.uninstall()
