"""The registry in process: routing by host, address, CIDR and default
route, the most specific match winning, least-loaded choice among usable
agents, replacement, ``dial()``'s outcomes, and the agent server's side of
membership (joining, refusals, closing the connection a newcomer replaces).

The registry sees agents only through :class:`broker.registry.RoutableAgent`;
:class:`StubAgent` is such an agent with no connection behind it."""

from __future__ import annotations

import random
import ssl
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from broker.agent_conn import AgentConnection, ServerInfo
from broker.agent_server import AgentServer
from broker.auth import Authenticator, Identity
from broker.dialing import DialError, DialOutcome
from broker.metrics import BrokerMetrics
from broker.registry import Membership, Registry, RegistryRefused, RoutableAgent, parse_strategies
from protocol.codes import DialFailCode
from protocol.identifiers import AgentIdentifiers
from protocol.session import SessionConfig
from tether.netio import sockopts
from tether.netio.tunnel import Keepalive, TunnelStream

pytestmark = pytest.mark.timeout(30)


@attrs.define(eq=False)
class StubAgent:
    """A routable agent: what it declared, whether it takes dials, its load;
    ``dial`` answers with ``answer`` (a stream stand-in) or raises ``error``."""

    agent_id: str
    identifiers: AgentIdentifiers = attrs.Factory(AgentIdentifiers)
    cluster: str = "c"
    usable: bool = True
    load: int = 0
    answer: Any = None
    error: DialError | None = None
    dials: list[tuple[int, str, float, bytes | None]] = attrs.Factory(list)
    aborted: list[str] = attrs.Factory(list)

    async def dial(
        self, dial_id: int, addr: str, timeout: float, early: bytes | None = None
    ) -> TunnelStream:
        self.dials.append((dial_id, addr, timeout, early))
        await trio.lowlevel.checkpoint()
        if self.error is not None:
            raise self.error
        return self.answer  # type: ignore[no-any-return]

    def abort(self, reason: str) -> None:
        self.aborted.append(reason)


def _agent(agent_id: str, identifiers: str = "", **kw: Any) -> StubAgent:
    return StubAgent(agent_id, AgentIdentifiers.parse(identifiers), **kw)


def _registry(*strategies: str, seed: int = 0) -> Registry:
    return Registry(BrokerMetrics(), strategies or ("default",), rng=random.Random(seed))


def _add(registry: Registry, *agents: StubAgent) -> None:
    for agent in agents:
        registry.add(agent, Membership(f"cred-{agent.agent_id}"))


def test_a_stub_is_a_routable_agent() -> None:
    agent: RoutableAgent = _agent("a")  # mypy checks the protocol here
    assert agent.agent_id == "a"


def test_strategies_parse_and_refuse_unknown_names() -> None:
    assert parse_strategies("destHost, defaultRoute,default") == (
        "destHost",
        "defaultRoute",
        "default",
    )
    with pytest.raises(ValueError, match="unknown proxy strategy 'nearest'"):
        parse_strategies("destHost,nearest")
    with pytest.raises(ValueError, match="at least one"):
        parse_strategies(" , ")


@pytest.mark.parametrize(
    ("host", "want"),
    [
        ("node-1", "by-host"),
        ("NODE-1", "by-host"),  # host names compare case-insensitively
        ("10.0.0.5", "by-ipv4"),
        ("fd00::5", "by-ipv6"),
        ("[fd00::5]", "by-ipv6"),
        ("10.1.2.3", "by-cidr"),
        ("192.168.9.9", None),
    ],
)
def test_dest_host_routes_by_host_address_and_cidr(host: str, want: str | None) -> None:
    registry = _registry("destHost")
    _add(
        registry,
        _agent("by-host", "host=node-1"),
        _agent("by-ipv4", "ipv4=10.0.0.5"),
        _agent("by-ipv6", "ipv6=fd00::5"),
        _agent("by-cidr", "cidr=10.1.0.0/16"),
    )
    chosen = registry.choose("c", host)
    assert (chosen.agent_id if chosen is not None else None) == want


def test_most_specific_wins_over_load() -> None:
    registry = _registry("destHost", "default")
    exact = _agent("exact", "ipv4=10.1.2.3", load=100)
    narrow = _agent("narrow", "cidr=10.1.2.0/24", load=50)
    wide = _agent("wide", "cidr=10.0.0.0/8")
    _add(registry, wide, narrow, exact)
    for _ in range(20):
        assert registry.choose("c", "10.1.2.3") is exact
        assert registry.choose("c", "10.1.2.4") is narrow
        assert registry.choose("c", "10.9.9.9") is wide
    exact.usable = False  # a draining agent falls back to the next tier
    assert registry.choose("c", "10.1.2.3") is narrow


