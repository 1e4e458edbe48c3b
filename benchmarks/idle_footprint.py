"""Idle memory of a real broker and agent (issue 16, item 5).

    python -m benchmarks.idle_footprint [--mode http-connect|grpc] [--rounds 3]

Each round starts a real ``tether-broker`` and one ``tether-agent`` on
loopback (tether/tools/launch.py), waits until the broker counts the agent,
lets both idle ``--settle`` seconds, and reads RSS and USS from
``/proc/PID/smaps_rollup``; then the CPU each uses over ``--idle`` seconds.
Prints every round and the medians. Whether the interpreter finds ``.pyc``
files changes the numbers by up to 1 MiB (PYTHONDONTWRITEBYTECODE=1 and no
``__pycache__`` compile every module at start): say which when quoting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import trio

from benchmarks.measure import cpu_seconds, memory_kib
from tether.tools.certs import init_pki
from tether.tools.launch import start_agent, start_broker


async def one_round(mode: str, settle: float, idle: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pki = init_pki(work / "pki", agents=("agent-1",))
        broker = start_broker(work, pki, "--log-level=info", mode=mode)
        agent = start_agent(work, broker, "--log-level=info")
        try:
            with trio.fail_after(30):
                await broker.ready(agents=1)
            await trio.sleep(settle)
            pids = {"broker": broker.proc.pid, "agent": agent.pid}
            out: dict[str, float] = {}
            for name, pid in pids.items():
                mem = memory_kib(pid)
                out[f"{name}_rss"] = mem["rss"] / 1024
                out[f"{name}_uss"] = mem["uss"] / 1024
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            await trio.sleep(idle)
            for name, pid in pids.items():
                out[f"{name}_cpu_pct"] = (cpu_seconds(pid) - before[name]) / idle * 100
            return out
        finally:
            agent.stop()
            broker.proc.stop()


def line(row: dict[str, float]) -> str:
    return (
        f"broker RSS {row['broker_rss']:.1f} MiB USS {row['broker_uss']:.1f}; "
        f"agent RSS {row['agent_rss']:.1f} USS {row['agent_uss']:.1f}; "
        f"CPU broker {row['broker_cpu_pct']:.2f}% agent {row['agent_cpu_pct']:.2f}%"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("http-connect", "grpc"), default="http-connect")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before reading")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU")
    args = parser.parse_args(argv)
    rows = []
    for i in range(args.rounds):
        row = trio.run(one_round, args.mode, args.settle, args.idle)
        print(f"round {i + 1} ({args.mode}): {line(row)}", flush=True)
        rows.append(row)
    median = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    print(f"median of {len(rows)} ({args.mode}): {line(median)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
