"""Work per byte and per message through broker + agent, old code vs new.

    python -m benchmarks.workcount [--old TREE] [--mib 64] [--echoes 2000]
                                   [--rounds 2] [--callgrind] [--json FILE]

Starts the loopback Tether stacks (CONNECT and gRPC brokers, each with its
agent; see :mod:`benchmarks.contenders`), runs a bulk download and a 64-byte
echo series through each, and prints, per MB and per echo, what the agent
and the broker did:

- ``task_steps``: trio task steps (task switches), ``io_waits``: trips
  through the event loop (counted by ``benchmarks/workcount_hook``);
- ``h2_tx``/``h2_rx``: HTTP/2 frames serialized and parsed, ``data_tx``:
  DATA frames among them; ``tls_records_tx``, ``tls_writes``, ``tls_reads``;
- ``ctxsw``: kernel context switches (``/proc/PID/status``), ``cpu_ms``;
- ``syscalls``: system calls, from ``strace -c -f -p`` during a second,
  identical transfer (strace slows the process; only the count is used);
- with ``--callgrind``: the agent runs under ``valgrind --tool=callgrind``
  with instrumentation on only during one fixed CONNECT transfer, and its
  instruction count (Ir) per MB is reported.

With ``--old TREE`` (a checkout of the old code, e.g. a ``git worktree``)
every round measures the old and the new code one after the other, so both
see the same machine load. Counts, unlike seconds, barely move with the load
of a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HOOK = Path(__file__).resolve().parent / "workcount_hook"
MIB = 1 << 20
ECHO = b"x" * 64


def _read_counts(pid: int, out_dir: Path) -> dict[str, float]:
    """The hook's counters of ``pid`` plus /proc's, now."""
    path = out_dir / f"{pid}.json"
    before = path.stat().st_mtime_ns if path.exists() else 0
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_mtime_ns != before:
            break
        time.sleep(0.01)
    time.sleep(0.02)
    counts: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}
    status = Path(f"/proc/{pid}/status").read_text()
    ctx = sum(int(v) for v in re.findall(r"_ctxt_switches:\s+(\d+)", status))
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    counts["ctxsw"] = ctx
    counts["cpu_ms"] = (int(stat[11]) + int(stat[12])) * 1000 / os.sysconf("SC_CLK_TCK")
    return counts


def _summary(before: dict[str, float], after: dict[str, float], per: float) -> dict[str, float]:
    d = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    out = {
        "task_steps": d.get("task_steps", 0),
        "io_waits": d.get("io_waits", 0),
        "h2_tx": sum(v for k, v in d.items() if k.startswith("h2_tx_")),
        "h2_rx": sum(v for k, v in d.items() if k.startswith("h2_rx_")),
        "data_tx": d.get("h2_tx_DataFrame", 0),
        "tls_records_tx": d.get("tls_records_tx", 0),
        "tls_writes": d.get("tls_writes", 0),
        "tls_reads": d.get("tls_reads", 0),
        "ctxsw": d.get("ctxsw", 0),
        "cpu_ms": d.get("cpu_ms", 0),
    }
    return {k: round(v / per, 2) for k, v in out.items()}


def measure_one(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the code on PYTHONPATH (run in a child process per version)."""
    from benchmarks import contenders
    from benchmarks.linksim import LinkSim
    from benchmarks.measure import bulk_download, echo_once, syscalls_during

    out_dir = Path(os.environ["TETHER_WORKCOUNT_DIR"])
    results: dict[str, Any] = {}
    if args.callgrind:
        real_proc = contenders._proc

        def proc(link: Any, side: Any, name: str, argv: Any, log: Path, **kw: Any) -> Any:
            if name == "agent tether-connect":
                argv = [
                    "valgrind",
                    "--tool=callgrind",
                    "--instr-atstart=no",
                    f"--callgrind-out-file={out_dir}/callgrind.%p",
                    sys.executable,
                    *argv,
                ]
            return real_proc(link, side, name, argv, log, **kw)

        contenders._proc = proc  # type: ignore[assignment]
    with LinkSim("loopback") as link:
        stacks = contenders.start_stacks(link, out_dir / "stacks", ssh=False, timeout=180)
        try:
            for name in ("tether-connect", "tether-grpc"):
                if args.callgrind and name != "tether-connect":
                    continue
                b = stacks.brokers[name]
                agent = b.agent.pid
                broker = b.proc.pid
                opener = stacks.opener(name)
                size = args.mib * MIB

                def bulk(opener: Any = opener, size: int = size) -> None:
                    bulk_download(opener, stacks.source_port, size)

                def echoes(opener: Any = opener) -> None:
                    conn = opener(stacks.echo_port, 30)
                    try:
                        for _ in range(args.echoes):
                            echo_once(conn, ECHO)
                    finally:
                        conn.close()

                bulk_download(opener, stacks.source_port, 8 * MIB)  # warm up
                if args.callgrind:
                    subprocess.run(["callgrind_control", "-i", "on", str(agent)], check=True)
                    bulk()
                    subprocess.run(["callgrind_control", "-i", "off", str(agent)], check=True)
                    # Dump now: an agent under valgrind may not finish its
                    # drain before the stacks are stopped.
                    subprocess.run(["callgrind_control", "-d", str(agent)], check=True)
                    continue
                row: dict[str, Any] = {}
                for phase, work, per in (("bulk", bulk, args.mib), ("echo", echoes, args.echoes)):
                    a0, b0 = _read_counts(agent, out_dir), _read_counts(broker, out_dir)
                    start = time.perf_counter()
                    work()
                    seconds = time.perf_counter() - start
                    a1, b1 = _read_counts(agent, out_dir), _read_counts(broker, out_dir)
                    row[phase] = {
                        "agent": _summary(a0, a1, per),
                        "broker": _summary(b0, b1, per),
                        "seconds": round(seconds, 3),
                    }
                    if args.strace:
                        sa, sb = syscalls_during([agent, broker], work)
                        row[phase]["agent"]["syscalls"] = round(sa / per, 2)
                        row[phase]["broker"]["syscalls"] = round(sb / per, 2)
                results[name] = row
        finally:
            stacks.stop()
    if args.callgrind:
        total = 0
        for f in out_dir.glob("callgrind.*"):
            text = f.read_text(errors="replace")
            for value in re.findall(r"^(?:summary|totals):\s+(\d+)", text, re.MULTILINE):
                total = max(total, int(value))
        results["tether-connect"] = {"bulk": {"agent": {"Ir_per_MB": round(total / args.mib)}}}
    return results


