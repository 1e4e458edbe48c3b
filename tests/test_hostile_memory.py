"""Row 8 of issue 11: tunnels whose clients never read, against the real
broker and agent processes.

Every target pushes data as fast as the tunnel takes it, and the CONNECT
client (on the broker's Unix socket) never reads a byte. Without a bound per
process, each such tunnel pins a stream window in the broker and an outbox
in the agent, and a thousand of them take the agent far past the
``MemoryMax`` of its own systemd unit. With the buffer budget
(``--max-buffered-bytes``) new streams get smaller windows past the
high-water mark and dials past the budget are refused (503 "agent busy" /
"broker busy"), while tunnels that do read keep moving.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import resource
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import trio
from grpc_client import Call, dial_req
from hostile import Meter, MiB, metric, tunnel_roundtrip, wait_log
from procs import BrokerHandle, Proc, Tunnel, connect_tunnel, free_port, http_get, serve_echo

from protocol import budget
from protocol import konnectivity_pb2 as pb

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "systemd" / "tether-agent.service"
STALLED = 1000
BATCH = 50
GAUGE = "tether_buffered_bytes_reserved"
REFUSED = "tether_buffer_budget_refusals_total"
DIAL_FAILURES = "konnectivity_network_proxy_server_dial_failure_count_total"
#: What the broker may hold beyond its idle RSS and its budget, per open
#: tunnel (Python objects, h2 state, socket objects); docs/security.md.
BROKER_PER_TUNNEL_KIB = 64


def unit_memory_max() -> int:
    """``MemoryMax=`` of the agent's systemd unit, in bytes."""
    text = UNIT.read_text()
    match = re.search(r"^MemoryMax=(\d+)([KMG]?)\s*$", text, re.MULTILINE)
    assert match, "no MemoryMax= in the agent unit"
    scale = {"": 1, "K": 1024, "M": MiB, "G": 1024 * MiB}[match.group(2)]
    return int(match.group(1)) * scale


def raise_fd_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= want


