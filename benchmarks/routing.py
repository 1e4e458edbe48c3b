"""``Registry.choose`` alone, in process: what routing one dial costs as the
fleet grows.

    python -m benchmarks.routing [--agents 100,1000,10000] [--seconds 1] [--json OUT]

One cluster of N agents, each an object with the same ``load`` and
``usable`` properties as :class:`broker.agent_conn.AgentConnection` (so the
cost of reading them is the real one) but no connection behind it. Every
agent declares ``host=node-<i>``, its own ``ipv4=`` in 10/8 and the
``cidr=`` /28 in 172.16/12 it shares with its group of 16; one in 64 is usable for ``default-route``; one in 50 is
draining. Loads are random (0..3). Cases, each with the strategies
``destHost,defaultRoute,default`` unless named otherwise:

- ``any``: strategy ``default`` only, the dial may go to any agent;
- ``host``: a dial to an agent's ``host=`` name;
- ``ipv4``: a dial to an agent's exact address;
- ``cidr``: a dial to an address only a /28 (16 agents) contains;
- ``miss``: a dial to an address nobody names (falls to ``defaultRoute``).

Reported: choices per second per case (one core, nothing else running in
this process). The same script runs against an older tree
(``PYTHONPATH=<old tree> python <this file>``): it uses only ``Registry.add``
and ``Registry.choose``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import broker.registry as registry_module
from broker.metrics import BrokerMetrics
from broker.registry import Membership, Registry
from protocol.identifiers import AgentIdentifiers

DEST = ("destHost", "defaultRoute", "default")
CASES: dict[str, tuple[str, ...]] = {
    "any": ("default",),
    "host": DEST,
    "ipv4": DEST,
    "cidr": DEST,
    "miss": DEST,
}


class SimAgent:
    """An agent as the registry reads it: ``load`` and ``usable`` computed
    as ``AgentConnection`` computes them."""

    def __init__(self, i: int, rng: random.Random) -> None:
        self.cluster = "default"
        self.agent_id = f"node-{i}"
        a, b, c = (i >> 16) & 255, (i >> 8) & 255, i & 255
        text = f"host=node-{i}&ipv4=10.{a}.{b}.{c}&cidr=172.{16 + a}.{b}.{c & ~15}/28"
        if i % 64 == 0:
            text += "&default-route=true"
        self.identifiers = AgentIdentifiers.parse(text)
        self.pending: dict[int, object] = {i: None for i in range(rng.randrange(2))}
        self.streams: dict[int, object] = {i: None for i in range(rng.randrange(3))}
        self.conn: object | None = self
        self.draining = i % 50 == 49
        self.closed = False

    @property
    def load(self) -> int:
        return len(self.pending) + (len(self.streams) if self.conn else 0)

    @property
    def usable(self) -> bool:
        return not (self.draining or self.closed) and self.conn is not None

    async def dial(self, *args: Any) -> Any:
        raise AssertionError("not dialed here")

    def abort(self, reason: str) -> None:
        raise AssertionError("not replaced here")


def hosts_for(case: str, n: int, rng: random.Random) -> list[str]:
    out = []
    for _ in range(1024):
        i = rng.randrange(n)
        a, b, c = (i >> 16) & 255, (i >> 8) & 255, i & 255
        if case == "host":
            out.append(f"node-{i}")
        elif case == "ipv4":
            out.append(f"10.{a}.{b}.{c}")
        elif case == "cidr":
            out.append(f"172.{16 + a}.{b}.{c}")
        elif case == "miss":
            out.append(f"192.168.{b}.{c}")
        else:
            out.append("kubelet.example")
    return out


def measure(n: int, seconds: float, seed: int = 1) -> dict[str, float]:
    rng = random.Random(seed)
    agents = [SimAgent(i, rng) for i in range(n)]
    results: dict[str, float] = {}
    for case, strategies in CASES.items():
        registry = Registry(BrokerMetrics(), strategies, rng=random.Random(seed))
        for agent in agents:
            registry.add(agent, Membership(f"cred-{agent.agent_id}"))
        hosts = hosts_for(case, n, rng)
        choose = registry.choose
        done, started = 0, time.perf_counter()
        deadline = started + seconds
        while True:
            for host in hosts[done % 1024 : done % 1024 + 16]:
                if choose("default", host) is None:
                    raise AssertionError(f"{case}: no agent for {host}")
            done += 16
            now = time.perf_counter()
            if now >= deadline:
                break
        results[case] = done / (now - started)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", default="100,1000,10000")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = [int(n) for n in args.agents.split(",")]
    table: dict[int, dict[str, float]] = {}
    print(f"registry: {registry_module.__file__}")
    print(f"{'agents':>7}  " + "  ".join(f"{case + '/s':>10}" for case in CASES))
    for n in sizes:
        table[n] = measure(n, args.seconds)
        row = "  ".join(f"{table[n][case]:>10,.0f}" for case in CASES)
        print(f"{n:>7,}  {row}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({str(n): r for n, r in table.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
