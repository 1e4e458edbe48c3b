"""Lease-based server counting, as konnectivity has (issue 15 item 2): the
sans-IO arithmetic, the broker's publisher against a stand-in apiserver
over real HTTPS, and a real agent counting leases."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from kube_standin import LeaseStore, kubeconfig, serve_leases
from procs import BrokerHandle, Proc, free_port, http_get, wait_for

from broker.leases import LeasePublisher
from protocol import leases
from tether.netio.kubeapi import KubeApiError, KubeClient, load_kubeconfig
from tether.tools.certs import PkiPaths, init_pki
from tether.tools.launch import BIN

LABELS = {"k8s-app": "konnectivity-server"}


def test_labels_and_names() -> None:
    assert leases.parse_labels("k8s-app=konnectivity-server, tier=cp") == {
        "k8s-app": "konnectivity-server",
        "tier": "cp",
    }
    for bad in ("", "novalue", "=x", "a b=c", "k=v v"):
        with pytest.raises(ValueError):
            leases.parse_labels(bad)
    assert leases.lease_name("Broker_01") == "tether-broker-broker-01"


@given(st.floats(1e9, 2e9), st.integers(1, 3600), st.floats(0, 7200))
def test_live_and_expired_partition(renewed: float, duration: int, later: float) -> None:
    body = leases.lease_body("ns", "n", "s1", LABELS, renewed, duration_s=duration)
    (state,) = leases.read_leases([body])
    now = renewed + later
    assert state.expires_at == pytest.approx(renewed + duration, abs=1e-5)
    assert (state in leases.live([state], now)) != (state in leases.expired([state], now))


def test_malformed_leases_count_as_expired() -> None:
    found = leases.read_leases(
        [{"spec": {"renewTime": "yesterday", "leaseDurationSeconds": 30}}, {"spec": None}, 7]
    )
    assert len(found) == 2 and leases.live(found, time.time()) == []


def _other(name: str, holder: str, renewed: float) -> dict[str, object]:
    return leases.lease_body("kube-system", name, holder, LABELS, renewed)


@pytest.mark.timeout(30)
async def test_publisher_creates_renews_collects_and_releases(
    tmp_path: Path, pki: PkiPaths, nursery: trio.Nursery
) -> None:
    store = LeaseStore(token="lease-token")
    port = await serve_leases(nursery, pki, store)
    api = load_kubeconfig(str(kubeconfig(tmp_path / "kc", pki, port, "lease-token")))
    now = time.time()
    store.put(_other("tether-broker-b2", "b2", now))  # a live replica
    store.put(_other("tether-broker-b3", "b3", now - 120))  # a dead one
    store.put(leases.lease_body("kube-system", "unrelated", "x", {"app": "other"}, now - 999))
    publisher = LeasePublisher(KubeClient(api), "kube-system", LABELS, "b1")
    await publisher.renew()
    await publisher.collect()
    ours = store.leases[("kube-system", "tether-broker-b1")]
    assert ours["spec"]["holderIdentity"] == "b1"
    assert ours["metadata"]["labels"] == LABELS
    assert publisher.live_count == 2  # b1 and b2
    assert ("kube-system", "tether-broker-b3") not in store.leases  # collected
    assert ("kube-system", "unrelated") in store.leases  # other labels are not ours
    first = ours["spec"]["renewTime"]
    await trio.sleep(0.01)
    await publisher.renew()
    assert store.leases[("kube-system", "tether-broker-b1")]["spec"]["renewTime"] > first
    await publisher.release()
    assert ("kube-system", "tether-broker-b1") not in store.leases
    assert store.connections == 1  # one kept-alive connection for every request


@pytest.mark.timeout(30)
async def test_a_wrong_token_is_a_clear_error(
    tmp_path: Path, pki: PkiPaths, nursery: trio.Nursery
) -> None:
    store = LeaseStore(token="right")
    port = await serve_leases(nursery, pki, store)
    api = load_kubeconfig(str(kubeconfig(tmp_path / "kc", pki, port, "wrong")))
    with pytest.raises(KubeApiError, match="401"):
        await LeasePublisher(KubeClient(api), "kube-system", LABELS, "b1").renew()


@pytest.mark.timeout(60)
async def test_agent_counts_live_leases(
    tmp_path: Path,
    pki: PkiPaths,
    nursery: trio.Nursery,
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
) -> None:
    store = LeaseStore(token="agent-token")
    port = await serve_leases(nursery, pki, store)
    now = time.time()
    store.put(_other("tether-broker-a", "a", now + 3600))
    store.put(_other("tether-broker-b", "b", now + 3600))
    store.put(_other("tether-broker-c", "c", now - 600))  # expired: not counted
    broker = broker_factory()
    admin = free_port()
    agent = agent_factory(
        broker,
        "--count-server-leases",
        f"--kubeconfig={kubeconfig(tmp_path / 'kc', pki, port, 'agent-token')}",
        "--metrics",
        f"--admin-server-port={admin}",
    )
    await broker.ready(agents=1)

    async def says(text: str) -> bool:
        return text in agent.log()

    await wait_for(lambda: says("broker leases: 2 live (was 0)"), 20, "agent counted 2 leases")
    await wait_for(lambda: says("broker leases say 2 replica(s)"), 20, "agent took the count")
    del store.leases[("kube-system", "tether-broker-b")]
    await wait_for(lambda: says("broker leases: 1 live (was 2)"), 20, "agent saw a lease go")
    assert any(
        target.startswith(leases.collection_path("kube-system")) for _, target in store.requests
    )
    # konnectivity-agent's lease metrics, by status and reason.
    status, body = await http_get(admin, "/metrics")
    assert status == 200
    text = body.decode()
    ok = 'konnectivity_network_proxy_agent_lease_lists_total{http_response_code="200",reason="ok"}'
    assert ok in text, text[-2000:]
    assert "konnectivity_network_proxy_agent_lease_list_latency_seconds_count" in text


@pytest.mark.timeout(60)
async def test_broker_publishes_its_lease_and_reports_the_live_count(
    tmp_path: Path,
    pki: PkiPaths,
    nursery: trio.Nursery,
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
) -> None:
    """A real broker with --enable-lease-controller against the stand-in:
    it creates its Lease, counts the live ones (its own and another
    replica's) and tells agents that count; a SIGTERM removes its Lease."""
    store = LeaseStore(token="broker-token")
    port = await serve_leases(nursery, pki, store)
    store.put(_other("tether-broker-b2", "b2", time.time() + 3600))  # another live replica
    broker = broker_factory(
        "--enable-lease-controller",
        f"--kubeconfig={kubeconfig(tmp_path / 'kc', pki, port, 'broker-token')}",
        "--server-id=b1",
    )
    await broker.up()
    ours = ("kube-system", "tether-broker-b1")
    await wait_for(lambda: _async(ours in store.leases), 20, "the broker's lease")
    assert store.leases[ours]["spec"]["holderIdentity"] == "b1"
    assert store.leases[ours]["metadata"]["labels"] == LABELS
    agent = agent_factory(broker)
    await broker.ready(agents=1)
    await wait_for(
        lambda: _async("broker reports 2 replica(s)" in agent.log()), 20, "the agent told 2"
    )
    assert "replica count from leases: 2" in broker.proc.log()
    # stop it without blocking this event loop, which serves the stand-in
    broker.proc.popen.send_signal(signal.SIGTERM)
    await wait_for(lambda: _async(broker.proc.popen.poll() is not None), 20, "the broker's exit")
    assert broker.proc.popen.returncode == 0
    assert ours not in store.leases  # gone at once, not after its duration
    assert "lease kube-system/tether-broker-b1 deleted" in broker.proc.log()
    assert ("kube-system", "tether-broker-b2") in store.leases


async def _async(value: bool) -> bool:
    return value


@pytest.mark.timeout(30)
def test_agent_refuses_an_unreadable_kubeconfig_at_start_up(tmp_path: Path) -> None:
    # The agent imports the Kubernetes client only with --count-server-leases
    # (issue 16); its error is still a clear start-up error, exit 2.
    pki = init_pki(tmp_path / "pki", agents=("agent-1",))
    bad = tmp_path / "kubeconfig"
    bad.write_text("clusters: [\n")
    cert, key = pki.agent("agent-1")
    out = subprocess.run(
        [
            str(BIN / "tether-agent"),
            "--proxy-server-host=127.0.0.1",
            f"--proxy-server-port={free_port()}",
            f"--ca-cert={pki.ca_cert}",
            f"--agent-cert={cert}",
            f"--agent-key={key}",
            "--agent-id=agent-1",
            "--health-server-port=0",
            "--admin-server-port=0",
            "--count-server-leases",
            f"--kubeconfig={bad}",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 2, out.stderr
    assert f"kubeconfig {bad}" in out.stderr
