"""Broker HA: three replicas behind HAProxy (a plain TCP load balancer), and
agents that end up connected to every replica (``docs/protocol.md`` section 6)."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from procs import BrokerHandle, Proc, connect_tunnel, free_port, http_get, wait_for

from tether.tools.certs import PkiPaths
from tether.tools.launch import start_broker

pytestmark = [pytest.mark.e2e]


#: The start of a TCP-mode HAProxy config with one frontend, ``agents``.
HAPROXY_HEAD = """global
  maxconn 1000
defaults
  mode tcp
  timeout connect 2s
  timeout client 1h
  timeout server 1h
frontend agents
"""


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )
    assert found, "haproxy is installed by `make sysdeps`"
    return found


def start_haproxy(tmp: Path, brokers: list[BrokerHandle]) -> tuple[Proc, int]:
    port = free_port()
    servers = "\n".join(
        f"  server {i} 127.0.0.1:{b.agent_port} check inter 300ms fall 1 rise 1"
        for i, b in enumerate(brokers)
    )
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(
        HAPROXY_HEAD
        + f"""  bind 127.0.0.1:{port}
  default_backend brokers
backend brokers
  balance roundrobin
{servers}
"""
    )
    return Proc("haproxy", [haproxy_binary(), "-f", str(cfg), "-db"], tmp / "haproxy.log"), port


async def agent_readiness(port: int) -> str:
    try:
        status, body = await http_get(port, "/readyz")
    except (OSError, trio.TooSlowError):
        return ""
    return f"{status} {body.decode().strip()}"


async def broker_agents(broker: BrokerHandle) -> int:
    try:
        status, body = await http_get(broker.health_port, "/readyz")
    except (OSError, trio.TooSlowError):
        return -1
    return int(body.split()[1]) if status == 200 else 0


@pytest.mark.timeout(150)
async def test_agents_connect_to_every_replica_and_resync(
    tmp_path: Path,
    pki: PkiPaths,
    agent_factory: Callable[..., Proc],
    procs_started: list[Proc],
    nursery: trio.Nursery,
) -> None:
    brokers = []
    for i in range(3):
        b = start_broker(
            tmp_path,
            pki,
            f"--server-id=replica-{i}",
            "--server-count=3",
            "--keepalive-time=1",
            "--keepalive-timeout=2",
        )
        procs_started.append(b.proc)
        brokers.append(b)
    for b in brokers:
        await b.up()
    haproxy, lb_port = start_haproxy(tmp_path, brokers)
    procs_started.append(haproxy)

    health = [free_port(), free_port()]
    for n, hp in zip((1, 2), health, strict=True):
        agent_factory(brokers[0], f"--health-server-port={hp}", agent_id=f"agent-{n}", port=lb_port)

    async def all_connected() -> bool:
        states = [await agent_readiness(hp) for hp in health]
        counts = [await broker_agents(b) for b in brokers]
        return all(s.startswith("200 connected to all brokers (3/3)") for s in states) and (
            counts == [2, 2, 2]
        )

    await wait_for(all_connected, 60, "both agents on all three replicas")

    # A dial through any replica's frontend succeeds.
    async def hello(stream: trio.SocketStream) -> None:
        await stream.send_all(b"hello")

    listeners = await nursery.start(functools.partial(trio.serve_tcp, hello, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    for b in brokers:
        tunnel = await connect_tunnel(b, f"127.0.0.1:{port}", via="uds")
        assert tunnel.status == 200
        assert await tunnel.read_all() == b"hello"
        await tunnel.aclose()

    # One replica dies: agents notice and report "some".
    victim = brokers[1]
    victim.proc.kill9()

    async def degraded() -> bool:
        states = [await agent_readiness(hp) for hp in health]
        return all(s.startswith("200 connected to some brokers (2/3)") for s in states)

    await wait_for(degraded, 30, "agents to notice the lost replica")

    # It comes back (same ports): agents re-sync to all three.
    revived = Proc("broker", victim.proc.argv, tmp_path / "broker-revived.log")
    procs_started.append(revived)
    victim.proc = revived
    await wait_for(all_connected, 60, "agents to re-sync with the revived replica")
    for hp in health:
        assert "replica-1" in await agent_readiness(hp)

    # A replica drained with SIGTERM tells its agents to move; they leave it
    # and stay with the other two.
    drained = brokers[2]
    drained.proc.signal(15)
    await wait_for(degraded, 30, "agents to move off the drained replica")
    assert await trio.to_thread.run_sync(drained.proc.popen.wait, 30) == 0
    for hp in health:
        assert "replica-2" not in await agent_readiness(hp)
