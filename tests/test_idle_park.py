"""Parked connections (tether/netio/idle.py) over real TLS on loopback TCP.

A broker-role TunnelConnection with ``park_when_idle`` and an agent-role one
that drives keepalive every 20 ms, in one process over a real TCP socket
pair with TLSStream on both ends (the idle poller needs a socket to watch).
While only PINGs arrive the broker's reader is parked and the poller answers
them; the first other read wakes it, and everything after is as without
parking: bytes intact both ways, streams opened from either side, EOF seen.
The hostile cases through the real broker are in test_hostile_idle_park.py.
"""

from __future__ import annotations

import hashlib
import random
import socket
from collections.abc import Callable

import pytest
import trio
from test_tunnel_memory import exchange, receive_stream, tunnel

from tether.netio import idle, tls
from tether.netio.tls_stream import TLSStream
from tether.netio.tunnel import Keepalive
from tether.tools.certs import PkiPaths

AGENT_PINGS = Keepalive(interval=0.02, timeout=5)


async def tls_pair(pki: PkiPaths) -> Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]:
    """(agent end, broker end): TLS over a loopback TCP connection, the
    handshake done (as the broker and the agent do before the tunnel)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    for s in (client, server):
        s.setblocking(False)
    cert, key = pki.agent("agent-1")
    agent_ctx = tls.client_context(pki.ca_cert, cert, key, alpn=["h2"])
    broker_ctx = tls.server_context(pki.broker_cert, pki.broker_key, pki.ca_cert, alpn=["h2"])
    a = TLSStream(
        trio.SocketStream(trio.socket.from_stdlib_socket(client)),
        agent_ctx,
        server_side=False,
        server_hostname="localhost",
    )
    b = TLSStream(
        trio.SocketStream(trio.socket.from_stdlib_socket(server)), broker_ctx, server_side=True
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(a.do_handshake)
            n.start_soon(b.do_handshake)
    return lambda: (a, b)


async def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.005)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.timeout(60)
async def test_idle_connection_parks_answers_pings_and_wakes_for_traffic(pki: PkiPaths) -> None:
    totals = idle.TOTALS
    parked0, answered0, woken0 = totals.parked, totals.answered, totals.woken
    rtts: list[float] = []
    async with tunnel(
        pair=await tls_pair(pki), agent_keepalive=AGENT_PINGS, park_when_idle=True
    ) as t:
        t.agent.set_rtt_observer(rtts.append)
        # Only PINGs: parked, and the poller answers them (the agent sees
        # each ACK as a round trip).
        await wait_until(lambda: totals.parked == parked0 + 1)
        await wait_until(lambda: totals.answered >= answered0 + 20 and len(rtts) >= 20)
        assert totals.woken == woken0
        last_rx = t.broker._driver.last_rx
        await wait_until(lambda: t.broker._driver.last_rx > last_rx)  # the poller keeps it

        # Traffic wakes the reader; bytes arrive intact both ways.
        up = random.Random(1).randbytes(3 * 1024 * 1024 + 17)
        down = random.Random(2).randbytes(2 * 1024 * 1024 + 5)
        a, b = await t.open_stream(7)
        assert totals.woken >= woken0 + 1
        got_up, got_down = await exchange(a, b, up, down)
        assert sha(got_up) == sha(up) and sha(got_down) == sha(down)

        # Quiet again: parked again, and a stream from the other side
        # (the broker's dial direction) still works.
        await wait_until(lambda: totals.parked == parked0 + 1)
        answered = totals.answered
        await wait_until(lambda: totals.answered >= answered + 5)
        a2, b2 = await t.open_stream(8)
        with trio.fail_after(10):
            await b2.send_all(b"late hello")
            b2.send_eof()
            assert await receive_stream(a2) == b"late hello"

        # The agent goes away while the broker is parked: EOF reaches the
        # broker's reader, which ends the connection.
        await wait_until(lambda: totals.parked == parked0 + 1)
        await t.agent_transport.aclose()
        with trio.fail_after(5):
            await t.done["broker"].wait()
        assert t.broker._driver.close_reason is not None
    assert totals.parked == parked0


@pytest.mark.timeout(30)
async def test_without_park_when_idle_nothing_parks(pki: PkiPaths) -> None:
    """The agent side (and any driver not asked to) never parks."""
    parked0, answered0 = idle.TOTALS.parked, idle.TOTALS.answered
    rtts: list[float] = []
    async with tunnel(pair=await tls_pair(pki), agent_keepalive=AGENT_PINGS) as t:
        t.agent.set_rtt_observer(rtts.append)
        await wait_until(lambda: len(rtts) >= 20)
        assert idle.TOTALS.parked == parked0
        assert idle.TOTALS.answered == answered0
