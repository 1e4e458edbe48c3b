"""Hostile input on a parked agent connection (tether/netio/idle.py), through
a real broker process.

A connection that has sent nothing but PINGs lately is parked: one task of
the broker reads it and answers its PINGs. Everything else it sends must be
met exactly as on a connection that is not parked: a PING flood ends in
GOAWAY(ENHANCE_YOUR_CALM), a malformed frame in GOAWAY(PROTOCOL_ERROR), bytes
that are not TLS close the connection, and a peer that stops answering is
still declared dead by the keepalive deadline. The broker goes on serving
other agents, with no traceback in its log and bounded memory.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hostile import (
    DATA,
    ENHANCE_YOUR_CALM,
    PROTOCOL_ERROR,
    Frame,
    Meter,
    RawPeer,
    bad_input,
    broker_with_agent,
    flood,
    frame,
    health_ok,
    metric,
    open_peer,
    tunnel_roundtrip,
    wait_metric,
)
from procs import serve_echo

from tether.tools.certs import PkiPaths
from tether.tools.launch import BrokerHandle

pytestmark = [pytest.mark.e2e]

PING = 0x6
RSS_BOUND_MIB = 64


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pki: PkiPaths) -> Iterator[BrokerHandle]:
    tmp: Path = tmp_path_factory.mktemp("hostile-idle")
    with broker_with_agent(
        tmp,
        pki,
        "--proxy-strategies=destHost",
        "--agent-identifiers-policy=any",  # raw peers claim hosts; not what is tested here
        "--flood-penalty-after=0",  # the module's peers all come from one address
    ) as broker:
        yield broker


@pytest.fixture
async def echo(nursery: trio.Nursery) -> int:
    return await serve_echo(nursery)


def ping(n: int) -> bytes:
    return frame(PING, 0, 0, struct.pack(">Q", n))


async def answered(broker: BrokerHandle) -> float:
    return metric(await broker.metrics(), "tether_idle_pings_answered_total")


async def parked_peer(
    broker: BrokerHandle, headers: list[tuple[str, str]] | None = None
) -> RawPeer:
    """A raw agent connection the broker has parked: its PINGs, one at a
    time, answered by the idle poller (the answered counter moves)."""
    peer = await open_peer(broker, headers=headers)
    before = await answered(broker)
    for n in range(30):
        await peer.send(ping(n))
        ack = await peer.wait_for(
            lambda f, n=n: f.kind == PING and f.payload == struct.pack(">Q", n), 5
        )
        assert ack is not None and ack.flags & 1, f"PING {n} not acknowledged"
    assert await answered(broker) >= before + 25, "the connection was never parked"
    return peer


async def serving(broker: BrokerHandle, echo: int) -> None:
    await tunnel_roundtrip(broker, echo)
    await health_ok(broker)
    assert broker.proc.alive()
    assert "Traceback" not in broker.proc.log()


@pytest.mark.timeout(60)
async def test_ping_flood_on_a_parked_connection(stack: BrokerHandle, echo: int) -> None:
    """One PING per TLS record, as fast as the peer can send them, while it
    reads the ACKs (a peer that does not read is reset instead: see
    test_hostile_agent_port's floods): the poller answers until the budget
    is spent, then the reader meets the PING and the connection ends in
    GOAWAY(ENHANCE_YOUR_CALM)."""
    broker = stack
    before = await bad_input(broker, "agent", "flood_pings")
    peer = await parked_peer(broker)
    got: dict[str, Frame | None] = {}

    async def read_until_goaway() -> None:
        got["goaway"] = await peer.goaway(30)

    async with Meter(broker.proc.pid) as meter:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_until_goaway)
            await flood(peer, ping(7), 50_000, batch=1)
        await serving(broker, echo)
    goaway = got["goaway"]
    assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
    assert await peer.closed(5)
    assert meter.rss_growth_mib < RSS_BOUND_MIB, meter.report("PING flood")
    assert await wait_metric(broker, "agent", "flood_pings", before + 1) >= before + 1


@pytest.mark.timeout(60)
async def test_malformed_frame_on_a_parked_connection(stack: BrokerHandle, echo: int) -> None:
    """DATA on stream 0 is a connection error, parked or not."""
    broker = stack
    woken = metric(await broker.metrics(), "tether_idle_wakeups_total")
    before = await bad_input(broker, "agent", "h2")
    peer = await parked_peer(broker)
    await peer.send(frame(DATA, 0, 0, b"x"))
    goaway = await peer.goaway(5)
    assert goaway is not None and goaway.error_code == PROTOCOL_ERROR
    assert await peer.closed(5)
    assert await wait_metric(broker, "agent", "h2", before + 1) >= before + 1
    assert metric(await broker.metrics(), "tether_idle_wakeups_total") >= woken + 1
    await serving(broker, echo)


@pytest.mark.timeout(60)
async def test_bytes_that_are_not_tls_on_a_parked_connection(
    stack: BrokerHandle, echo: int
) -> None:
    """Garbage under the TLS layer (a forged application-data record): the
    broker drops the connection, and nothing else."""
    broker = stack
    peer = await parked_peer(broker)
    sock = peer.stream.transport_stream.socket  # type: ignore[attr-defined]
    await sock.send(b"\x17\x03\x03\x00\x20" + b"\xee" * 32)
    assert await peer.closed(5)
    await serving(broker, echo)


@pytest.mark.timeout(60)
async def test_a_parked_peer_that_goes_quiet_is_declared_dead(
    stack: BrokerHandle, echo: int
) -> None:
    """An agent that announced a 1 s keepalive: the broker's deadline is
    three intervals after the last byte heard. Parked, its PINGs keep the
    connection alive past that deadline; once they stop, it is closed."""
    broker = stack
    cause = {"cause": "keepalive_timeout"}
    timeouts = metric(await broker.metrics(), "tether_agent_disconnects_total", **cause)
    peer = await parked_peer(broker, headers=[("tether-keepalive-ms", "1000")])
    start = trio.current_time()
    n = 1000
    while trio.current_time() - start < 4.5:  # past 3 intervals, answered while parked
        n += 1
        await peer.send(ping(n))
        assert await peer.wait_for(
            lambda f, n=n: f.kind == PING and f.payload == struct.pack(">Q", n), 2
        )
        await trio.sleep(0.3)
    assert not peer.eof
    quiet = trio.current_time()
    assert await peer.closed(8), "a silent peer outlived its keepalive deadline"
    assert trio.current_time() - quiet >= 2.5
    with trio.fail_after(5):
        while (
            metric(await broker.metrics(), "tether_agent_disconnects_total", **cause) < timeouts + 1
        ):
            await trio.sleep(0.1)
    await serving(broker, echo)
