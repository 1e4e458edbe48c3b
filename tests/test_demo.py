"""``tether demo`` (what ``make demo`` runs) works end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e]


@pytest.mark.timeout(90)
def test_demo_runs_and_stops_cleanly(tmp_path: Path) -> None:
    tether = Path(sys.executable).parent / "tether"
    result = subprocess.run(
        [str(tether), "demo", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "[tcp] CONNECT" in out and "-> 200" in out
    assert "hello from the edge, through the tether" in out
    assert "bulk GET of 32 MiB -> 200" in out
    assert "-> 502" in out  # the refused dial is shown too
    assert "stopped: agent agent-1 exit 0, broker exit 0" in out
