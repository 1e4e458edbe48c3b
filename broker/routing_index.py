"""The routing indexes of one cluster: which agents a dial may go to,
found without looking at every agent.

Each agent is filed under the keys its identifiers name: every ``host=``
name, every exact ``ipv4=``/``ipv6=`` address, every ``cidr=`` network
(by IP version, prefix length and network number), ``default-route`` when
declared, and the cluster-wide set every agent belongs to. A key holds a
:class:`Pool`: the agents in a list with a position map, so adding,
removing (swap with the last) and drawing one at random are O(1).

A ``destHost`` lookup reads the exact tier (the ``host=`` pool of the
lower-cased name and the address pool) and then, for each prefix length
in use in the cluster, longest first, the one network of that length that
can contain the address: O(number of distinct prefix lengths), at most 33
for IPv4 and 129 for IPv6, whatever the number of agents. The first tier
with a usable agent wins, which is the most-specific-match rule of
:func:`protocol.identifiers.match_rank`.

Within the winning tier, a tier of at most :data:`SCAN_LIMIT` agents is
compared in full (least loaded, ties at random); a larger one by the power
of two choices: two distinct agents drawn at random, the less loaded wins,
a tie goes to the first drawn. An agent found unusable when drawn is
parked: taken out of every pool until :meth:`ClusterIndex.refresh` files
it again, so each unusable agent costs one extra draw, not one per dial.

No randomness of its own: the caller passes ``randbelow(n)``, a uniform
integer in ``[0, n)``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar

from protocol.identifiers import AgentIdentifiers

#: Tiers up to this size are compared in full: exactly the least-loaded rule.
SCAN_LIMIT = 8
#: Draws of the same agent twice (it sits in both exact pools) before a
#: tier is compared in full instead.
MAX_REDRAWS = 16

Key = Hashable
ANY: Key = ("any",)
DEFAULT_ROUTE: Key = ("default-route",)
_BITS = {4: 32, 6: 128}
_MASKS = {
    version: [((1 << bits) - 1) ^ ((1 << (bits - n)) - 1) for n in range(bits + 1)]
    for version, bits in _BITS.items()
}


class Routable(Protocol):
    @property
    def identifiers(self) -> AgentIdentifiers: ...

    @property
    def usable(self) -> bool: ...

    @property
    def load(self) -> int: ...


A = TypeVar("A", bound=Routable)


class Pool(Generic[A]):
    """A set of agents that can be drawn from uniformly in O(1). Small
    pools (most are: one host, one address) keep no position map and find
    an agent by a scan of at most :data:`SCAN_LIMIT` entries."""

    __slots__ = ("_pos", "items")

    def __init__(self) -> None:
        self.items: list[A] = []
        self._pos: dict[A, int] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def _find(self, agent: A) -> int | None:
        if self._pos is not None:
            return self._pos.get(agent)
        for at, member in enumerate(self.items):
            if member is agent:
                return at
        return None

    def add(self, agent: A) -> None:
        if self._find(agent) is not None:
            return
        self.items.append(agent)
        if self._pos is not None:
            self._pos[agent] = len(self.items) - 1
        elif len(self.items) > SCAN_LIMIT:
            self._pos = {member: at for at, member in enumerate(self.items)}

    def remove(self, agent: A) -> None:
        at = self._find(agent)
        if at is None:
            raise KeyError(agent)
        last = self.items.pop()
        if self._pos is not None:
            del self._pos[agent]
        if last is not agent:
            self.items[at] = last
            if self._pos is not None:
                self._pos[last] = at


def agent_keys(idents: AgentIdentifiers) -> frozenset[Key]:
    """Every key an agent with ``idents`` is filed under."""
    keys: set[Key] = {ANY}
    if idents.default_route:
        keys.add(DEFAULT_ROUTE)
    keys.update(("host", name) for name in idents.hosts)
    keys.update(("addr", addr) for addr in idents.ipv4)
    keys.update(("addr", addr) for addr in idents.ipv6)
    keys.update(
        ("net", net.version, net.prefixlen, int(net.network_address)) for net in idents.cidrs
    )
    return frozenset(keys)


class ClusterIndex(Generic[A]):
    """The routing indexes of one cluster's agents."""

    def __init__(self) -> None:
        self._pools: dict[Key, Pool[A]] = {}
        #: The identifiers each agent was filed by (they may have changed
        #: since; removal uses these).
        self._filed: dict[A, AgentIdentifiers] = {}
        #: Members found unusable, out of every pool until refreshed.
        self._parked: set[A] = set()
        #: Per IP version: prefix length -> how many network pools have it.
        self._lengths: dict[int, dict[int, int]] = {4: {}, 6: {}}
        #: Per IP version: the prefix lengths in use, longest first.
        self._order: dict[int, tuple[int, ...]] = {4: (), 6: ()}

    def __len__(self) -> int:
        return len(self._filed) + len(self._parked)

    # ------------------------------------------------------ maintenance

    def add(self, agent: A) -> None:
        """File ``agent`` under its current identifiers."""
        self.remove(agent)
        idents = self._filed[agent] = agent.identifiers
        for key in agent_keys(idents):
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = Pool()
                self._count_length(key, +1)
            pool.add(agent)

    def remove(self, agent: A) -> None:
        self._parked.discard(agent)
        self._unfile(agent)

    def refresh(self, agent: A) -> None:
        """``agent``'s identifiers or usability changed: file it again."""
        self.add(agent)

    def _unfile(self, agent: A) -> None:
        idents = self._filed.pop(agent, None)
        if idents is None:
            return
        for key in agent_keys(idents):
            pool = self._pools[key]
            pool.remove(agent)
            if not pool:
                del self._pools[key]
                self._count_length(key, -1)

    def _park(self, agent: A) -> None:
        self._unfile(agent)
        self._parked.add(agent)

    def _count_length(self, key: Key, delta: int) -> None:
        if not (isinstance(key, tuple) and key[0] == "net"):
            return
        _, version, length, _ = key
        lengths = self._lengths[version]
        held = lengths.get(length, 0) + delta
        if held:
            lengths[length] = held
        else:
            del lengths[length]
        self._order[version] = tuple(sorted(lengths, reverse=True))

    # ----------------------------------------------------------- lookup

    def choose(
        self, strategies: Sequence[str], host: str, randbelow: Callable[[int], int]
    ) -> A | None:
        """The agent for a dial to ``host`` (``destHost``, ``defaultRoute``
        and ``default`` in the order given), or None."""
        for strategy in strategies:
            if strategy == "destHost":
                for tier in self._tiers(host):
                    chosen = self._pick(tier, randbelow)
                    if chosen is not None:
                        return chosen
            else:
                pool = self._pools.get(DEFAULT_ROUTE if strategy == "defaultRoute" else ANY)
                chosen = self._pick([pool], randbelow) if pool is not None else None
                if chosen is not None:
                    return chosen
        return None

    def eligible(self, strategies: Sequence[str], host: str) -> list[A]:
        """Every usable agent :meth:`choose` may pick for ``host``: the winning
        tier in full. O(size of that tier): for tests and diagnostics."""
        for strategy in strategies:
            if strategy == "destHost":
                tiers = list(self._tiers(host))
            else:
                pool = self._pools.get(DEFAULT_ROUTE if strategy == "defaultRoute" else ANY)
                tiers = [[pool]] if pool is not None else []
            for tier in tiers:
                members = dict.fromkeys(agent for pool in tier for agent in pool.items)
                usable = [agent for agent in members if agent.usable]
                if usable:
                    return usable
        return []

    def _tiers(self, host: str) -> Iterator[list[Pool[A]]]:
        """The pools naming ``host``, one tier at a time, most specific first."""
        exact = []
        by_name = self._pools.get(("host", host.lower()))
        if by_name is not None:
            exact.append(by_name)
        addr = _address(host.strip("[]"))
        if addr is not None:
            by_addr = self._pools.get(("addr", addr))
            if by_addr is not None:
                exact.append(by_addr)
        if exact:
            yield exact
        if addr is None:
            return
        version, number, masks = addr.version, int(addr), _MASKS[addr.version]
        for length in self._order[version]:  # a snapshot: parking may replace it
            pool = self._pools.get(("net", version, length, number & masks[length]))
            if pool is not None:
                yield [pool]

    def _pick(self, pools: list[Pool[A]], randbelow: Callable[[int], int]) -> A | None:
        """A usable agent of ``pools`` (one tier), the less loaded of two
        drawn at random; None when none is usable."""
        redraws = 0
        while True:
            total = sum(len(pool) for pool in pools)
            if total == 0:
                return None
            if total <= SCAN_LIMIT or redraws >= MAX_REDRAWS:
                return self._least(pools, randbelow)
            first = randbelow(total)
            second = randbelow(total - 1)
            if second >= first:
                second += 1
            a, b = _at(pools, first), _at(pools, second)
            if not a.usable:
                self._park(a)
                continue
            if b is a:  # in both exact pools
                redraws += 1
                continue
            if not b.usable:
                self._park(b)
                continue
            return b if b.load < a.load else a

    def _least(self, pools: list[Pool[A]], randbelow: Callable[[int], int]) -> A | None:
        members = dict.fromkeys(agent for pool in pools for agent in pool.items)
        loads: list[tuple[int, A]] = []
        for agent in members:
            if agent.usable:
                loads.append((agent.load, agent))
            else:
                self._park(agent)
        if not loads:
            return None
        least = min(load for load, _ in loads)
        ties = [agent for load, agent in loads if load == least]
        return ties[randbelow(len(ties))]


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``ipaddress.ip_address(text)``, or None; a name that cannot be an
    address (neither ``:`` nor only digits and dots) is not parsed, since a
    failed parse costs more than the rest of the lookup."""
    if ":" not in text and not text.replace(".", "").isdigit():
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _at(pools: list[Pool[A]], index: int) -> A:
    for pool in pools:
        if index < len(pool):
            return pool.items[index]
        index -= len(pool)
    raise IndexError(index)