def test_strategies_in_order_default_route_then_any() -> None:
    registry = _registry("destHost", "defaultRoute", "default")
    plain = _agent("plain")
    gateway = _agent("gateway", "default-route=true", load=7)
    _add(registry, plain, gateway)
    assert registry.choose("c", "10.0.0.1") is gateway  # before any agent, despite its load
    gateway.usable = False
    assert registry.choose("c", "10.0.0.1") is plain
    only_dest = _registry("destHost")
    _add(only_dest, _agent("p"))
    assert only_dest.choose("c", "10.0.0.1") is None  # no fallback unless configured


def test_least_loaded_wins_and_ties_break_at_random() -> None:
    registry = _registry("default", seed=3)
    busy, idle_a, idle_b = _agent("busy", load=3), _agent("a", load=1), _agent("b", load=1)
    _add(registry, busy, idle_a, idle_b)
    seen = {registry.choose("c", "x").agent_id for _ in range(200)}  # type: ignore[union-attr]
    assert seen == {"a", "b"}
    idle_a.load = idle_b.load = 9
    assert registry.choose("c", "x") is busy
    for agent in (busy, idle_a, idle_b):
        agent.usable = False
    assert registry.choose("c", "x") is None


def test_clusters_are_isolated() -> None:
    registry = _registry("default")
    mine, theirs = _agent("a", cluster="mine"), _agent("a", cluster="theirs")
    _add(registry, mine, theirs)
    assert registry.choose("mine", "x") is mine
    assert registry.choose("theirs", "x") is theirs
    assert registry.choose("nobody", "x") is None
    assert registry.count() == 2 and registry.count("mine") == 1
    assert registry.agents("theirs") == [theirs]


def _ready(registry: Registry) -> float | None:
    return registry.metrics.registry.get_sample_value(
        "konnectivity_network_proxy_server_ready_backend_connections"
    )


def test_replacement_and_stale_removal() -> None:
    registry = _registry()
    old, new = _agent("n1"), _agent("n1")
    assert registry.add(old, Membership("cert:aa")) is None
    assert _ready(registry) == 1
    assert registry.add(new, Membership("cert:aa")) is old
    assert registry.agents() == [new] and _ready(registry) == 1
    registry.remove(old)  # the replaced connection ending later changes nothing
    assert registry.agents() == [new]
    registry.remove(new)
    assert registry.count() == 0 and _ready(registry) == 0
    live = _agent("n2")
    registry.add(live, Membership("cert:aa"))
    with pytest.raises(RegistryRefused):  # a live id of another credential stays
        registry.add(_agent("n2"), Membership("cert:bb"))
    assert registry.agents() == [live]


async def test_dial_routes_and_counts() -> None:
    registry = _registry("destHost", "default")
    target = _agent("t", "cidr=10.0.0.0/8", answer="stream")
    _add(registry, _agent("other", load=0), target)
    stream, agent = await registry.dial("c", "10.2.3.4:443", 5.0, b"hello")
    assert stream == "stream" and agent is target
    assert target.dials == [(1, "10.2.3.4:443", 5.0, b"hello")]
    await registry.dial("c", "10.2.3.4:443", 5.0)
    assert [d[0] for d in target.dials] == [1, 2]  # dial ids are never reused
    count = registry.metrics.registry.get_sample_value(
        "konnectivity_network_proxy_server_dial_duration_seconds_count"
    )
    assert count == 2


async def test_dial_failures_carry_their_outcome() -> None:
    registry = _registry("destHost")
    with pytest.raises(DialError) as no_agent:
        await registry.dial("c", "10.2.3.4:443", 5.0)
    assert no_agent.value.outcome is DialOutcome.NO_AGENT
    refused = DialError.from_agent(DialFailCode.REFUSED, "connection refused")
    _add(registry, _agent("t", "cidr=10.0.0.0/8", error=refused))
    with pytest.raises(DialError) as agent_said:
        await registry.dial("c", "10.2.3.4:443", 5.0)
    assert agent_said.value is refused
    for code in (no_agent.value.code, refused.code):
        assert (
            registry.metrics.registry.get_sample_value(
                "konnectivity_network_proxy_server_dial_failure_count_total", {"reason": code}
            )
            == 1
        )


# ------------------------------------------ membership, owned by the server


@attrs.define(eq=False)
class JoiningAgent(StubAgent):
    """What :meth:`AgentServer.join` reads of a connection: its identity."""

    identity: Identity | None = None
    remote: str = "10.0.0.1:1"
    instance: str = ""


