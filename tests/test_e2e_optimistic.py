"""Optimistic CONNECT (``--optimistic-connect``): 200 at once, and the
client's first bytes ride inside the dial as ``early`` data."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import trio
from procs import BrokerHandle, Proc, connect_tunnel, serve_echo

pytestmark = [pytest.mark.e2e]


def early_counts(agent: Proc) -> list[int]:
    return [int(n) for n in re.findall(r"ok \(stream \d+, (\d+) early bytes\)", agent.log())]


async def read_exactly(tunnel: object, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = await tunnel.receive_some()  # type: ignore[attr-defined]
        assert chunk, got
        got += chunk
    return got


@pytest.mark.timeout(60)
async def test_pipelined_and_prompt_first_bytes_ride_in_the_dial(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    broker = broker_factory("--optimistic-connect")
    agent = agent_factory(broker)
    await broker.ready(agents=1)
    port = await serve_echo(nursery)
    target = f"127.0.0.1:{port}"

    # Pipelined: the first flight is in the same write as the CONNECT.
    request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + b"client-hello"
    tunnel = await connect_tunnel(broker, target, via="uds", request=request)
    assert tunnel.status == 200
    assert await read_exactly(tunnel, 12) == b"client-hello"
    await tunnel.send_all(b"more")
    assert await read_exactly(tunnel, 4) == b"more"
    await tunnel.aclose()

    # Prompt: the client waits for 200, then sends at once.
    tunnel = await connect_tunnel(broker, target, via="tcp")
    assert tunnel.status == 200
    await tunnel.send_all(b"after-200")
    assert await read_exactly(tunnel, 9) == b"after-200"
    await tunnel.aclose()

    counts = early_counts(agent)
    assert counts[0] == len(b"client-hello")
    assert len(counts) == 2


@pytest.mark.timeout(60)
async def test_failed_optimistic_dial_resets_instead_of_502(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
) -> None:
    broker = broker_factory("--optimistic-connect")
    agent_factory(broker)
    await broker.ready(agents=1)
    with trio.socket.socket() as s:  # a port nothing listens on
        await s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    tunnel = await connect_tunnel(broker, f"127.0.0.1:{closed}", via="uds")
    assert tunnel.status == 200  # answered before the dial
    await tunnel.send_all(b"x")
    with trio.fail_after(10):
        try:
            data = await tunnel.receive_some()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
    assert data == b""  # the connection ends; no 502 can follow a 200
    metrics = await broker.metrics()
    assert (
        'tether_frontend_requests_total{frontend="uds",status="aborted_after_200"} 1.0' in metrics
    )


@pytest.mark.timeout(60)
async def test_without_the_flag_pipelined_bytes_still_arrive(
    tunnel_env: tuple[BrokerHandle, Proc], nursery: trio.Nursery
) -> None:
    broker, agent = tunnel_env
    port = await serve_echo(nursery)
    target = f"127.0.0.1:{port}"
    request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + b"pipelined"
    tunnel = await connect_tunnel(broker, target, via="uds", request=request)
    assert tunnel.status == 200
    assert await read_exactly(tunnel, 9) == b"pipelined"
    await tunnel.aclose()
    assert early_counts(agent) == [9]  # known before the dial: rides in it
