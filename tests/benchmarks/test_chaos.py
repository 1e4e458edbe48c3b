"""Chaos with data integrity (issue 8): 1,000 tunneled transfers over the
emulated ``flaky`` and ``lossy-iot`` links while the agent and the broker are
killed with SIGKILL and the link goes down at random moments."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from benchmarks.chaos import run_chaos
from benchmarks.linksim import check_available, list_namespaces

pytestmark = [pytest.mark.e2e]

DEADLINE = 30.0


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("profile", "fault_gap"),
    # Faults a few seconds apart; the 2 Mbit/s, 200 ms link needs longer to
    # recover between them for the run to show working tunnels at all.
    [("flaky", 3.0), ("lossy-iot", 8.0)],
)
def test_chaos_transfers_complete_or_fail_cleanly_never_corrupt(
    tmp_path: Path, profile: str, fault_gap: float
) -> None:
    check_available()  # root and /dev/net/tun: present in CI; a clear error otherwise
    report = trio.run(
        lambda: run_chaos(
            tmp_path, profile, transfers=500, deadline=DEADLINE, fault_gap=fault_gap, seed=11
        )
    )
    print("\n" + report.summary())
    assert report.transfers == 500
    assert report.corrupted_bytes == 0  # with hedged reconnects on (--hedge-after=1)
    assert report.ok + sum(report.failed.values()) == 500
    assert report.slowest_s <= DEADLINE + 1  # no client hangs past its deadline
    # The tunnel really worked through the chaos (a fault every few seconds on
    # a 2 Mbit/s, 200 ms link leaves long stretches of reconnecting).
    assert report.ok >= 125, report.failed
    assert len(report.faults) >= 3, report.faults
    assert report.recovered_s is not None  # back to ready on its own
    assert not [ns for ns in list_namespaces() if str(tmp_path.name) in ns]
