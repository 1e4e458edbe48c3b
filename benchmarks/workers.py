"""Issue 14 item 5: dials/s and agent handshakes/s with ``--workers 1`` vs 2.

    python -m benchmarks.workers [--agents 200] [--rounds 3] [--seconds 5] [--json OUT]

One real broker per run (supervisor and workers, or a single process),
loaded by the simulator of :mod:`benchmarks.many_agents` (the project's
own TLS + tunnel stack per simulated agent, one process):

- handshakes/s: 32 concurrent loops, each a full agent login (TCP, TLS 1.3,
  control stream with a bearer token, accepted) then a close, for
  ``--seconds``;
- dials/s: with ``--agents`` agents connected, 64 concurrent CONNECT
  clients on the frontend Unix socket, each dial echoing one byte
  (``many_agents._dial_load``), for ``--seconds``.

Runs of 1 and 2 workers are interleaved (1, 2, 1, 2, ...) and the report
gives medians and the spread, the broker's CPU (its whole process tree)
and the simulator's CPU: on a 2-core machine the simulator competes with
the workers for the same cores, so the ratio is bounded by what is left.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from benchmarks import measure
from benchmarks.many_agents import CLUSTER, Fleet, SimAgent, _dial_load, raise_fd_limit
from protocol.session import Role, SessionConfig, TunnelSession
from tether.netio.tls_stream import TLSStream
from tether.netio.tunnel import Keepalive, TunnelConnection
from tether.tools.certs import init_pki
from tether.tools.launch import start_broker


async def _login_once(fleet: Fleet, i: int, ctx: Any) -> bool:
    """One full agent login; True once the broker accepted it."""
    tcp = await trio.open_tcp_stream("127.0.0.1", fleet.port)
    stream = TLSStream(tcp, ctx, server_side=False, server_hostname="127.0.0.1")
    try:
        await stream.do_handshake()
        sess = TunnelSession(Role.AGENT, SessionConfig(), clock=trio.current_time)
        sess.initiate()
        sess.open_control(
            {
                "tether-agent-id": f"hs-{i}",
                "tether-cluster": CLUSTER,
                "authorization": f"Bearer {fleet.token}",
            },
            f"127.0.0.1:{fleet.port}",
        )
        agent = SimAgent(fleet, i)
        conn = TunnelConnection(stream, sess, agent, keepalive=Keepalive(15, 15), name="hs")
        agent.conn = conn
        async with trio.open_nursery() as nursery:
            agent.nursery = nursery
            nursery.start_soon(conn.run)
            while not agent.accepted:
                await fleet.changed.wait()
            nursery.cancel_scope.cancel()
        fleet.connected.discard(i)
        return True
    finally:
        await trio.aclose_forcefully(stream)


async def _handshake_load(fleet: Fleet, seconds: float, concurrency: int = 32) -> dict[str, Any]:
    ctx = fleet.ctx
    ok = failed = 0
    deadline = trio.current_time() + seconds

    async def loop(k: int) -> None:
        nonlocal ok, failed
        n = 0
        while trio.current_time() < deadline:
            n += 1
            try:
                with trio.fail_after(10):
                    if await _login_once(fleet, 1_000_000 + k * 100_000 + n, ctx):
                        ok += 1
            except (OSError, trio.TooSlowError, trio.BrokenResourceError):
                failed += 1

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for k in range(concurrency):
            nursery.start_soon(loop, k)
    elapsed = trio.current_time() - start
    return {"handshakes_ok": ok, "failed": failed, "per_s": ok / elapsed}


async def one_run(
    workers: int, n: int, seconds: float, workdir: Path, count_syscalls: bool = False
) -> dict[str, Any]:
    pki = init_pki(workdir / "pki")
    token = secrets.token_urlsafe(32)
    token_file = workdir / f"tokens-{workers}"
    digest = hashlib.sha256(token.encode()).hexdigest()
    token_file.write_text(f"sha256:{digest} {CLUSTER} * max={10 * n + 10_000_000}\n")
    broker = start_broker(
        workdir,
        pki,
        f"--workers={workers}",
        f"--agent-token-file={token_file}",
        f"--cluster-name={CLUSTER}",
        "--log-level=warning",
        tcp=False,
    )
    fleet = Fleet(n, broker.agent_port, token, pki.ca_cert)
    out: dict[str, Any] = {"workers": workers, "agents": n}

    def cpu() -> tuple[float, float, float]:
        # The supervisor and every worker (descendants of the broker's pid).
        return (
            measure.tree_cpu([broker.proc.pid]),
            measure.cpu_seconds(os.getpid()),
            time.monotonic(),
        )

    async def measured(
        load: Callable[[], Awaitable[dict[str, Any]]], ok_key: str
    ) -> dict[str, Any]:
        """One phase: its result, the broker's and the simulator's CPU, and
        (``count_syscalls``) the broker's syscalls per operation."""
        pids = measure.descendants(broker.proc.pid) if count_syscalls else []
        b0, s0, w0 = cpu()
        with measure.counting_syscalls(pids) as totals:
            result = await load()
        b1, s1, w1 = cpu()
        result["broker_cpu_pct"] = (b1 - b0) / (w1 - w0) * 100
        result["simulator_cpu_pct"] = (s1 - s0) / (w1 - w0) * 100
        if count_syscalls:
            result["syscalls_per_op"] = sum(totals) / max(1, result[ok_key])
        return result

    try:
        await broker.up()
        async with trio.open_nursery() as nursery:
            out["handshakes"] = await measured(
                functools.partial(_handshake_load, fleet, seconds), "handshakes_ok"
            )
            for i in range(n):
                nursery.start_soon(fleet.run_agent, i)
            with trio.move_on_after(120):
                await fleet.wait_connected(n)
            out["connected"] = len(fleet.connected)
            await trio.sleep(1.0)
            out["dial"] = await measured(
                functools.partial(_dial_load, broker.uds, seconds), "dials_ok"
            )
            nursery.cancel_scope.cancel()
    finally:
        out["exit_code"] = broker.proc.stop(timeout=30)
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    out: dict[str, Any] = {}
    for w in sorted({r["workers"] for r in runs}):
        mine = [r for r in runs if r["workers"] == w]
        out[str(w)] = {
            "dials_per_s": med([r["dial"]["dials_per_s"] for r in mine]),
            "handshakes_per_s": med([r["handshakes"]["per_s"] for r in mine]),
            "dial_broker_cpu_pct": med([r["dial"]["broker_cpu_pct"] for r in mine]),
            "dial_simulator_cpu_pct": med([r["dial"]["simulator_cpu_pct"] for r in mine]),
            "hs_broker_cpu_pct": med([r["handshakes"]["broker_cpu_pct"] for r in mine]),
            "hs_simulator_cpu_pct": med([r["handshakes"]["simulator_cpu_pct"] for r in mine]),
        }
    if "1" in out and "2" in out:
        for key in ("dials_per_s", "handshakes_per_s"):
            out[f"ratio_{key}"] = out["2"][key]["median"] / out["1"][key]["median"]
    return out


