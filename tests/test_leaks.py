"""Leak check: thousands of dials of every kind through both frontends, then
the broker's and the agent's tasks, file descriptors and pending-dial tables
are back at their baselines, and memory growth stays small.

Mix per frontend: success with data, refused, timeout, cancel mid-dial and
close mid-transfer. Bound stated here: RSS growth under 40 MiB per process.
"""

from __future__ import annotations

import concurrent.futures
import functools
import random
from collections.abc import Callable

import grpc
import pytest
import trio
from grpc_client import Call, close_req, data_pkt, dial_req
from procs import BrokerHandle, Proc, connect_tunnel, free_port, http_get, serve_local, wait_for
from test_e2e_connect import blackhole_listener

from protocol import konnectivity_pb2 as pb
from tether.tools.launch import frontend_ssl

pytestmark = [pytest.mark.e2e]

N_PER_FRONTEND = 5000
RSS_BOUND_MIB = 40
KINDS = ["ok"] * 60 + ["refused"] * 15 + ["timeout"] * 5 + ["cancel"] * 10 + ["midway"] * 10


async def gauges(port: int) -> dict[str, float]:
    _, body = await http_get(port, "/metrics")
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def snapshot(broker: BrokerHandle, agent_health: int) -> dict[str, float]:
    b, a = await gauges(broker.admin_port), await gauges(agent_health)
    return {
        "broker_tasks": b["tether_tasks"],
        "broker_fds": b["tether_open_fds"],
        "broker_pending": b["konnectivity_network_proxy_server_pending_backend_dials"],
        "broker_streams": b["tether_active_streams"],
        "agent_tasks": a["tether_tasks"],
        "agent_fds": a["tether_open_fds"],
        "agent_pending": a["tether_pending_dials"],
    }


@pytest.mark.timeout(300)
async def test_ten_thousand_mixed_dials_leave_nothing_behind(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    broker = broker_factory("--backend-dial-timeout=0.5", "--log-level=warning", mode="grpc")
    agent_health = free_port()
    agent = agent_factory(
        broker, "--metrics", f"--admin-server-port={agent_health}", "--log-level=warning"
    )
    await broker.ready(agents=1)

    async def echo(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def source(stream: trio.SocketStream) -> None:
        try:
            while True:
                await stream.send_all(b"s" * 65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    echo_port = await serve_local(nursery, echo)
    source_port = await serve_local(nursery, source)
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]

    with blackhole_listener() as hole_port:
        targets = {
            "ok": echo_port,
            "refused": closed_port,
            "timeout": hole_port,
            "cancel": hole_port,
            "midway": source_port,
        }

        async def connect_one(kind: str) -> str:
            tunnel = await connect_tunnel(broker, f"127.0.0.1:{targets[kind]}", via="tcp")
            try:
                if tunnel.status != 200:
                    return str(tunnel.status)
                if kind == "ok":
                    await tunnel.send_all(b"x" * 100)
                    got = 0
                    while got < 100:
                        got += len(await tunnel.receive_some())
                elif kind == "midway":
                    await tunnel.receive_some()
                return "200"
            finally:
                await tunnel.aclose()

        async def cancel_one() -> str:
            # Send the CONNECT, then leave while the dial is still pending.
            raw = await trio.open_tcp_stream("127.0.0.1", broker.server_port)
            tls = trio.SSLStream(raw, frontend_ssl(broker.pki), server_hostname="localhost")
            await tls.send_all(
                f"CONNECT 127.0.0.1:{hole_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            await trio.sleep(0.05)
            await trio.aclose_forcefully(tls)
            return "cancelled"

        def grpc_one(channel: grpc.Channel, kind: str, n: int) -> str:
            call = Call(channel)
            try:
                call.send(dial_req(f"127.0.0.1:{targets[kind]}", n))
                if kind == "cancel":
                    return "cancelled"  # finally: the call is cancelled mid-dial
                pkt = call.recv(timeout=10)
                if pkt is None or pkt.type != pb.DIAL_RSP or pkt.dialResponse.error:
                    return "error"
                cid = pkt.dialResponse.connectID
                if kind == "ok":
                    call.send(data_pkt(cid, b"y" * 100))
                    got = 0
                    while got < 100:
                        pkt = call.recv(timeout=10)
                        assert pkt is not None and pkt.type == pb.DATA
                        got += len(pkt.data.data)
                    call.send(close_req(cid))
                    pkt = call.recv(timeout=10)
                    assert pkt is not None and pkt.type == pb.CLOSE_RSP
                elif kind == "midway":
                    call.recv(timeout=10)  # some data, then the client goes away
                return "ok"
            finally:
                call.finish()

        rng = random.Random(7)

        async def run_connect(count: int) -> dict[str, int]:
            outcomes: dict[str, int] = {}
            limiter = trio.CapacityLimiter(16)

            async def one(kind: str) -> None:
                async with limiter:
                    result = await (cancel_one() if kind == "cancel" else connect_one(kind))
                    outcomes[result] = outcomes.get(result, 0) + 1

            async with trio.open_nursery() as inner:
                for _ in range(count):
                    inner.start_soon(one, rng.choice(KINDS))
            return outcomes

        def run_grpc(count: int) -> dict[str, int]:
            outcomes: dict[str, int] = {}
            with (
                grpc.insecure_channel(f"unix:{broker.uds}") as channel,
                concurrent.futures.ThreadPoolExecutor(8) as pool,
            ):
                futures = [
                    pool.submit(grpc_one, channel, rng.choice(KINDS), n + 1) for n in range(count)
                ]
                for f in futures:
                    r = f.result()
                    outcomes[r] = outcomes.get(r, 0) + 1
            return outcomes

        # Warm up every path once, then take the baseline.
        await run_connect(50)
        await trio.to_thread.run_sync(run_grpc, 50)

        async def settled() -> bool:
            snap = await snapshot(broker, agent_health)
            return (
                snap["broker_pending"] == 0
                and snap["agent_pending"] == 0
                and (snap["broker_streams"] == 0)
            )

        await wait_for(settled, 30, "the warm-up to settle")
        base = await snapshot(broker, agent_health)
        rss = (broker.proc.rss_kib(), agent.rss_kib())

        connect_outcomes = await run_connect(N_PER_FRONTEND)
        grpc_outcomes = await trio.to_thread.run_sync(functools.partial(run_grpc, N_PER_FRONTEND))

    async def back_to_baseline() -> bool:
        snap = await snapshot(broker, agent_health)
        return all(snap[k] <= base[k] for k in snap)

    await wait_for(back_to_baseline, 60, "tasks, fds and pending dials back at baseline")
    after = await snapshot(broker, agent_health)
    growth = ((broker.proc.rss_kib() - rss[0]) / 1024, (agent.rss_kib() - rss[1]) / 1024)
    print(
        f"\nCONNECT outcomes {connect_outcomes}\ngRPC outcomes {grpc_outcomes}\n"
        f"baseline {base}\nafter {after}\nRSS growth broker {growth[0]:.1f} MiB, "
        f"agent {growth[1]:.1f} MiB"
    )
    assert sum(connect_outcomes.values()) == N_PER_FRONTEND
    assert sum(grpc_outcomes.values()) == N_PER_FRONTEND
    for outcomes in (connect_outcomes, grpc_outcomes):
        assert len(outcomes) >= 3, outcomes  # the mix really happened
    assert max(growth) < RSS_BOUND_MIB
    assert broker.proc.alive() and agent.alive()
