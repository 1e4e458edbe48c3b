"""Connected agents by cluster, and the choice of agent for each dial.

Strategies are konnectivity's names, tried in order (design section 4):
``destHost`` (identifiers name the host, or a ``cidr`` contains it),
``defaultRoute`` (agents that declared ``default-route=true``) and
``default`` (any agent of the cluster). Among candidates the least-loaded
agent wins and ties break at random.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Sequence

import trio

from broker.agent_conn import AgentConnection
from broker.dialing import DialError, DialOutcome
from broker.metrics import BrokerMetrics
from protocol.messages import split_host_port
from tether.netio.logs import event
from tether.netio.tunnel import TunnelStream

log = logging.getLogger("tether.broker")

STRATEGIES = ("destHost", "defaultRoute", "default")


def parse_strategies(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    for name in names:
        if name not in STRATEGIES:
            raise ValueError(f"unknown proxy strategy {name!r} (known: {', '.join(STRATEGIES)})")
    if not names:
        raise ValueError("at least one proxy strategy is required")
    return names


class Registry:
    def __init__(
        self,
        metrics: BrokerMetrics,
        strategies: Sequence[str] = ("default",),
        rng: random.Random | None = None,
    ) -> None:
        self.metrics = metrics
        self.strategies = tuple(strategies)
        self._clusters: dict[str, dict[str, AgentConnection]] = {}
        self._dial_ids = itertools.count(1)
        self._rng = rng or random.Random()
        self.changed = trio.Event()  # set on every add/remove (tests, HA)

    # -------------------------------------------------------- membership

    def add(self, agent: AgentConnection) -> AgentConnection | None:
        """Register ``agent``; return the connection it replaces, if any.

        A reconnecting agent replaces its stale connection at once rather than
        waiting for keepalive to notice that the old one is dead.
        """
        agents = self._clusters.setdefault(agent.cluster, {})
        old = agents.get(agent.agent_id)
        agents[agent.agent_id] = agent
        self._update()
        return old

    def remove(self, agent: AgentConnection) -> None:
        agents = self._clusters.get(agent.cluster, {})
        if agents.get(agent.agent_id) is agent:
            del agents[agent.agent_id]
            if not agents:
                del self._clusters[agent.cluster]
        self._update()

    def _update(self) -> None:
        self.metrics.ready_backends.set(self.count())
        self.changed.set()
        self.changed = trio.Event()

    def count(self, cluster: str | None = None) -> int:
        if cluster is not None:
            return len(self._clusters.get(cluster, {}))
        return sum(len(a) for a in self._clusters.values())

    def agents(self, cluster: str | None = None) -> list[AgentConnection]:
        if cluster is not None:
            return list(self._clusters.get(cluster, {}).values())
        return [a for agents in self._clusters.values() for a in agents.values()]

    # ----------------------------------------------------------- routing

    def choose(self, cluster: str, host: str) -> AgentConnection | None:
        usable = [a for a in self._clusters.get(cluster, {}).values() if a.usable]
        for strategy in self.strategies:
            if strategy == "destHost":
                candidates = [a for a in usable if a.identifiers.matches_host(host)]
            elif strategy == "defaultRoute":
                candidates = [a for a in usable if a.identifiers.default_route]
            else:
                candidates = usable
            if candidates:
                least = min(a.load for a in candidates)
                return self._rng.choice([a for a in candidates if a.load == least])
        return None

    def next_dial_id(self) -> int:
        return next(self._dial_ids)

    async def dial(
        self, cluster: str, addr: str, timeout: float, early: bytes | None = None
    ) -> tuple[TunnelStream, AgentConnection]:
        """Route and perform one dial; raise DialError with the outcome."""
        started = trio.current_time()
        try:
            host, _port = split_host_port(addr)
            agent = self.choose(cluster, host)
            if agent is None:
                raise DialError(DialOutcome.NO_AGENT, "no agent available")
            stream = await agent.dial(self.next_dial_id(), addr, timeout, early)
        except DialError as exc:
            self.metrics.dial_failures.labels(exc.code).inc()
            log.info(
                "dial %s in cluster %s failed: %s",
                addr,
                cluster,
                exc.message,
                extra=event("dial_failed", addr=addr, cluster=cluster, code=exc.code),
            )
            raise
        elapsed = trio.current_time() - started
        self.metrics.dial_duration.observe(elapsed)
        log.debug(
            "dial %s in cluster %s ok via agent %s (%.1f ms)",
            addr,
            cluster,
            agent.agent_id,
            elapsed * 1000,
            extra=event(
                "dial_ok",
                addr=addr,
                cluster=cluster,
                agent_id=agent.agent_id,
                duration_s=round(elapsed, 6),
            ),
        )
        return stream, agent
