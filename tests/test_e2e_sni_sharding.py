"""Clusters sharded across broker sets by TLS SNI at one HAProxy (``mode tcp``,
``req.ssl_sni``), docs/operations.md "Sharding clusters across broker sets".

Each cluster has its own CA (``tether certs init --cluster``) and its own set
of brokers, whose certificate carries ``<cluster>.brokers.test``. Agents send
that name with ``--server-name={cluster}.brokers.test``; HAProxy reads it from
the ClientHello and picks the set, without terminating TLS. The SNI only
chooses where a connection goes: the set's broker still decides who the agent
is from its credential, and the agent still checks the broker's name.
"""

from __future__ import annotations

import re
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from procs import BrokerHandle, Proc, connect_tunnel, free_port, http_get, serve_echo, wait_for
from test_e2e_ha import HAPROXY_HEAD, agent_readiness, broker_agents, haproxy_binary
from test_e2e_routing import token_line

from edge_agent.config import tls_server_name
from tether.tools.certs import PkiPaths, init_pki
from tether.tools.launch import start_broker

pytestmark = [pytest.mark.e2e]

DOMAIN = "brokers.test"
SERVER_NAME = "--server-name={cluster}." + DOMAIN


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PkiPaths]:
    """One PKI (CA, broker certificate, agents) per cluster."""
    return {
        "alpha": init_pki(
            tmp_path_factory.mktemp("pki-alpha"),
            cluster="alpha",
            agents=("alpha-1", "alpha-2", "alpha-3"),
            extra_sans=(f"alpha.{DOMAIN}",),
        ),
        "beta": init_pki(
            tmp_path_factory.mktemp("pki-beta"),
            cluster="beta",
            agents=("beta-1",),
            extra_sans=(f"beta.{DOMAIN}",),
        ),
    }


def haproxy_by_sni(
    tmp: Path, sets: dict[str, list[BrokerHandle]], *, check: bool
) -> tuple[Proc, int]:
    """One HAProxy whose frontend routes on the ClientHello's server name:
    ``<cluster>.brokers.test`` to that cluster's set; any other name (or
    none) matches no backend and the connection is closed. Returns the
    process and its port."""
    port = free_port()
    routes = "\n".join(f"  use_backend set-{c} if {{ req.ssl_sni -i {c}.{DOMAIN} }}" for c in sets)
    # Health checks ask the broker's /healthz (its health port), not the
    # agent port: a bare TCP check there would be a failed TLS handshake.
    backends = "\n".join(
        f"backend set-{c}\n  balance roundrobin\n"
        + ("  option httpchk GET /healthz\n" if check else "")
        + "\n".join(
            f"  server {c}-{i} 127.0.0.1:{b.agent_port}"
            + (f" check port {b.health_port} inter 300ms fall 1 rise 1" if check else "")
            for i, b in enumerate(bs)
        )
        for c, bs in sets.items()
    )
    cfg = tmp / "haproxy-sni.cfg"
    cfg.write_text(
        HAPROXY_HEAD
        + f"""  bind 127.0.0.1:{port}
  tcp-request inspect-delay 5s
  tcp-request content accept if {{ req.ssl_hello_type 1 }}
{routes}
{backends}
"""
    )
    proc = Proc("haproxy", [haproxy_binary(), "-f", str(cfg), "-db"], tmp / "haproxy-sni.log")
    return proc, port


def broker_set(
    tmp: Path, pki: PkiPaths, cluster: str, size: int, procs_started: list[Proc], *extra: str
) -> list[BrokerHandle]:
    brokers = []
    for i in range(size):
        b = start_broker(
            tmp,
            pki,
            f"--cluster-name={cluster}",
            f"--server-id={cluster}-{i}",
            f"--server-count={size}",
            "--keepalive-time=1",
            "--keepalive-timeout=2",
            *extra,
        )
        procs_started.append(b.proc)
        brokers.append(b)
    return brokers