def _server(registry: Registry) -> AgentServer:
    return AgentServer(
        registry,
        ServerInfo("s1", 1),
        Authenticator([], None),
        ssl.create_default_context(),
        SessionConfig(),
        Keepalive(15, 15),
        5.0,
        sockopts.TunnelSocketOptions(),
    )


def _joining(agent_id: str, credential: str | None, **kw: Any) -> JoiningAgent:
    return JoiningAgent(agent_id, identity=Identity("c", agent_id, "mtls", credential, **kw))


async def test_the_agent_server_joins_replaces_and_refuses() -> None:
    registry = _registry()
    server = _server(registry)
    first = _joining("n1", "cert:aa")
    assert await server.join(first) is None  # type: ignore[arg-type]
    server.joined(first)  # type: ignore[arg-type]
    assert registry.agents() == [first] and first.aborted == []
    # The same credential again: it replaces, and the old one is closed only
    # once the newcomer has been told it is accepted.
    second = _joining("n1", "cert:aa")
    assert await server.join(second) is None  # type: ignore[arg-type]
    assert registry.agents() == [second] and first.aborted == []
    server.joined(second)  # type: ignore[arg-type]
    assert first.aborted == ["replaced by a new connection from the same agent"]
    # Another credential: refused with the registry's status and reason.
    intruder = _joining("n1", "cert:bb")
    refused = await server.join(intruder)  # type: ignore[arg-type]
    assert refused is not None and (refused.status, refused.token) == (409, "identity_in_use")
    assert refused.text.startswith("identity_in_use: ")
    assert registry.agents() == [second] and second.aborted == []
    # A capped credential holds at most its cap.
    capped = [_joining(f"e{i}", None, cap_key="token:x", cap=1) for i in range(2)]
    assert await server.join(capped[0]) is None  # type: ignore[arg-type]
    refusal = await server.join(capped[1])  # type: ignore[arg-type]
    assert refusal is not None and (refusal.status, refusal.token) == (403, "token_cap")


def test_agent_connections_reach_the_registry_only_through_the_server() -> None:
    """An AgentConnection neither holds nor imports the registry."""
    import broker.agent_conn

    assert "registry" not in vars(broker.agent_conn)
    registry = _registry()
    server = _server(registry)
    agent = AgentConnection(
        registry.metrics, server, server.server, server.authenticator, None, "127.0.0.1:1"
    )
    assert not hasattr(agent, "registry") and agent.roster is server
    agent.fail_all("gone")  # leaves the registry alone: the server removes
    assert agent.closed and not agent.usable


@attrs.define
class _Tunnel:
    """What an AgentConnection's load and usable read of its tunnel."""

    streams: dict[int, object] = attrs.Factory(dict)


async def test_an_identifiers_update_reroutes_at_once() -> None:
    """A connection's new identifiers reach the registry's indexes through
    the agent server (``Roster.refresh``), before the next dial."""
    from protocol import messages

    registry = _registry("destHost")
    server = _server(registry)
    agent = AgentConnection(
        registry.metrics, server, server.server, server.authenticator, None, "127.0.0.1:1"
    )
    agent.conn = _Tunnel()  # type: ignore[assignment]
    agent.identity = Identity("c", "n1", "mtls", "cert:aa")
    agent.cluster, agent.agent_id = "c", "n1"
    agent.identifiers = AgentIdentifiers.parse("ipv4=10.0.0.5")
    assert await server.join(agent) is None
    assert registry.choose("c", "10.0.0.5") is agent
    agent.on_message(messages.Identifiers(value="ipv4=10.0.0.7&cidr=10.9.0.0/16"))
    assert registry.choose("c", "10.0.0.5") is None
    assert registry.choose("c", "10.0.0.7") is agent
    assert registry.choose("c", "10.9.1.1") is agent
    agent.draining = True  # usability is read when drawn: no notice needed
    assert registry.choose("c", "10.0.0.7") is None


@attrs.define
class _Probed:
    """A registered connection's tunnel as the liveness probe sees it."""

    live: bool
    calls: int = 0
    streams: dict[int, object] = attrs.Factory(dict)
    closed_reason: str | None = None

    async def probe(self, timeout: float) -> bool:
        self.calls += 1
        await trio.sleep(timeout)
        return self.live