def _child(tree: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="workcount-") as tmp:
        env = dict(os.environ, TETHER_WORKCOUNT_DIR=tmp)
        paths = [str(HOOK)] + ([str(tree)] if tree else [str(REPO)])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        argv = [sys.executable, "-m", "benchmarks.workcount", "--one", f"--mib={args.mib}"]
        argv += [f"--echoes={args.echoes}"]
        argv += ["--callgrind"] if args.callgrind else []
        argv += [] if args.strace else ["--no-strace"]
        # The benchmarks package itself always comes from this tree.
        proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"measurement failed:\n{proc.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result


def _table(runs: dict[str, list[dict[str, Any]]]) -> str:
    lines = []
    labels = list(runs)
    for name in ("tether-connect", "tether-grpc"):
        for phase, unit in (("bulk", "per MB"), ("echo", "per echo")):
            for side in ("agent", "broker"):
                keys: list[str] = []
                for label in labels:
                    for r in runs[label]:
                        keys += [
                            k for k in r.get(name, {}).get(phase, {}).get(side, {}) if k not in keys
                        ]
                if not keys:
                    continue
                lines.append(f"\n{name} {phase}, {side}, {unit} (median of rounds)")
                lines.append(f"  {'count':<16}" + "".join(f"{label:>12}" for label in labels))
                for k in keys:
                    cells = []
                    for label in labels:
                        vals = sorted(
                            r[name][phase][side][k]
                            for r in runs[label]
                            if k in r.get(name, {}).get(phase, {}).get(side, {})
                        )
                        cells.append(f"{vals[len(vals) // 2]:>12g}" if vals else f"{'-':>12}")
                    lines.append(f"  {k:<16}" + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.workcount", description=__doc__)
    p.add_argument("--old", type=Path, help="tree with the old code, measured interleaved")
    p.add_argument("--mib", type=int, default=64, help="bulk transfer size (MiB)")
    p.add_argument("--echoes", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--callgrind", action="store_true", help="agent instruction counts only")
    p.add_argument("--no-strace", dest="strace", action="store_false")
    p.add_argument("--json", type=Path, help="write every round's counts here")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args)))
        return 0
    versions: list[tuple[str, Path | None]] = [("new", None)]
    if args.old is not None:
        versions.insert(0, ("old", args.old.resolve()))
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in versions}
    for _ in range(args.rounds):
        for label, tree in versions:
            runs[label].append(_child(tree, args))
    print(_table(runs))
    if args.json is not None:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
