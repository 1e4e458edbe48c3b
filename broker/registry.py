"""Connected agents by cluster, and the choice of agent for each dial.

Strategies are konnectivity's names, tried in order:
``destHost`` (identifiers name the host, or a ``cidr`` contains it),
``defaultRoute`` (agents that declared ``default-route=true``) and
``default`` (any agent of the cluster). Within ``destHost`` the most
specific match wins: an exact ``host=``/``ipv4=``/``ipv6=`` over the longest
containing ``cidr=`` over shorter ones. Among the usable candidates of the
winning tier the less loaded of two drawn at random wins (a tier of a few
agents is compared in full: the least loaded, ties at random). The lookup
reads per-cluster indexes (:mod:`broker.routing_index`), so a dial costs
the same with ten agents or ten thousand.

Membership: one live connection per (cluster, agent id), kept by the agent
server (:mod:`broker.agent_server`), which adds, removes and closes the
connection a newcomer replaces, and tells the registry when an agent's
identifiers change (:meth:`Registry.refresh`); the registry only sees the
:class:`RoutableAgent` side of a connection. A newcomer replaces
it only when both were authenticated by the same credential (a reconnect
after a stale link); otherwise the live one wins and the newcomer is refused
(``identity_in_use``). Token entries with an id glob cap how many ids they
hold at once (``token_cap``).

Departures: with ``--agent-return-wait`` a dial that finds no agent but
matches one that left within ``--agent-return-window``
(:mod:`broker.departures`) waits for an agent to register, at most that
long, before it fails (:meth:`Registry.await_return`).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Sequence
from typing import Protocol

import attrs
import trio

from broker.departures import Departures
from broker.dialing import DialError, DialOutcome, Rerouted
from broker.metrics import BrokerMetrics
from broker.routing_index import ClusterIndex
from protocol.identifiers import AgentIdentifiers
from protocol.messages import split_host_port
from tether.netio.logs import event
from tether.netio.tunnel import Tunnel

log = logging.getLogger("tether.broker")

STRATEGIES = ("destHost", "defaultRoute", "default")
#: How often one dial may be sent again after hedges superseded its connection.
MAX_REROUTES = 2


def parse_strategies(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    for name in names:
        if name not in STRATEGIES:
            raise ValueError(f"unknown proxy strategy {name!r} (known: {', '.join(STRATEGIES)})")
    if not names:
        raise ValueError("at least one proxy strategy is required")
    return names


class RoutableAgent(Protocol):
    """What the registry needs of an agent connection: who it is, what it
    declared, whether it takes dials and how loaded it is, and the dial."""

    @property
    def cluster(self) -> str: ...

    @property
    def agent_id(self) -> str: ...

    @property
    def identifiers(self) -> AgentIdentifiers: ...

    @property
    def usable(self) -> bool:
        """Whether it takes dials. Once False it may stay False for good: an
        agent that becomes usable again must be :meth:`Registry.refresh`-ed."""

    @property
    def load(self) -> int: ...

    async def dial(
        self, dial_id: int, addr: str, timeout: float, early: bytes | None = None
    ) -> Tunnel: ...

    def abort(self, reason: str) -> None:
        """Close the connection at once (a newcomer replaced it)."""


@attrs.frozen
class Membership:
    """What the registry needs to know about an agent's credential.

    ``credential`` names the credential that authenticated the connection
    (certificate fingerprint, token entry, reviewed ServiceAccount and node);
    a connection may replace a live one of the same id only when both name
    the same, non-None credential. ``cap_key``/``cap``: connections sharing
    one capped credential (a token entry with an id glob) are counted.
    """

    credential: str | None
    cap_key: str | None = None
    cap: int = 0


class RegistryRefused(Exception):
    """The registry refused a connection; ``reason`` is a stable token."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.status = status
        self.reason = reason


