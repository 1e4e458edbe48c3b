"""tether/netio/gc_tenure.py: survivors of a full collection are tenured (not
scanned again), a cycle that dies while tenured waits for the release, and
the release comes only when due and quiet. In this process's own collector,
always uninstalled afterwards."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from tether.netio.gc_tenure import LATEST, Tenure


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> tuple[Node, weakref.ref[Node]]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a, weakref.ref(b)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tenure(clock: Clock) -> Iterator[Tenure]:
    gc.collect()
    assert gc.get_freeze_count() == 0, "another test left objects frozen"
    pauses: list[tuple[int, float]] = []
    t = Tenure(full_every=60, clock=clock, on_pause=lambda g, s: pauses.append((g, s)))
    t.pauses = pauses  # type: ignore[attr-defined]
    t.install()
    try:
        yield t
    finally:
        t.uninstall()
        gc.collect()
    assert gc.get_freeze_count() == 0


def test_survivors_of_a_full_collection_are_tenured(tenure: Tenure) -> None:
    keep = [Node() for _ in range(1000)]
    gc.collect()
    assert tenure.full_collections == 1
    assert tenure.tenured >= len(keep)
    assert any(g == 2 and s >= 0 for g, s in tenure.pauses)  # type: ignore[attr-defined]
    tenure.uninstall()
    assert tenure.tenured == 0 and keep


def test_a_cycle_that_dies_tenured_waits_for_the_release(tenure: Tenure) -> None:
    head, probe = cycle()
    gc.collect()  # the cycle is live: tenured
    del head
    gc.collect()  # a full collection does not scan tenured objects
    assert probe() is not None
    assert tenure.release() >= 2  # everything handed back and collected
    assert probe() is None
    assert tenure.releases == 1


def test_without_tenure_the_same_cycle_goes_at_the_next_collection() -> None:
    # The control: CPython's own collector frees it.
    head, probe = cycle()
    gc.collect()
    del head
    gc.collect()
    assert probe() is None


def test_release_only_when_due_and_quiet(tenure: Tenure, clock: Clock) -> None:
    assert not tenure.release_due(quiet=True)
    clock.now += 59.9
    assert not tenure.release_due(quiet=True)
    clock.now += 0.1
    assert not tenure.release_due(quiet=False)  # a storm: not now
    assert tenure.release_due(quiet=True)
    tenure.release()
    assert not tenure.release_due(quiet=True)  # the interval starts again
    clock.now += 60
    assert tenure.release_due(quiet=True)


def test_a_process_never_quiet_still_releases(tenure: Tenure, clock: Clock) -> None:
    # A peer that keeps a handshake in progress cannot postpone it for ever.
    clock.now += 60 * LATEST - 0.1
    assert not tenure.release_due(quiet=False)
    clock.now += 0.1
    assert tenure.release_due(quiet=False)


def test_install_is_idempotent_and_uninstall_gives_everything_back(tenure: Tenure) -> None:
    tenure.install()
    assert gc.callbacks.count(tenure._callback) == 1
    gc.collect()
    assert tenure.tenured > 0
    tenure.uninstall()
    tenure.uninstall()
    assert tenure._callback not in gc.callbacks
    assert gc.get_freeze_count() == 0
