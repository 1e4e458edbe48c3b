"""Run the atheris fuzz targets of :mod:`fuzz_targets`.

    python fuzz/run.py all --seconds 60         # every target, one after another
    python fuzz/run.py session --seconds 300    # one target
    python fuzz/run.py session --reproduce CRASH_FILE

Each target reads its committed seeds from ``fuzz/corpus/<target>/`` and
writes what it discovers to a work corpus (default ``fuzz/.work/<target>/``,
not committed). Crashing inputs land in the artifacts directory (default
``fuzz/.work/artifacts/``) as ``crash-<sha1>``; turn each into a regression
test in ``tests/test_fuzz_regressions.py``.

``all`` runs each target in its own process (libFuzzer exits when done),
prints executions per target, and exits 1 if any target crashed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ("messages", "control", "data_stream", "grpc", "session", "h2base", "connect")
#: Largest input per target: frame-level targets get room for many frames.
MAX_LEN = {"session": 16384, "h2base": 16384, "connect": 20000}
_DONE = re.compile(rb"Done (\d+) runs in (\d+) second")
#: Packages whose code coverage guides the fuzzer.
INSTRUMENT = ["protocol", "broker", "h2", "hpack", "hyperframe", "h11", "fuzz_targets"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("target", choices=[*NAMES, "all"])
    p.add_argument("--seconds", type=int, default=60, help="fuzzing time per target")
    p.add_argument("--work", type=Path, default=HERE / ".work", help="work corpora and artifacts")
    p.add_argument("--seeds", type=Path, default=HERE / "corpus", help="committed seed corpora")
    p.add_argument("--reproduce", type=Path, nargs="+", help="run these inputs once, then exit")
    p.add_argument("libfuzzer_args", nargs="*", help="extra libFuzzer flags (after --)")
    return p


def fuzz_one(args: argparse.Namespace) -> None:
    """Run one target in this process; libFuzzer exits when it is done."""
    import atheris  # type: ignore[import-untyped]

    with atheris.instrument_imports(include=INSTRUMENT):
        import fuzz_targets

    target = fuzz_targets.TARGETS[args.target]
    artifacts = args.work / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    flags = [
        f"-artifact_prefix={artifacts}/{args.target}-",
        f"-max_len={MAX_LEN.get(args.target, 4096)}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        *args.libfuzzer_args,
    ]
    if args.reproduce:
        inputs = [str(p) for p in args.reproduce]
    else:
        work = args.work / args.target
        work.mkdir(parents=True, exist_ok=True)
        seeds = args.seeds / args.target
        inputs = [str(work), *([str(seeds)] if seeds.is_dir() else [])]
        flags.append(f"-max_total_time={args.seconds}")
    atheris.Setup([sys.argv[0], *flags, *inputs], target)
    atheris.Fuzz()


def fuzz_all(args: argparse.Namespace) -> int:
    """Each target in a subprocess, in turn; a summary at the end."""
    results: list[tuple[str, int, int, float]] = []
    failed = False
    for name in NAMES:
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            name,
            f"--seconds={args.seconds}",
            f"--work={args.work}",
            f"--seeds={args.seeds}",
            *(["--", *args.libfuzzer_args] if args.libfuzzer_args else []),
        ]
        print(f"== fuzzing {name} for {args.seconds}s", flush=True)
        started = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, check=False)
        elapsed = time.monotonic() - started
        out = proc.stdout + proc.stderr
        match = _DONE.search(out)
        runs = int(match.group(1)) if match else 0
        results.append((name, proc.returncode, runs, elapsed))
        if proc.returncode != 0:
            failed = True
            sys.stdout.write(out.decode(errors="replace")[-6000:])
    print(f"\n{'target':<12} {'result':<8} {'executions':>12} {'exec/s':>9}")
    for name, rc, runs, elapsed in results:
        verdict = "ok" if rc == 0 else f"CRASH({rc})"
        print(f"{name:<12} {verdict:<8} {runs:>12} {runs / max(elapsed, 1e-9):>9.0f}")
    print(f"total executions: {sum(r[2] for r in results)}")
    return 1 if failed else 0


def main() -> int:
    args = _parser().parse_args()
    sys.path.insert(0, str(HERE))
    if args.target == "all":
        return fuzz_all(args)
    fuzz_one(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
