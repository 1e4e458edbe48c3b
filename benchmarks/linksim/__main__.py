"""Command line: ``python -m benchmarks.linksim {check,cleanup,profiles}``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from .netns import DEFAULT_PREFIX, LinkSimUnavailable, cleanup_stale
from .profiles import load_profiles
from .selfcheck import ALL_CHECKS, CheckSettings, run_self_check

QUICK = CheckSettings(
    rtt_probes=20, throughput_s=2.0, loss_probes=600, outage_observe_s=1.5, down_s=0.5
)


def _cmd_check(args: argparse.Namespace) -> int:
    profiles = load_profiles(args.profiles_file)
    names = args.profile or [n for n, p in profiles.items() if p.emulate]
    missing = [n for n in names if n not in profiles]
    if missing:
        print(f"unknown profile(s): {', '.join(missing)}; have {', '.join(profiles)}")
        return 2
    checks = args.checks.split(",") if args.checks else list(ALL_CHECKS)
    settings = QUICK if args.quick else CheckSettings()
    if args.tcp_cc:
        settings = dataclasses.replace(settings, tcp_congestion_control=args.tcp_cc)
    failed = []
    for name in names:
        t0 = time.monotonic()
        try:
            report = run_self_check(
                profiles[name], seed=args.seed, checks=checks, settings=settings, prefix=args.prefix
            )
        except LinkSimUnavailable as e:
            print(f"link emulation unavailable: {e}")
            return 3
        print(report.table())
        print(f"  ({time.monotonic() - t0:.1f} s)\n")
        if not report.ok:
            failed.append(name)
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    print("all checks passed")
    return 0


def _cmd_cleanup(args: argparse.Namespace) -> int:
    removed = cleanup_stale(args.prefix, include_live=args.all)
    for r in removed:
        print(f"removed {r}")
    if not removed:
        print("nothing to clean up")
    return 0


def _cmd_profiles(args: argparse.Namespace) -> int:
    for p in load_profiles(args.profiles_file).values():
        print(f"{p.summary()}\n    {p.description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.linksim")
    ap.add_argument("--prefix", default=DEFAULT_PREFIX, help="namespace name prefix")
    ap.add_argument("--profiles-file", default=None, help="default: benchmarks/profiles.toml")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="measure each profile through real sockets")
    c.add_argument("--profile", action="append", help="repeatable; default: all emulated")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--checks", help=f"comma-separated subset of {','.join(ALL_CHECKS)}")
    c.add_argument("--quick", action="store_true", help="shorter measurements")
    c.add_argument("--tcp-cc", help="congestion control of the bulk TCP sender (e.g. cubic)")
    c.set_defaults(func=_cmd_check)
    k = sub.add_parser("cleanup", help="remove namespaces/forwarders of dead owners")
    k.add_argument("--all", action="store_true", help="also those of running owners")
    k.set_defaults(func=_cmd_cleanup)
    p = sub.add_parser("profiles", help="list the profiles")
    p.set_defaults(func=_cmd_profiles)
    args = ap.parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
