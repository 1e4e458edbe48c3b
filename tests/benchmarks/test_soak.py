"""A 30-second soak with a fault every ~8 s. The 2-minute soak is its own step of
``.ci/run`` (``make soak DURATION=120``), outside the suite's time budget;
``make soak`` runs it for as long as asked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.linksim import check_available

pytestmark = [pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(150)
def test_thirty_second_soak_passes() -> None:
    check_available()
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--duration", "30", "--fault-gap", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=130,
        check=False,
    )
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "soak: PASS" in result.stdout
    assert " 0 corrupted" in result.stdout