class Registry:
    def __init__(
        self,
        metrics: BrokerMetrics,
        strategies: Sequence[str] = ("default",),
        rng: random.Random | None = None,
    ) -> None:
        self.metrics = metrics
        self.strategies = tuple(strategies)
        self._clusters: dict[str, dict[str, RoutableAgent]] = {}
        self._indexes: dict[str, ClusterIndex[RoutableAgent]] = {}
        self._members: dict[RoutableAgent, Membership] = {}
        self._capped: dict[str, int] = {}  # live connections per capped credential
        self._dial_ids = itertools.count(1)
        self._rng = rng or random.Random()
        self._randbelow = self._rng.randrange
        #: ``--agent-return-wait`` (0: off) and the departed agents it waits for.
        self.return_wait = 0.0
        self.departures: Departures | None = None
        #: Per cluster, set (and dropped) when an agent registers or is refreshed.
        self._arrivals: dict[str, trio.Event] = {}

    def hold_for_return(self, wait: float, window: float) -> None:
        """Dials for an agent that left within ``window`` s wait up to ``wait`` s."""
        self.return_wait = wait
        self.departures = Departures(window, trio.current_time) if wait > 0 else None

    # -------------------------------------------------------- membership

    def add(
        self, agent: RoutableAgent, membership: Membership | None = None
    ) -> RoutableAgent | None:
        """Register ``agent``; return the connection it replaces, if any.

        A reconnecting agent replaces its stale connection at once rather than
        waiting for keepalive to notice that the old one is dead, but only
        when the same credential authenticated both. Raise
        :class:`RegistryRefused` when the live connection was authenticated
        by another credential, or a capped credential holds its cap.
        """
        if membership is None:
            membership = Membership(None)
        agents = self._clusters.setdefault(agent.cluster, {})
        old = agents.get(agent.agent_id)
        old_member = self._members.get(old) if old is not None else None
        if old is not None and (
            membership.credential is None
            or old_member is None
            or old_member.credential != membership.credential
        ):
            if not agents:
                del self._clusters[agent.cluster]
            raise RegistryRefused(
                409,
                "identity_in_use",
                f"agent {agent.cluster}/{agent.agent_id} is connected with another credential; "
                "the live connection stays",
            )
        if membership.cap_key is not None:
            held = self._capped.get(membership.cap_key, 0)
            if old_member is not None and old_member.cap_key == membership.cap_key:
                held -= 1
            if held >= membership.cap:
                if not agents:
                    del self._clusters[agent.cluster]
                raise RegistryRefused(
                    403,
                    "token_cap",
                    f"this credential already holds {held} agent id(s), its cap is "
                    f"{membership.cap}",
                )
        index = self._indexes.setdefault(agent.cluster, ClusterIndex())
        if old is not None:
            self._forget(old)
            index.remove(old)
        agents[agent.agent_id] = agent
        index.add(agent)
        self._members[agent] = membership
        if membership.cap_key is not None:
            self._capped[membership.cap_key] = self._capped.get(membership.cap_key, 0) + 1
        self._update()
        self.note_arrival(agent.cluster, agent.agent_id)
        return old

    def _forget(self, agent: RoutableAgent) -> None:
        member = self._members.pop(agent, None)
        if member is not None and member.cap_key is not None:
            left = self._capped.get(member.cap_key, 0) - 1
            if left > 0:
                self._capped[member.cap_key] = left
            else:
                self._capped.pop(member.cap_key, None)

    def remove(self, agent: RoutableAgent) -> None:
        agents = self._clusters.get(agent.cluster, {})
        if agents.get(agent.agent_id) is agent:
            del agents[agent.agent_id]
            self._forget(agent)
            self._indexes[agent.cluster].remove(agent)
            if not agents:
                del self._clusters[agent.cluster]
                del self._indexes[agent.cluster]
            self._update()
            self._departed(agent)

    def _departed(self, agent: RoutableAgent) -> None:
        """The registered ``agent`` left (a worker's registry hears it from
        the host's view instead, :mod:`broker.workers`)."""
        self.note_departure(agent.cluster, agent.agent_id, agent.identifiers)

    def note_departure(self, cluster: str, agent_id: str, identifiers: AgentIdentifiers) -> None:
        if self.departures is not None:
            self.departures.left(cluster, agent_id, identifiers)

    def note_arrival(self, cluster: str, agent_id: str | None = None) -> None:
        """An agent of ``cluster`` registered (or became routable again):
        dials waiting for one look again."""
        if self.departures is not None and agent_id is not None:
            self.departures.returned(cluster, agent_id)
        waiting = self._arrivals.pop(cluster, None)
        if waiting is not None:
            waiting.set()

    def refresh(self, agent: RoutableAgent) -> None:
        """``agent``'s identifiers changed, or it became usable again: route
        by what it declares now. A no-op unless it is the registered one."""
        if self._clusters.get(agent.cluster, {}).get(agent.agent_id) is agent:
            self._indexes[agent.cluster].refresh(agent)
            self.note_arrival(agent.cluster)

    def _update(self) -> None:
        self.metrics.ready_backends.set(self.count())

    def get(self, cluster: str, agent_id: str) -> RoutableAgent | None:
        """The connection registered for ``cluster``/``agent_id``, if any."""
        return self._clusters.get(cluster, {}).get(agent_id)

    def count(self, cluster: str | None = None) -> int:
        if cluster is not None:
            return len(self._clusters.get(cluster, {}))
        return sum(len(a) for a in self._clusters.values())

    def agents(self, cluster: str | None = None) -> list[RoutableAgent]:
        if cluster is not None:
            return list(self._clusters.get(cluster, {}).values())
        return [a for agents in self._clusters.values() for a in agents.values()]

    # ----------------------------------------------------------- routing

    def choose(self, cluster: str, host: str) -> RoutableAgent | None:
        index = self._indexes.get(cluster)
        if index is None:
            return None
        return index.choose(self.strategies, host, self._randbelow)

    def eligible(self, cluster: str, host: str) -> list[RoutableAgent]:
        """Every usable agent :meth:`choose` may pick for ``host`` in
        ``cluster`` (the winning tier in full): for tests and diagnostics."""
        index = self._indexes.get(cluster)
        return index.eligible(self.strategies, host) if index is not None else []

    def next_dial_id(self) -> int:
        return next(self._dial_ids)

    def routable(self, cluster: str, host: str) -> bool:
        """Some agent would take a dial to ``host`` now."""
        return self.choose(cluster, host) is not None

    async def await_return(self, cluster: str, addr: str, timeout: float) -> float:
        """No agent for ``addr``'s host but one that would have taken it left
        within the window: wait until one registers, at most
        ``--agent-return-wait`` (and ``timeout``). Returns at once otherwise
        (a malformed ``addr`` too: the dial reports it); the dial then routes
        (or fails) as usual. Returns the seconds held."""
        departures = self.departures
        if departures is None:
            return 0.0
        try:
            host, _port = split_host_port(addr)
        except DialError:
            return 0.0
        if self.routable(cluster, host):
            return 0.0
        gone = departures.expected(cluster, host, self.strategies)
        if gone is None:
            return 0.0
        started = trio.current_time()
        with trio.move_on_after(min(self.return_wait, timeout)):
            while not self.routable(cluster, host):
                waiting = self._arrivals.get(cluster)
                if waiting is None:
                    waiting = self._arrivals[cluster] = trio.Event()
                await waiting.wait()
        back = self.routable(cluster, host)
        held = trio.current_time() - started
        self.metrics.dials_held.labels("returned" if back else "not_back").inc()
        log.info(
            "dial to %s in cluster %s held %.2fs for agent %s (left %.1fs before): %s",
            host,
            cluster,
            held,
            gone.agent_id,
            started - gone.left_at,
            "an agent is back" if back else "not back",
            extra=event(
                "dial_held",
                cluster=cluster,
                addr=host,
                agent_id=gone.agent_id,
                held_s=round(held, 3),
                back=back,
            ),
        )
        return held

    async def dial(
        self,
        cluster: str,
        addr: str,
        timeout: float,
        early: bytes | None = None,
        *,
        local_only: bool = False,
    ) -> tuple[Tunnel, RoutableAgent]:
        """Route and perform one dial; raise DialError with the outcome.

        ``local_only``: a worker's registry (:mod:`broker.workers`) routes
        across the host's workers unless told to use only its own agents;
        this one has only its own. Such a dial was routed (and held for a
        returning agent) where it came in: it is not held again."""
        started = trio.current_time()
        try:
            host, _port = split_host_port(addr)
            held = 0.0 if local_only else await self.await_return(cluster, addr, timeout)
            for attempt in range(MAX_REROUTES + 1):
                agent = self.choose(cluster, host)
                if agent is None:
                    raise DialError(DialOutcome.NO_AGENT, "no agent available")
                left = timeout - (trio.current_time() - started) if attempt else timeout - held
                if left <= 0:
                    raise DialError(DialOutcome.TIMEOUT, f"dial to {addr} timed out")
                try:
                    stream = await agent.dial(self.next_dial_id(), addr, left, early)
                    break
                except Rerouted:
                    # A hedge of this agent took its place before it answered:
                    # again, on the newest connection.
                    self.metrics.dials_rerouted.inc()
                    continue
            else:
                raise DialError(DialOutcome.AGENT_LOST, "the agent's connections kept changing")
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