async def run(
    n: int, rounds: int, seconds: float, workdir: Path, count_syscalls: bool = False
) -> dict[str, Any]:
    raise_fd_limit(65536)
    runs = []
    for r in range(rounds):
        for workers in (1, 2):
            sub = workdir / f"r{r}-w{workers}"
            sub.mkdir(parents=True)
            result = await one_run(workers, n, seconds, sub, count_syscalls)
            if count_syscalls:
                print(
                    f"  round {r} workers={workers}: syscalls per dial "
                    f"{result['dial']['syscalls_per_op']:.1f}, per handshake "
                    f"{result['handshakes']['syscalls_per_op']:.1f}",
                    flush=True,
                )
            print(
                f"  round {r} workers={workers}: {result['dial']['dials_per_s']:.0f} dials/s "
                f"(broker {result['dial']['broker_cpu_pct']:.0f}% CPU, simulator "
                f"{result['dial']['simulator_cpu_pct']:.0f}%), "
                f"{result['handshakes']['per_s']:.0f} handshakes/s "
                f"(broker {result['handshakes']['broker_cpu_pct']:.0f}%, simulator "
                f"{result['handshakes']['simulator_cpu_pct']:.0f}%)",
                flush=True,
            )
            runs.append(result)
    return {"runs": runs, "summary": summarize(runs), "cpus": os.cpu_count()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--json", default="")
    p.add_argument(
        "--count-syscalls",
        action="store_true",
        help="count the broker's syscalls per dial and per handshake with strace -c -f "
        "(rates are then meaningless)",
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tether-bench-workers-") as tmp:
        result = trio.run(
            run, args.agents, args.rounds, args.seconds, Path(tmp), args.count_syscalls
        )
    print(json.dumps(result["summary"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
