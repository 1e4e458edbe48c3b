"""Loopback comparison of the tunnel against direct TCP, in one run.

    python -m benchmarks.loopback [--bulk-mib 256] [--echo-rounds 2000]

Starts a broker, an agent and a target process, then measures side by side:
single-stream bulk throughput (target to client), 64-byte echo latency
(p50/p99), and the agent's idle RSS/USS. Absolute numbers depend on the
machine; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from tether.certs import init_pki
from tether.launch import BrokerHandle, Proc, connect_tunnel, start_agent, start_broker

Opener = Callable[[], Awaitable["Conn"]]


class Conn:
    """A byte stream to the target: either direct TCP or a CONNECT tunnel."""

    def __init__(
        self,
        send: Callable[[bytes], Awaitable[None]],
        recv: Callable[[int], Awaitable[bytes]],
        close: Callable[[], Awaitable[None]],
    ) -> None:
        self.send, self.recv, self.close = send, recv, close


async def direct(port: int) -> Conn:
    s = await trio.open_tcp_stream("127.0.0.1", port)

    async def recv(n: int) -> bytes:
        return bytes(await s.receive_some(n))

    return Conn(s.send_all, recv, s.aclose)


async def tunneled(broker: BrokerHandle, port: int, via: str) -> Conn:
    t = await connect_tunnel(broker, f"127.0.0.1:{port}", via=via)
    assert t.status == 200, t.body
    return Conn(t.send_all, t.receive_some, t.aclose)


async def bulk(open_conn: Opener, size: int) -> float:
    conn = await open_conn()
    await conn.send(size.to_bytes(8, "big"))
    start = time.perf_counter()
    got = 0
    while got < size:
        chunk = await conn.recv(1 << 20)
        if not chunk:
            raise RuntimeError(f"stream ended at {got} of {size}")
        got += len(chunk)
    elapsed = time.perf_counter() - start
    await conn.close()
    return size / elapsed


async def echo(open_conn: Opener, rounds: int) -> list[float]:
    conn = await open_conn()
    msg = b"e" * 64
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        await conn.send(msg)
        got = 0
        while got < len(msg):
            got += len(await conn.recv(65536))
        samples.append(time.perf_counter() - start)
    await conn.close()
    return samples


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Private_Clean", "Private_Dirty"):
            out[key] = int(rest.split()[0])
    return {"rss": out["Rss"], "uss": out["Private_Clean"] + out["Private_Dirty"]}


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    pki = init_pki(workdir / "pki")
    portfile = workdir / "ports"
    target = subprocess.Popen([sys.executable, "-m", "benchmarks.targets", str(portfile)])
    broker = start_broker(workdir, pki, "--log-level=warning")
    agent: Proc | None = None
    try:
        agent = start_agent(workdir, broker, "--log-level=warning")
        await broker.ready(agents=1)
        while not portfile.exists() or not portfile.read_text():
            await trio.sleep(0.05)
        echo_port, source_port = map(int, portfile.read_text().split())
        await trio.sleep(1.0)
        idle = memory_kib(agent.pid)
        size = args.bulk_mib << 20
        paths: dict[str, Callable[[int], Opener]] = {
            "direct": lambda p: lambda: direct(p),
            "tunnel-uds": lambda p: lambda: tunneled(broker, p, "uds"),
            "tunnel-tcp-mtls": lambda p: lambda: tunneled(broker, p, "tcp"),
        }
        results: dict[str, dict[str, float]] = {name: {} for name in paths}
        for make in paths.values():  # warm-up
            await bulk(make(source_port), 16 << 20)
        for _ in range(args.repeat):  # interleaved, so drift hits every path alike
            for name, make in paths.items():
                mbps = await bulk(make(source_port), size) / 1e6
                results[name]["bulk_MBps"] = max(results[name].get("bulk_MBps", 0), mbps)
        for name, make in paths.items():
            samples = await echo(make(echo_port), args.echo_rounds)
            results[name]["echo_p50_ms"] = statistics.median(samples) * 1000
            results[name]["echo_p99_ms"] = pct(samples, 0.99) * 1000
        return {"paths": results, "agent_idle_kib": idle, "agent_after_kib": memory_kib(agent.pid)}
    finally:
        if agent is not None:
            agent.stop()
        broker.proc.stop()
        target.terminate()
        target.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bulk-mib", type=int, default=256)
    parser.add_argument("--echo-rounds", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp:
        report = trio.run(run, args, Path(tmp))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    paths = report["paths"]
    assert isinstance(paths, dict)
    base = paths["direct"]
    print(
        f"{'path':18} {'bulk MB/s':>10} {'vs direct':>9} {'echo p50 ms':>12} "
        f"{'p99 ms':>8} {'added p50 ms':>13}"
    )
    for name, r in paths.items():
        print(
            f"{name:18} {r['bulk_MBps']:10.0f} {r['bulk_MBps'] / base['bulk_MBps']:9.2f} "
            f"{r['echo_p50_ms']:12.3f} {r['echo_p99_ms']:8.3f} "
            f"{r['echo_p50_ms'] - base['echo_p50_ms']:13.3f}"
        )
    idle = report["agent_idle_kib"]
    assert isinstance(idle, dict)
    print(f"agent idle: RSS {idle['rss'] / 1024:.1f} MiB, USS {idle['uss'] / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