async def metric(port: int, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` on a /metrics page that carry ``labels``."""
    status, body = await http_get(port, "/metrics")
    assert status == 200
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", re.M)
    total = 0.0
    for got, value in pattern.findall(body.decode()):
        have = dict(re.findall(r'(\w+)="([^"]*)"', got))
        if labels.items() <= have.items():
            total += float(value)
    return total


@pytest.mark.timeout(180)
async def test_each_cluster_lands_on_and_is_dialed_through_its_own_set(
    tmp_path: Path,
    pkis: dict[str, PkiPaths],
    agent_factory: Callable[..., Proc],
    procs_started: list[Proc],
    nursery: trio.Nursery,
) -> None:
    """Set alpha (two HA replicas) and set beta (one) behind one HAProxy:
    every agent holds exactly its own set's brokers, every dial through a
    broker is served by an agent of that broker's cluster, and losing an
    alpha replica leaves alpha on the other and beta untouched."""
    sets = {
        "alpha": broker_set(tmp_path, pkis["alpha"], "alpha", 2, procs_started),
        "beta": broker_set(tmp_path, pkis["beta"], "beta", 1, procs_started),
    }
    for brokers in sets.values():
        for b in brokers:
            await b.up()
    haproxy, lb = haproxy_by_sni(tmp_path, sets, check=True)
    procs_started.append(haproxy)

    # One echo target per cluster; each cluster's agents may dial only theirs,
    # so a dial that reaches the other cluster's agent fails with 403.
    targets = {c: await serve_echo(nursery) for c in sets}
    agents = {"alpha-1": "alpha", "alpha-2": "alpha", "beta-1": "beta"}
    health = {a: free_port() for a in agents}
    admin = {a: free_port() for a in agents}
    for agent_id, cluster in agents.items():
        agent_factory(
            sets[cluster][0],
            f"--cluster={cluster}",
            SERVER_NAME,
            f"--allow=127.0.0.1/32:{targets[cluster]}",
            f"--health-server-port={health[agent_id]}",
            "--metrics",
            f"--admin-server-port={admin[agent_id]}",
            agent_id=agent_id,
            port=lb,
        )

    async def settled() -> bool:
        states = {a: await agent_readiness(hp) for a, hp in health.items()}
        counts = {c: [await broker_agents(b) for b in bs] for c, bs in sets.items()}
        return (
            all(
                states[a].startswith("200 connected to all brokers (2/2)")
                for a in ("alpha-1", "alpha-2")
            )
            and states["beta-1"].startswith("200 connected to all brokers (1/1)")
            and counts == {"alpha": [2, 2], "beta": [1]}
        )

    await wait_for(settled, 60, "alpha agents on both alpha brokers, beta-1 on the beta broker")
    for agent_id, cluster in agents.items():
        state = await agent_readiness(health[agent_id])
        replicas = set(re.findall(r"\b(?:alpha|beta)-\d\b", state.split(":", 1)[1]))
        assert replicas == {f"{cluster}-{i}" for i in range(len(sets[cluster]))}, state
    for cluster, brokers in sets.items():
        for b in brokers:
            ready = await metric(
                b.admin_port, "konnectivity_network_proxy_server_ready_backend_connections"
            )
            assert ready == (2 if cluster == "alpha" else 1)

    # Dials through every broker's frontend reach an agent of that broker's
    # cluster: its own target echoes the data, the other cluster's target is
    # refused by the agent's --allow (403), so no agent of the other cluster
    # took the dial.
    for cluster, brokers in sets.items():
        other = next(c for c in sets if c != cluster)
        for b in brokers:
            tunnel = await connect_tunnel(b, f"127.0.0.1:{targets[cluster]}", via="uds")
            assert tunnel.status == 200, tunnel.body
            payload = f"hello {cluster} through {b.agent_port}".encode() * 100
            await tunnel.send_all(payload)
            await tunnel.send_eof()
            assert await tunnel.read_all() == payload
            await tunnel.aclose()
            refused = await connect_tunnel(b, f"127.0.0.1:{targets[other]}", via="uds")
            assert refused.status == 403, (refused.status, refused.body)
            await refused.aclose()

    for brokers in sets.values():  # nothing but agents of the set reached its agent ports
        for b in brokers:
            assert await metric(b.admin_port, "tether_bad_input_total", source="agent") == 0
    dials = {
        a: await metric(admin[a], "konnectivity_network_proxy_agent_dial_duration_seconds_count")
        for a in agents
    }
    assert dials["alpha-1"] + dials["alpha-2"] == 2  # one per alpha broker
    assert dials["beta-1"] == 1
    forbidden = {
        a: await metric(
            admin[a],
            "konnectivity_network_proxy_agent_endpoint_dial_failure_total",
            reason="forbidden",
        )
        for a in agents
    }
    assert forbidden["alpha-1"] + forbidden["alpha-2"] == 2  # beta's target, via alpha
    assert forbidden["beta-1"] == 1

    # HA within the alpha set: one alpha broker dies; alpha agents keep the
    # other (1/2) and are still dialed through it; beta is untouched.
    sets["alpha"][0].proc.kill9()

    async def alpha_degraded() -> bool:
        states = [await agent_readiness(health[a]) for a in ("alpha-1", "alpha-2")]
        return all(s.startswith("200 connected to some brokers (1/2)") for s in states)

    await wait_for(alpha_degraded, 30, "alpha agents to notice the lost alpha broker")
    assert (await agent_readiness(health["beta-1"])).startswith(
        "200 connected to all brokers (1/1)"
    )
    assert await broker_agents(sets["beta"][0]) == 1
    tunnel = await connect_tunnel(sets["alpha"][1], f"127.0.0.1:{targets['alpha']}", via="uds")
    assert tunnel.status == 200, tunnel.body
    await tunnel.send_all(b"still here")
    await tunnel.send_eof()
    assert await tunnel.read_all() == b"still here"
    await tunnel.aclose()


def both_cas(tmp: Path, pkis: dict[str, PkiPaths]) -> Path:
    """alpha's and beta's CA certificates in one bundle (CAs are public)."""
    bundle = tmp / "alpha+beta-ca.crt"
    bundle.write_bytes(pkis["alpha"].ca_cert.read_bytes() + pkis["beta"].ca_cert.read_bytes())
    return bundle


async def two_sets(
    tmp: Path,
    pkis: dict[str, PkiPaths],
    procs_started: list[Proc],
    *beta_extra: str,
    alpha_extra: tuple[str, ...] = (),
) -> tuple[dict[str, list[BrokerHandle]], int]:
    """One broker per cluster behind the SNI-routing HAProxy (no health
    checks: every connection a broker sees is an agent's)."""
    sets = {
        "alpha": broker_set(tmp, pkis["alpha"], "alpha", 1, procs_started, *alpha_extra),
        "beta": broker_set(tmp, pkis["beta"], "beta", 1, procs_started, *beta_extra),
    }
    for brokers in sets.values():
        await brokers[0].up()
    haproxy, port = haproxy_by_sni(tmp, sets, check=False)
    procs_started.append(haproxy)
    return sets, port


async def honest_beta_agent(
    beta: BrokerHandle, agent_factory: Callable[..., Proc], lb: int
) -> None:
    """beta-1, through HAProxy under beta's name: the control beside a hostile agent."""
    agent_factory(beta, "--cluster=beta", SERVER_NAME, agent_id="beta-1", port=lb)
    await beta.ready(agents=1)


def alpha_agent_posing_as_beta(
    beta: BrokerHandle,
    agent_factory: Callable[..., Proc],
    pkis: dict[str, PkiPaths],
    bundle: Path,
    lb: int,
) -> tuple[Proc, int]:
    """alpha-3, with alpha's certificate, trusting ``bundle`` and sending
    beta's server name through HAProxy; returns it and its health port."""
    health = free_port()
    proc = agent_factory(
        beta,
        f"--ca-cert={bundle}",
        "--cluster=beta",
        SERVER_NAME,
        f"--health-server-port={health}",
        agent_id="alpha-3",
        pki=pkis["alpha"],
        port=lb,
    )
    return proc, health


@pytest.mark.timeout(120)
async def test_sni_of_another_cluster_lands_there_and_is_refused(
    tmp_path: Path,
    pkis: dict[str, PkiPaths],
    agent_factory: Callable[..., Proc],
    procs_started: list[Proc],
) -> None:
    """An agent of alpha that sends beta's server name reaches beta's broker
    (SNI is the client's word), and beta's broker refuses its certificate:
    beta's agent port trusts only beta's CA. The attacker even trusts beta's
    (public) CA, so the refusal is the broker's, not the agent's."""
    sets, lb = await two_sets(tmp_path, pkis, procs_started)
    beta = sets["beta"][0]
    await honest_beta_agent(beta, agent_factory, lb)
    assert await metric(beta.admin_port, "tether_bad_input_total", source="agent") == 0
    hostile, hostile_health = alpha_agent_posing_as_beta(
        beta, agent_factory, pkis, both_cas(tmp_path, pkis), lb
    )

    async def refused_twice() -> bool:
        n = await metric(
            beta.admin_port, "tether_bad_input_total", source="agent", reason="tls_handshake"
        )
        return n >= 2 and "the broker rejected our certificate: unknown CA" in hostile.log()

    await wait_for(refused_twice, 30, "beta's broker to refuse alpha-3's certificate")
    assert "CERTIFICATE_VERIFY_FAILED" in beta.proc.log()
    assert await broker_agents(beta) == 1  # beta-1 only
    alpha = sets["alpha"][0]
    assert await broker_agents(alpha) == 0  # the SNI sent it to beta, not alpha
    assert await metric(alpha.admin_port, "tether_bad_input_total", source="agent") == 0
    assert (await agent_readiness(hostile_health)).startswith("503")
    assert "alpha-3" not in beta.proc.log()  # refused before it could say who it is


@pytest.mark.timeout(120)
async def test_sni_of_another_cluster_is_refused_even_where_its_ca_is_trusted(
    tmp_path: Path,
    pkis: dict[str, PkiPaths],
    agent_factory: Callable[..., Proc],
    procs_started: list[Proc],
) -> None:
    """Beta's broker misconfigured to trust alpha's CA as well (one bundle in
    --cluster-ca-cert): alpha-3 now passes TLS there, and is still refused,
    403 ``identity_mismatch``, because its certificate names cluster alpha
    (``O=alpha``) and the broker serves beta. The cluster is the
    credential's, never the SNI's."""
    bundle = both_cas(tmp_path, pkis)
    sets, lb = await two_sets(tmp_path, pkis, procs_started, f"--cluster-ca-cert={bundle}")
    beta = sets["beta"][0]
    await honest_beta_agent(beta, agent_factory, lb)
    hostile, hostile_health = alpha_agent_posing_as_beta(beta, agent_factory, pkis, bundle, lb)

    async def refused_twice() -> bool:
        n = await metric(
            beta.admin_port,
            "tether_agent_connections_rejected_total",
            reason="identity_mismatch",
        )
        return n >= 2

    await wait_for(refused_twice, 30, "beta's broker to refuse alpha-3 as identity_mismatch")
    assert "names cluster 'alpha'" in beta.proc.log(), beta.proc.tail()
    assert "broker rejected this agent (403): identity_mismatch" in hostile.log(), hostile.tail()
    assert await broker_agents(beta) == 1  # beta-1 only
    assert await broker_agents(sets["alpha"][0]) == 0
    assert (await agent_readiness(hostile_health)).startswith("503")


@pytest.mark.timeout(120)
async def test_server_name_is_verified_against_the_broker_certificate(
    tmp_path: Path,
    pkis: dict[str, PkiPaths],
    agent_factory: Callable[..., Proc],
    procs_started: list[Proc],
) -> None:
    """Hostname verification is kept: a name the broker's certificate does
    not carry fails, and so does the right set reached under another
    cluster's name, and an unknown name (or none) gets no broker at all."""
    sets, lb = await two_sets(tmp_path, pkis, procs_started)
    alpha, beta = sets["alpha"][0], sets["beta"][0]
    # alpha's own broker and CA, directly, under a name its certificate lacks.
    mismatch = agent_factory(
        alpha, f"--server-name=gamma.{DOMAIN}", agent_id="alpha-1", port=alpha.agent_port
    )
    # Through HAProxy under beta's name with only alpha's CA: beta's broker
    # answers, with a certificate alpha does not trust.
    misrouted = agent_factory(alpha, "--cluster=beta", SERVER_NAME, agent_id="alpha-2", port=lb)
    # A name HAProxy has no route for: closed before any broker sees it.
    unrouted = agent_factory(alpha, f"--server-name=gamma.{DOMAIN}", agent_id="alpha-3", port=lb)
    # No server name at all (an address sends no SNI): no route either.
    no_sni = agent_factory(alpha, agent_id="alpha-3", port=lb)
    # The honest control: the same agent flags, the right name.
    agent_factory(beta, "--cluster=beta", SERVER_NAME, agent_id="beta-1", port=lb)
    await beta.ready(agents=1)

    async def all_failed() -> bool:
        return (
            f"Hostname mismatch, certificate is not valid for 'gamma.{DOMAIN}'" in mismatch.log()
            and "cannot verify the broker's certificate" in misrouted.log()
            and "peer closed during the TLS handshake" in unrouted.log()
            and "peer closed during the TLS handshake" in no_sni.log()
        )

    await wait_for(all_failed, 30, "the three agents to fail their TLS handshakes")
    assert await broker_agents(alpha) == 0
    assert await broker_agents(beta) == 1
    for proc in (unrouted, no_sni):
        assert "cannot verify" not in proc.log()  # no broker answered them


@pytest.mark.timeout(120)
async def test_token_of_another_cluster_is_refused_by_that_set(
    tmp_path: Path,
    pkis: dict[str, PkiPaths],
    agent_factory: Callable[..., Proc],
    procs_started: list[Proc],
) -> None:
    """Token agents: each set knows only its own cluster's tokens. alpha's
    token sent under beta's name reaches beta's broker and is refused there
    (401 ``bad_token``); under alpha's name it is accepted by alpha's set."""
    files = {}
    for cluster in ("alpha", "beta"):
        files[cluster] = tmp_path / f"{cluster}.tokens"
        files[cluster].write_text(token_line(f"{cluster}-s3cret", cluster, f"{cluster}-*"))
    sets, lb = await two_sets(
        tmp_path,
        pkis,
        procs_started,
        f"--agent-token-file={files['beta']}",
        alpha_extra=(f"--agent-token-file={files['alpha']}",),
    )
    alpha, beta = sets["alpha"][0], sets["beta"][0]
    token = tmp_path / "alpha.token"
    token.write_text("alpha-s3cret\n")
    creds = (f"--service-account-token-path={token}", "--cluster=alpha")
    honest = agent_factory(
        alpha, *creds, SERVER_NAME, agent_id="alpha-7", client_cert=False, port=lb
    )
    await alpha.ready(agents=1)
    hostile = agent_factory(
        alpha,
        *creds,
        f"--server-name=beta.{DOMAIN}",
        f"--ca-cert={both_cas(tmp_path, pkis)}",
        agent_id="alpha-8",
        client_cert=False,
        port=lb,
    )

    async def refused_twice() -> bool:
        n = await metric(
            beta.admin_port, "tether_agent_connections_rejected_total", reason="bad_token"
        )
        return n >= 2

    await wait_for(refused_twice, 30, "beta's broker to refuse alpha's token")
    assert "broker rejected this agent (401): bad_token" in hostile.log(), hostile.tail()
    assert await broker_agents(beta) == 0
    assert await broker_agents(alpha) == 1  # alpha-7 only
    assert "alpha-s3cret" not in hostile.log() + honest.log() + beta.proc.log()


@pytest.mark.timeout(30)
def test_documented_haproxy_config_is_valid(tmp_path: Path) -> None:
    """The HAProxy configuration in docs/operations.md is one HAProxy accepts
    (``haproxy -c``), and routes the names the agents' --server-name makes."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    rest = text[text.index("- **HAProxy**, `mode tcp`") :]
    start = rest.index("```\n") + 4
    cfg = tmp_path / "documented.cfg"
    cfg.write_text(textwrap.dedent(rest[start : rest.index("```", start)]))
    run = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=20
    )
    assert run.returncode == 0, run.stdout + run.stderr
    for cluster in ("alpha", "beta"):
        name = tls_server_name("{cluster}.brokers.example", cluster, "lb.example")
        assert f"{{ req.ssl_sni -i {name} }}" in cfg.read_text()