async def serve_pusher(nursery: trio.Nursery) -> int:
    """A target that sends endlessly, as fast as the tunnel takes it."""
    block = os.urandom(64 * 1024)

    async def push(stream: trio.SocketStream) -> None:
        try:
            while True:
                await stream.send_all(block)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await nursery.start(functools.partial(trio.serve_tcp, push, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def serve_source(nursery: trio.Nursery) -> int:
    """``D`` + 8-byte length: that many random bytes, then their sha256 (hex)."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            header = b""
            while len(header) < 9:
                chunk = await stream.receive_some(9 - len(header))
                if not chunk:
                    return
                header += chunk
            size = int.from_bytes(header[1:], "big")
            digest = hashlib.sha256()
            block = os.urandom(1 << 20)
            sent = 0
            while sent < size:
                chunk = block[: size - sent]
                digest.update(chunk)
                await stream.send_all(chunk)
                sent += len(chunk)
            await stream.send_all(digest.hexdigest().encode())
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def download(tunnel: Tunnel, size: int) -> None:
    """A reading tunnel: ``size`` bytes whose sha256 matches the target's."""
    try:
        await tunnel.send_all(b"D" + size.to_bytes(8, "big"))
        digest = hashlib.sha256()
        got = 0
        while got < size:
            chunk = await tunnel.receive_some(min(1 << 20, size - got))
            assert chunk, f"tunnel ended after {got} of {size} bytes"
            digest.update(chunk)
            got += len(chunk)
        assert await tunnel.read_all() == digest.hexdigest().encode()
    finally:
        await tunnel.aclose()


async def agent_metrics(port: int) -> str:
    status, body = await http_get(port, "/metrics")
    assert status == 200
    return body.decode()


async def open_stalled(
    broker: BrokerHandle, port: int, count: int
) -> tuple[list[Tunnel], dict[int, int], list[bytes]]:
    """``count`` CONNECT tunnels to the pusher, in batches; none is ever read."""
    tunnels: list[Tunnel] = []
    statuses: dict[int, int] = {}
    bodies: list[bytes] = []

    async def one() -> None:
        t = await connect_tunnel(broker, f"127.0.0.1:{port}", via="uds")
        statuses[t.status] = statuses.get(t.status, 0) + 1
        if t.status == 200:
            tunnels.append(t)
        else:
            bodies.append(t.body)
            await t.aclose()

    for start in range(0, count, BATCH):
        async with trio.open_nursery() as n:
            for _ in range(min(BATCH, count - start)):
                n.start_soon(one)
    return tunnels, statuses, bodies


async def wait_value(
    read: Callable[[], object], predicate: Callable[[float], bool], timeout: float
) -> float:
    value = 0.0
    with trio.move_on_after(timeout):
        while True:
            value = await read()  # type: ignore[misc]
            if predicate(value):
                break
            await trio.sleep(0.1)
    return value


@pytest.mark.timeout(120)
async def test_a_thousand_stalled_clients_stay_within_memory_max(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    raise_fd_limit(4 * STALLED + 500)
    memory_max = unit_memory_max()
    # A generous dial timeout: the machine running the suite may be busy.
    broker = broker_factory("--log-level=info", "--backend-dial-timeout=30")
    agent_health = free_port()
    agent = agent_factory(
        broker, "--log-level=info", "--metrics", f"--admin-server-port={agent_health}"
    )
    await broker.ready(agents=1)
    pusher = await serve_pusher(nursery)
    source = await serve_source(nursery)
    echo = await serve_echo(nursery)

    async def reserved(which: str) -> float:
        text = await (broker.metrics() if which == "broker" else agent_metrics(agent_health))
        return metric(text, GAUGE)

    broker_meter, agent_meter = Meter(broker.proc.pid), Meter(agent.pid)
    async with trio.open_nursery() as meters:
        broker_meter.start_in(meters)
        agent_meter.start_in(meters)
        # A tunnel opened before the stall, used while it lasts.
        reader = await connect_tunnel(broker, f"127.0.0.1:{source}", via="uds")
        assert reader.status == 200, (reader.status, reader.body)
        with trio.fail_after(60):
            tunnels, statuses, bodies = await open_stalled(broker, pusher, STALLED)
        try:
            with trio.fail_after(30):
                await download(reader, 8 * MiB)
            await trio.sleep(2)
            during = {w: await reserved(w) for w in ("broker", "agent")}
            broker_text = await broker.metrics()
            agent_text = await agent_metrics(agent_health)
        finally:
            await broker_meter.stop()
            await agent_meter.stop()
            for t in tunnels:
                await t.aclose()

    print(
        f"{STALLED} stalled: {statuses}; agent peak {agent_meter.rss_peak / 1024:.1f} MiB "
        f"(start {agent_meter.rss_start / 1024:.1f}), broker peak "
        f"{broker_meter.rss_peak / 1024:.1f} MiB (start {broker_meter.rss_start / 1024:.1f}); "
        f"reserved {during}"
    )
    # The safe behaviour: the agent stays inside its unit's MemoryMax ...
    assert agent_meter.rss_peak * 1024 < memory_max, agent_meter.rss_peak
    # ... and the broker inside its documented bound.
    open_tunnels = statuses.get(200, 0)
    broker_bound = (
        broker_meter.rss_start * 1024
        + budget.BROKER_DEFAULT
        + open_tunnels * BROKER_PER_TUNNEL_KIB * 1024
    )
    assert broker_meter.rss_peak * 1024 < broker_bound, (broker_meter.rss_peak, broker_bound)
    # Dials past the budget were refused as busy, with a clear message.
    assert statuses.get(503, 0) > 0, statuses
    assert set(statuses) <= {200, 503}, statuses
    assert all(b"agent busy" in body or b"broker busy" in body for body in bodies), bodies[:3]
    assert 0 < during["agent"] <= budget.AGENT_DEFAULT
    assert 0 < during["broker"] <= budget.BROKER_DEFAULT
    # A log line and a metric on each side.
    assert await wait_log(broker, "agent busy")
    assert "buffer budget exhausted" in agent.log()
    assert "failed: busy:" in agent.log()
    assert metric(agent_text, REFUSED) > 0
    assert metric(broker_text, DIAL_FAILURES, reason="busy") > 0
    # Closing the stalled clients returns every reservation, and dials work.
    for which in ("broker", "agent"):
        left = await wait_value(functools.partial(reserved, which), lambda v: v == 0, 20)
        assert left == 0, (which, left)
    await tunnel_roundtrip(broker, echo)
    assert broker.proc.alive() and agent.alive()


@pytest.mark.timeout(60)
async def test_the_broker_refuses_dials_past_its_own_budget(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    """A broker whose own budget is smaller than its agents' refuses new
    dials with 503 "broker busy" before the agent hears of them."""
    limit = 4 * MiB
    broker = broker_factory("--log-level=info", f"--max-buffered-bytes={limit}")
    agent_health = free_port()
    agent = agent_factory(broker, "--metrics", f"--admin-server-port={agent_health}")
    await broker.ready(agents=1)
    pusher = await serve_pusher(nursery)
    echo = await serve_echo(nursery)
    with trio.fail_after(30):
        tunnels, statuses, bodies = await open_stalled(broker, pusher, 80)
    try:
        text = await broker.metrics()
        agent_text = await agent_metrics(agent_health)
    finally:
        for t in tunnels:
            await t.aclose()
    assert statuses.get(200, 0) >= 2 and statuses.get(503, 0) > 0, statuses
    assert all(b"broker busy" in body for body in bodies), bodies[:3]
    assert 0 < metric(text, GAUGE) <= limit
    # Past the high-water mark new tunnels got the floor window.
    assert metric(text, "tether_buffer_budget_shrunk_total") > 0
    assert metric(text, REFUSED) == statuses[503]
    # Clients that do not read never make their windows grow (the tuner
    # grows a window only for a reader that keeps up).
    assert metric(text, "tether_stream_window_changes_total", change="grown") == 0
    assert metric(text, DIAL_FAILURES, reason="broker_busy") == statuses[503]
    assert await wait_log(broker, "buffer budget exhausted")
    # The refused dials never reached the agent.
    assert metric(agent_text, REFUSED) == 0
    assert metric(agent_text, "tether_buffered_streams") <= statuses[200]

    async def reserved() -> float:
        return metric(await broker.metrics(), GAUGE)

    assert await wait_value(reserved, lambda v: v == 0, 10) == 0
    await tunnel_roundtrip(broker, echo)
    assert broker.proc.alive() and agent.alive()


@pytest.mark.timeout(60)
async def test_agent_busy_is_an_error_dial_rsp_on_grpc(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    """The agent's budget holds one tunnel: a second dial, through the gRPC
    frontend, gets an error DIAL_RSP "agent busy"; once the first tunnel
    ends the same dial succeeds."""
    broker = broker_factory("--log-level=info", mode="grpc")
    agent_health = free_port()
    one_stream = budget.stream_cost(budget.MIN_WINDOW)
    agent = agent_factory(
        broker,
        "--metrics",
        f"--admin-server-port={agent_health}",
        f"--max-buffered-bytes={one_stream}",
    )
    await broker.ready(agents=1)
    pusher = await serve_pusher(nursery)
    echo = await serve_echo(nursery)

    def grpc_dial(port: int, n: int) -> str:
        with grpc.insecure_channel(f"unix:{broker.uds}") as channel:
            call = Call(channel)
            try:
                call.send(dial_req(f"127.0.0.1:{port}", n))
                pkt = call.recv(timeout=10)
                assert pkt is not None and pkt.type == pb.DIAL_RSP
                return str(pkt.dialResponse.error)
            finally:
                call.finish()

    stalled = await connect_tunnel(broker, f"127.0.0.1:{pusher}", via="tcp")
    try:
        assert stalled.status == 200
        error = await trio.to_thread.run_sync(grpc_dial, echo, 1)
        assert error.startswith("agent busy"), error
        text = await agent_metrics(agent_health)
        assert metric(text, REFUSED) == 1
        assert metric(text, GAUGE) == one_stream
        assert "buffer budget exhausted" in agent.log()
    finally:
        await stalled.aclose()

    async def reserved() -> float:
        return metric(await agent_metrics(agent_health), GAUGE)

    assert await wait_value(reserved, lambda v: v == 0, 10) == 0
    assert await trio.to_thread.run_sync(grpc_dial, echo, 2) == ""
    assert "budget has room again" in agent.log()
