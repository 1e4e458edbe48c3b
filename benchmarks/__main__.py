"""``python -m benchmarks run [--quick] [--scenario S1,S4] [--profile lte] [--out DIR]``

Runs the contenders (direct TCP, an ssh reverse tunnel, Tether's CONNECT and
gRPC frontends) side by side over the emulated links and writes
``results.json``, ``summary.md`` and plots to ``benchmarks/results/<time>/``.
``python -m benchmarks report DIR`` redraws summary and plots from a
``results.json``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import harness, report
from benchmarks.linksim import load_profiles


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the benchmarks")
    speed = run.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="shorter runs, loopback + lte")
    speed.add_argument(
        "--smoke", action="store_true", help="seconds-long runs that only prove the harness works"
    )
    run.add_argument(
        "--scenario",
        type=_csv,
        default=list(harness.ALL_SCENARIOS),
        help="e.g. S1,S4 (default all)",
    )
    run.add_argument(
        "--profile", type=_csv, default=None, help="e.g. loopback,lte (default: by mode)"
    )
    run.add_argument("--out", type=Path, default=None, help="output directory")
    run.add_argument(
        "--agents", type=int, default=None, help="S9 agents (default 1000; 10000 on request)"
    )
    run.add_argument("--seed", type=int, default=1, help="link emulator seed")
    run.add_argument("--no-selfcheck", action="store_true", help="skip the emulator self-check")
    rep = sub.add_parser("report", help="rewrite summary.md and plots from results.json")
    rep.add_argument("dir", type=Path)
    args = parser.parse_args(argv)

    if args.cmd == "report":
        res = json.loads((args.dir / "results.json").read_text())
        report.write(res, args.dir)
        print(args.dir / "summary.md")
        return 0
    bad = [s for s in args.scenario if s not in harness.ALL_SCENARIOS]
    if bad:
        parser.error(f"unknown scenario(s) {bad}; have {', '.join(harness.ALL_SCENARIOS)}")
    if args.profile:
        known = load_profiles()
        unknown = [p for p in args.profile if p not in known]
        if unknown:
            parser.error(f"unknown profile(s) {unknown}; have {', '.join(known)}")
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    return harness.run(
        mode=mode,
        scenarios_=args.scenario,
        profiles=args.profile,
        out=args.out,
        agents=args.agents,
        seed=args.seed,
        selfcheck=not args.no_selfcheck,
    )


if __name__ == "__main__":
    sys.exit(main())
