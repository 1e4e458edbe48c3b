"""Agents that left a cluster recently, so that a dial for one may wait
briefly for it to come back (``--agent-return-wait``) instead of failing at
once with "no agent available".

An agent connection that ends leaves an entry here: its id and identifiers,
for ``--agent-return-window`` seconds. Agents leave and come back all the
time: a restart or an upgrade, a link that died and is being redialled, a
connection the broker's keepalive ended during an outage the agent is
about to recover from. A dial that finds no agent for its host but matches
a departed one (by the same routing rule, :mod:`broker.routing_index`)
waits for an agent to register; one that matches none fails at once, as
before. An agent that registers again takes its entry out.

Bounded: one entry per (cluster, agent id), only for agents that
authenticated and registered, each kept at most ``window`` seconds; past
``max_per_cluster`` the oldest goes first. No I/O and no clock of its own:
the registry (:mod:`broker.registry`) owns the waiting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from broker.routing_index import ClusterIndex
from protocol.identifiers import AgentIdentifiers

#: Entries kept per cluster at most (the oldest go first past it): about
#: 1.2 KB each with their identifiers, so at most ~25 MB per cluster.
MAX_PER_CLUSTER = 20_000


@attrs.define(eq=False)
class Departed:
    """One agent that left; routable like the agent it was (never dialled)."""

    agent_id: str
    identifiers: AgentIdentifiers
    left_at: float
    usable: bool = True
    load: int = 0


class _Cluster:
    def __init__(self) -> None:
        #: By agent id, oldest departure first (dict order).
        self.left: dict[str, Departed] = {}
        self.index: ClusterIndex[Departed] = ClusterIndex()

    def drop(self, agent_id: str) -> None:
        gone = self.left.pop(agent_id, None)
        if gone is not None:
            self.index.remove(gone)

    def expire(self, before: float) -> None:
        """Drop the entries of agents that left at or before ``before``."""
        while self.left:
            oldest = next(iter(self.left.values()))
            if oldest.left_at > before:
                return
            self.drop(oldest.agent_id)


def _first(n: int) -> int:
    return 0


class Departures:
    """The recently departed agents of every cluster."""

    def __init__(
        self,
        window: float,
        clock: Callable[[], float],
        max_per_cluster: int = MAX_PER_CLUSTER,
    ) -> None:
        if window <= 0 or max_per_cluster < 1:
            raise ValueError("departures need a window > 0 and room for one entry")
        self.window = window
        self.clock = clock
        self.max_per_cluster = max_per_cluster
        self._clusters: dict[str, _Cluster] = {}

    def __len__(self) -> int:
        return sum(len(c.left) for c in self._clusters.values())

    def left(self, cluster: str, agent_id: str, identifiers: AgentIdentifiers) -> None:
        """``cluster``/``agent_id`` has no connection any more."""
        now = self.clock()
        entries = self._clusters.setdefault(cluster, _Cluster())
        entries.drop(agent_id)
        entries.expire(now - self.window)
        while len(entries.left) >= self.max_per_cluster:
            entries.drop(next(iter(entries.left)))
        gone = entries.left[agent_id] = Departed(agent_id, identifiers, now)
        entries.index.add(gone)

    def returned(self, cluster: str, agent_id: str) -> None:
        """``cluster``/``agent_id`` registered again."""
        entries = self._clusters.get(cluster)
        if entries is not None:
            entries.drop(agent_id)
            self._forget_if_empty(cluster, entries)

    def expected(self, cluster: str, host: str, strategies: Sequence[str]) -> Departed | None:
        """A departed agent of ``cluster`` that a dial to ``host`` would have
        gone to (within the window), or None."""
        entries = self._clusters.get(cluster)
        if entries is None:
            return None
        entries.expire(self.clock() - self.window)
        if self._forget_if_empty(cluster, entries):
            return None
        return entries.index.choose(strategies, host, _first)

    def _forget_if_empty(self, cluster: str, entries: _Cluster) -> bool:
        if entries.left:
            return False
        del self._clusters[cluster]
        return True
