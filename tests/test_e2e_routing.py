"""Routing, multi-cluster isolation, agent identity, tokens and the agent's
destination policy, through the real commands."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from procs import BrokerHandle, Proc, connect_tunnel, wait_for

from tether.tools.certs import init_pki
from tether.tools.launch import start_broker

pytestmark = [pytest.mark.e2e]


async def serve_whoami(nursery: trio.Nursery, host: str) -> int:
    """A target on ``host`` (a loopback address) that names itself."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await stream.send_all(host.encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host=host))
    return int(listeners[0].socket.getsockname()[1])


def dials_by(agent: Proc) -> list[str]:
    """Targets this agent process dialed, from its own log."""
    return re.findall(r"dial \d+ to (\S+) ok", agent.log())


async def whoami(broker: BrokerHandle, target: str, via: str = "uds") -> tuple[int, bytes]:
    tunnel = await connect_tunnel(broker, target, via=via)
    if tunnel.status != 200:
        return tunnel.status, tunnel.body
    answer = await tunnel.read_all()
    await tunnel.aclose()
    return 200, answer


@pytest.mark.timeout(90)
async def test_routing_by_host_ip_cidr_and_fallbacks(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    broker = broker_factory(
        "--proxy-strategies=destHost,defaultRoute,default",
        # What each agent may claim (the default policy trusts only allowed claims).
        "--agent-allowed-identifiers=agent-1:host=localhost&ipv4=127.0.0.11,"
        "agent-2:ipv4=127.0.0.12&cidr=127.0.1.0/24,agent-3:default-route=true",
    )
    a1 = agent_factory(broker, "--agent-identifiers=host=localhost&ipv4=127.0.0.11")
    a2 = agent_factory(
        broker, "--agent-identifiers=ipv4=127.0.0.12&cidr=127.0.1.0/24", agent_id="agent-2"
    )
    a3 = agent_factory(broker, "--agent-identifiers=default-route=true", agent_id="agent-3")
    await broker.ready(agents=3)
    ports = {
        h: await serve_whoami(nursery, h)
        for h in ("127.0.0.1", "127.0.0.11", "127.0.0.12", "127.0.1.7", "127.0.0.99")
    }
    cases = [
        (f"localhost:{ports['127.0.0.1']}", a1, b"127.0.0.1"),  # by host name
        (f"127.0.0.11:{ports['127.0.0.11']}", a1, b"127.0.0.11"),  # by ipv4
        (f"127.0.0.12:{ports['127.0.0.12']}", a2, b"127.0.0.12"),  # by ipv4
        (f"127.0.1.7:{ports['127.0.1.7']}", a2, b"127.0.1.7"),  # by cidr containment
        (f"127.0.0.99:{ports['127.0.0.99']}", a3, b"127.0.0.99"),  # defaultRoute fallback
    ]
    for target, agent, expected in cases:
        for _ in range(3):  # every time, not by luck
            status, answer = await whoami(broker, target)
            assert (status, answer) == (200, expected), target
        assert dials_by(agent).count(target) == 3, (target, agent.name)
    for agent in (a1, a2, a3):
        assert sum(dials_by(agent).count(t) for t, a, _ in cases if a is not agent) == 0


@pytest.mark.timeout(90)
async def test_strategy_without_match_is_503_and_default_takes_any(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    strict = broker_factory("--proxy-strategies=destHost")
    agent_factory(strict, "--agent-identifiers=ipv4=127.0.0.11")
    loose = broker_factory("--proxy-strategies=destHost,default")
    other = agent_factory(loose, "--agent-identifiers=ipv4=127.0.0.11", agent_id="agent-2")
    await strict.ready(agents=1)
    await loose.ready(agents=1)
    port = await serve_whoami(nursery, "127.0.0.99")
    status, body = await whoami(strict, f"127.0.0.99:{port}")
    assert status == 503 and b"no agent available" in body
    assert await whoami(loose, f"127.0.0.99:{port}") == (200, b"127.0.0.99")
    assert dials_by(other) == [f"127.0.0.99:{port}"]


@pytest.mark.timeout(90)
async def test_load_spreads_across_equal_agents(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    broker = broker_factory()
    agents = [agent_factory(broker, agent_id=f"agent-{i}") for i in (1, 2, 3)]
    await broker.ready(agents=3)

    async def hold(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    tunnels = []
    for _ in range(30):  # all held open, so "least loaded" has something to see
        tunnel = await connect_tunnel(broker, f"127.0.0.1:{port}", via="uds")
        assert tunnel.status == 200
        tunnels.append(tunnel)
    counts = [len(dials_by(a)) for a in agents]
    assert sum(counts) == 30
    assert counts == [10, 10, 10], counts  # least-loaded keeps them level
    for tunnel in tunnels:
        await tunnel.aclose()


# ------------------------------------------------------------- isolation


def write_config(path: Path, body: str) -> str:
    path.write_text(body)
    return str(path)


def token_line(token: str, cluster: str, pattern: str) -> str:
    cap = " max=10" if "*" in pattern else ""  # a glob entry caps the ids it holds
    return f"sha256:{hashlib.sha256(token.encode()).hexdigest()} {cluster} {pattern}{cap}\n"


@pytest.mark.timeout(120)
async def test_two_clusters_are_isolated(
    tmp_path: Path,
    agent_factory: Callable[..., Proc],
    procs_started: list[Proc],
    nursery: trio.Nursery,
) -> None:
    pki_a = init_pki(tmp_path / "a", cluster="a", agents=("agent-1", "agent-2"))
    pki_b = init_pki(tmp_path / "b", cluster="b", agents=("agent-1",))
    tokens = tmp_path / "tokens"
    tokens.write_text(token_line("token-for-a", "a", "tok-*"))
    config = write_config(
        tmp_path / "clusters.toml",
        f"""
[[clusters]]
name = "a"
agent_ca = "{pki_a.ca_cert}"
token_agents = true
frontend_uds = "{tmp_path / "a.sock"}"

[[clusters]]
name = "b"
agent_ca = "{pki_b.ca_cert}"
token_agents = true
frontend_uds = "{tmp_path / "b.sock"}"
""",
    )
    # The broker's own certificate comes from a's CA; b's agents trust it too.
    broker = start_broker(
        tmp_path, pki_a, f"--config={config}", f"--agent-token-file={tokens}", "--server-port=0"
    )
    procs_started.append(broker.proc)
    await broker.up()
    agent_b = agent_factory(broker, pki=pki_b)
    await broker.ready(agents=1)
    port = await serve_whoami(nursery, "127.0.0.1")

    async def via_sock(sock: str) -> int:
        broker.uds = str(tmp_path / sock)
        return (await whoami(broker, f"127.0.0.1:{port}"))[0]

    # Cluster b's frontend reaches b's agent; cluster a's frontend does not.
    assert await via_sock("b.sock") == 200
    assert await via_sock("a.sock") == 503
    assert len(dials_by(agent_b)) == 1

    # a's certificate cannot claim cluster b, nor another agent's id.
    claim_b = agent_factory(broker, "--cluster=b", pki=pki_a, agent_id="agent-2")
    cert, key = pki_a.agent("agent-2")
    impostor = agent_factory(
        broker, f"--agent-cert={cert}", f"--agent-key={key}", pki=pki_a, agent_id="agent-1"
    )
    # A token scoped to a cannot register in b.
    tok = tmp_path / "tok"
    tok.write_text("token-for-a\n")
    token_in_b = agent_factory(
        broker,
        f"--service-account-token-path={tok}",
        "--cluster=b",
        agent_id="tok-1",
        client_cert=False,
    )
    for proc, reason in (
        (claim_b, "identity_mismatch"),
        (impostor, "identity_mismatch"),
        (token_in_b, "token_scope"),
    ):
        await wait_for(lambda p=proc: _rejected(p), 20, f"{proc.name} rejected")
        assert reason in proc.log(), proc.log()[-1500:]
    assert await via_sock("b.sock") == 200
    assert await via_sock("a.sock") == 503  # still nothing registered in a
    metrics = await broker.metrics()
    assert 'tether_agent_connections_rejected_total{reason="identity_mismatch"}' in metrics
    assert 'tether_agent_connections_rejected_total{reason="token_scope"}' in metrics


async def _rejected(proc: Proc) -> bool:
    return "broker rejected this agent" in proc.log()


@pytest.mark.timeout(120)
async def test_tokens_valid_revoked_and_wrong(
    tmp_path: Path,
    pki: object,
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(token_line("s3cret-token", "default", "edge-*"))
    broker = broker_factory(f"--agent-token-file={tokens}")
    await broker.up()
    tok = tmp_path / "tok"
    tok.write_text("s3cret-token\n")
    port = await serve_whoami(nursery, "127.0.0.1")

    good = agent_factory(
        broker, f"--service-account-token-path={tok}", agent_id="edge-1", client_cert=False
    )
    await broker.ready(agents=1)
    assert await whoami(broker, f"127.0.0.1:{port}") == (200, b"127.0.0.1")
    assert "s3cret-token" not in good.log()  # never logged

    # Revoke: remove the line; the next connect is refused.
    tokens.write_text("# revoked\n")
    good.stop()
    again = agent_factory(
        broker, f"--service-account-token-path={tok}", agent_id="edge-1", client_cert=False
    )
    await wait_for(lambda: _rejected(again), 20, "revoked token refused")
    assert "(401)" in again.log() and "bad_token" in again.log()

    # A wrong token is refused too, and the agent backs off to its cap.
    tok.write_text("not-the-token\n")
    wrong = agent_factory(
        broker, f"--service-account-token-path={tok}", agent_id="edge-2", client_cert=False
    )
    await wait_for(lambda: _rejected(wrong), 20, "wrong token refused")
    await wait_for(lambda: _logged(wrong, "backoff ceiling 2.0s"), 20, "backoff at the cap")
    assert "not-the-token" not in wrong.log()


async def _logged(proc: Proc, text: str) -> bool:
    return text in proc.log()


@pytest.mark.timeout(60)
async def test_agent_policy_allows_and_forbids(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    broker = broker_factory()
    allowed = await serve_whoami(nursery, "127.0.0.1")
    denied = await serve_whoami(nursery, "127.0.0.1")
    agent_factory(broker, f"--allow=127.0.0.0/8:{allowed}")
    await broker.ready(agents=1)
    assert await whoami(broker, f"127.0.0.1:{allowed}") == (200, b"127.0.0.1")
    assert await whoami(broker, f"localhost:{allowed}") == (200, b"127.0.0.1")
    status, body = await whoami(broker, f"127.0.0.1:{denied}")
    assert status == 403
    assert b"allowlist" in body
    metrics = await broker.metrics()
    assert 'dial_failure_count_total{reason="forbidden"}' in metrics