def _connection(server: AgentServer, instance: str, live: bool | None = None) -> AgentConnection:
    agent = AgentConnection(
        server.metrics, server, server.server, server.authenticator, None, f"10.0.0.{instance}:1"
    )
    agent.identity = Identity("c", "n1", "mtls", "cert:aa")
    agent.cluster, agent.agent_id, agent.instance = "c", "n1", instance
    if live is not None:
        agent.conn = _Probed(live)  # type: ignore[assignment]
    return agent


@pytest.mark.timeout(10)
async def test_a_live_connection_is_probed_once_and_stays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Newcomers with the id and credential of a live connection but another
    instance id are refused (agent_id_live) after one bounded probe, however
    many arrive at once; the same instance replaces at once, unprobed."""
    registry = _registry()
    server = _server(registry)
    old = _connection(server, "1", live=True)
    assert await server.join(old) is None
    refusals: list[str] = []

    async def newcomer(i: int) -> None:
        refusal = await server.join(_connection(server, f"9{i}"))
        refusals.append(refusal.token if refusal else "admitted")

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(newcomer, i)
    assert refusals == ["agent_id_live"] * 50
    assert old.conn.calls == 1  # type: ignore[union-attr]
    assert trio.current_time() - started == pytest.approx(server.probe_timeout(old))
    assert registry.agents() == [old]
    same = _connection(server, "1")
    assert await server.join(same) is None
    assert registry.agents() == [same] and old.conn.calls == 1  # type: ignore[union-attr]


@pytest.mark.timeout(10)
async def test_a_dead_connection_is_replaced_after_the_probe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = _registry()
    server = _server(registry)
    old = _connection(server, "1", live=False)
    assert await server.join(old) is None
    new = _connection(server, "2", live=True)
    assert await server.join(new) is None
    assert registry.agents() == [new] and old.conn.calls == 1  # type: ignore[union-attr]
    # An older agent (no instance id) is probed like another process.
    older = _connection(server, "")
    refusal = await server.join(older)
    assert refusal is not None and refusal.token == "agent_id_live"


async def test_a_rerouted_dial_goes_to_the_connection_that_took_the_place() -> None:
    """A hedge superseded the connection a dial went out on before the agent
    answered: the dial is sent again, on the registered (newest) one, with
    what is left of its timeout; a place that keeps changing gives up."""
    from broker.dialing import Rerouted

    registry = _registry()
    new = _agent("a", answer="stream")

    @attrs.define(eq=False)
    class Superseded(StubAgent):
        async def dial(
            self, dial_id: int, addr: str, timeout: float, early: bytes | None = None
        ) -> TunnelStream:
            self.dials.append((dial_id, addr, timeout, early))
            registry.add(new, Membership("cred"))  # the hedge takes the place meanwhile
            raise Rerouted()

    old = Superseded("a")
    registry.add(old, Membership("cred"))
    stream, agent = await registry.dial("c", "10.2.3.4:443", 5.0)
    assert stream == "stream" and agent is new
    assert [d[0] for d in old.dials] == [1] and [d[0] for d in new.dials] == [2]
    assert new.dials[0][2] <= 5.0
    assert registry.metrics.registry.get_sample_value("tether_dials_rerouted_total") == 1
    registry.add(_agent("a", error=Rerouted()), Membership("cred"))
    with pytest.raises(DialError) as churn:
        await registry.dial("c", "10.2.3.4:443", 5.0)
    assert churn.value.outcome is DialOutcome.AGENT_LOST


@pytest.mark.timeout(10)
async def test_only_a_reconnect_of_the_same_process_takes_the_unanswered_dials(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The same instance and credential reconnected: dials its old connection
    had not answered (without early bytes) are rerouted to the new one. A
    dead connection replaced by another process (another instance id, after
    the probe) fails them, as does one that carried early bytes."""
    from broker.agent_conn import PendingDial

    registry = _registry()
    server = _server(registry)
    old = _connection(server, "1")
    assert await server.join(old) is None
    plain, early = PendingDial(1, "10.0.0.9:1"), PendingDial(2, "10.0.0.9:1", reroutable=False)
    old.pending.update({1: plain, 2: early})
    same = _connection(server, "1")
    assert await server.join(same) is None
    server.joined(same)
    assert plain.rerouted and plain.error is None and plain.done.is_set()
    assert early.error is not None and early.error.outcome is DialOutcome.AGENT_LOST
    # Another process took the place of a dead connection: nothing moves.
    same.conn = _Probed(False)  # type: ignore[assignment]
    waiting = PendingDial(3, "10.0.0.9:1")
    same.pending[3] = waiting
    other = _connection(server, "2")
    assert await server.join(other) is None
    server.joined(other)
    assert not waiting.rerouted and waiting.error is not None
