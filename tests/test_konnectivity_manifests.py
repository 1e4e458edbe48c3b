"""The konnectivity setup guide's manifests run with only the binary name
changed (issue 15 item 3): the konnectivity-server static pod arguments and
the konnectivity-agent DaemonSet arguments of the kubernetes.io guide
(proxy-server v0.0.37), paths and ports pointed at this test's files. The
agent authenticates with a ServiceAccount token checked by a TokenReview
(a stand-in of the apiserver's endpoint, as in test_e2e_tokenreview.py);
kube-apiserver's side is the real grpcio client on the Unix socket."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from grpc_client import close_req, data_pkt, open_call
from procs import BrokerHandle, Proc, free_port, serve_echo
from test_e2e_tokenreview import kubeconfig, serve_tokenreview

from protocol import konnectivity_pb2 as pb
from tether.tools.certs import PkiPaths
from tether.tools.launch import BIN

pytestmark = [pytest.mark.e2e]

SA = "system:serviceaccount:kube-system:konnectivity-agent"
AUDIENCE = "system:konnectivity-server"


def _echo_through(uds: str, address: str, payload: bytes) -> bytes:
    with grpc.insecure_channel(f"unix://{uds}") as channel, open_call(channel) as call:
        rsp = call.dial(address, random=42)
        assert rsp.connectID and not rsp.error, rsp
        call.send(data_pkt(rsp.connectID, payload))
        got = b""
        while len(got) < len(payload):
            pkt = call.recv()
            assert pkt is not None and pkt.type == pb.DATA, pkt
            got += pkt.data.data
        call.send(close_req(rsp.connectID))
        return got


@pytest.mark.timeout(120)
async def test_guide_manifests_run_with_only_the_binary_name_changed(
    tmp_path: Path, pki: PkiPaths, nursery: trio.Nursery, procs_started: list[Proc]
) -> None:
    seen: list[dict[str, Any]] = []
    tokens = {
        "sa-token": {"authenticated": True, "user": {"username": SA}, "audiences": [AUDIENCE]}
    }
    api_port = await serve_tokenreview(nursery, pki, seen, tokens=tokens)
    agent_port, admin_port, health_port = free_port(), free_port(), free_port()
    uds = str(tmp_path / "konnectivity-server.socket")
    # kube-apiserver's static pod: konnectivity-server's arguments, as in the guide
    server_args = [
        "--logtostderr=true",
        f"--uds-name={uds}",
        "--delete-existing-uds-file",
        f"--cluster-cert={pki.broker_cert}",
        f"--cluster-key={pki.broker_key}",
        "--mode=grpc",
        "--server-port=0",
        f"--agent-port={agent_port}",
        f"--admin-port={admin_port}",
        f"--health-port={health_port}",
        "--agent-namespace=kube-system",
        "--agent-service-account=konnectivity-agent",
        f"--kubeconfig={kubeconfig(tmp_path, pki, api_port)}",
        f"--authentication-audience={AUDIENCE}",
    ]
    server = Proc("broker", [str(BIN / "tether-broker"), *server_args], tmp_path / "b.log")
    procs_started.append(server)
    broker = BrokerHandle(server, agent_port, 0, health_port, uds, pki, admin_port)
    await broker.up()
    # the DaemonSet's konnectivity-agent arguments, as in the guide
    token = tmp_path / "konnectivity-agent-token"
    token.write_text("sa-token\n")
    agent_args = [
        "--logtostderr=true",
        f"--ca-cert={pki.ca_cert}",
        "--proxy-server-host=127.0.0.1",
        f"--proxy-server-port={agent_port}",
        f"--admin-server-port={free_port()}",
        f"--health-server-port={free_port()}",
        f"--service-account-token-path={token}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "NODE_NAME"}
    agent = Proc("agent", [str(BIN / "tether-agent"), *agent_args], tmp_path / "a.log", env=env)
    procs_started.append(agent)
    await broker.ready(agents=1, timeout=30)
    assert seen and seen[0]["review"]["spec"]["audiences"] == [AUDIENCE]
    echo = await serve_echo(nursery)
    payload = os.urandom(256 * 1024)
    got = await trio.to_thread.run_sync(_echo_through, uds, f"127.0.0.1:{echo}", payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    # konnectivity's metrics names on the admin port
    text = await broker.metrics()
    assert "konnectivity_network_proxy_server_ready_backend_connections 1.0" in text
    assert "Traceback" not in server.log() + agent.log()
    assert server.stop() == 0 and agent.stop() == 0
