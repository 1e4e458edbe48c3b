"""summary.md shows n and spread in every cell, and every plot names the
run and the commit (issue 15 row 18)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import report


def _res() -> dict[str, Any]:
    return {
        "meta": {
            "mode": "quick",
            "started": "2026-12-01T18:00:00+00:00",
            "run_id": "20261201-180000",
            "commit": "abc1234-dirty",
            "environment": {},
        },
        "scenarios": {
            "S1": {
                "loopback": {
                    "contenders": {
                        "direct": {"best_MBps": 3000.0, "MBps": [2800.0, 3000.0, 2900.0]},
                        "tether-connect": {"best_MBps": 250.0, "MBps": [240.0, 250.0, 200.0]},
                    }
                }
            },
            "S2": {
                "lte": {
                    "contenders": {
                        "direct": {"n": 2000, "p50_ms": 60.0, "p99_ms": 62.0},
                        "ssh": {"n": 1990, "p50_ms": 61.0, "p99_ms": 70.0},
                    }
                }
            },
            "S4": {
                "satellite": {
                    "contenders": {
                        "direct": {"mbps": 7.8, "mbps_samples": [7.1, 7.8, 8.0, 7.5, 7.9]},
                        "ssh": {"mbps": 8.2},
                    }
                }
            },
        },
    }


def test_cells_carry_n_and_spread() -> None:
    text = report.summary(_res(), [])
    assert "Run 20261201-180000, commit abc1234-dirty" in text
    assert "| S1 bulk, loopback, MB/s (best of reps) | 3,000 (n=3, 2,800-3,000) |" in text
    assert "250 (n=3, 200-250)" in text
    assert "60.0 (n=2,000)" in text  # a percentile over 2,000 rounds
    assert "7.80 (n=5, 7.10-8.00)" in text  # a median of 5 runs and their range
    assert "8.20 (n=1)" in text  # one run: said so
    assert "| 0.08 |" in text  # ratios still computed from the values


def test_plots_are_stamped_with_run_and_commit(tmp_path: Path) -> None:
    written = report.plots(_res(), tmp_path)
    assert "goodput.png" in written
    import matplotlib.pyplot as plt

    fig = plt.figure()
    report._stamp(fig, _res())
    texts = [t.get_text() for t in fig.texts]
    plt.close(fig)
    assert any("run 20261201-180000" in t and "commit abc1234-dirty" in t for t in texts)
