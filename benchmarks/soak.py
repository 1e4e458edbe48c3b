"""Soak: mixed tunneled traffic with faults for a fixed time, then a report.

    python -m benchmarks.soak --duration 600 [--profile lte] [--fault-gap 20]
    make soak DURATION=600

Transfers of random sizes run continuously over the emulated link while the
agent and the broker are killed with SIGKILL and the link drops now and then
(see ``benchmarks/chaos.py``). The exit status is 0 when no byte came back
corrupted, every transfer ended within its deadline, and the system came
back to ready on its own after the faults.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import trio

from benchmarks.chaos import run_chaos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of traffic")
    parser.add_argument("--profile", default="lte", help="link profile (benchmarks/profiles.toml)")
    parser.add_argument("--fault-gap", type=float, default=15.0, help="mean seconds between faults")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--deadline", type=float, default=30.0, help="per-transfer deadline")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    print(
        f"soak: {args.duration:g} s on {args.profile}, a fault every ~{args.fault_gap:g} s",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="tether-soak-") as tmp:
        report = trio.run(
            lambda: run_chaos(
                Path(tmp),
                args.profile,
                duration=args.duration,
                concurrency=args.concurrency,
                deadline=args.deadline,
                fault_gap=args.fault_gap,
                seed=args.seed,
                progress=True,
            )
        )
    print(report.summary())
    print("faults: " + ", ".join(f"{t:g}s {kind}" for t, kind in report.faults))
    healthy = (
        report.corrupted_bytes == 0
        and report.recovered_s is not None
        and report.slowest_s <= args.deadline + 1
        and report.ok > 0
    )
    print("soak: PASS" if healthy else "soak: FAIL")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
