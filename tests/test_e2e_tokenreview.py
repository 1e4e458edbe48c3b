"""Agent tokens checked by a Kubernetes TokenReview.

kube-apiserver cannot run here, so a small HTTPS server in this test plays
its TokenReview endpoint (``POST /apis/authentication.k8s.io/v1/tokenreviews``,
the documented request and response shapes) and records what the broker
sent. The broker and agents are the real processes.
"""

from __future__ import annotations

import functools
import json
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio
from procs import BrokerHandle, Proc, connect_tunnel, wait_for

from tether.tools.certs import PkiPaths

pytestmark = [pytest.mark.e2e]

SA = "system:serviceaccount:kube-system:tether-agent"
TOKENS = {
    "good-token": {"authenticated": True, "user": {"username": SA}, "audiences": ["tether"]},
    "other-sa": {
        "authenticated": True,
        "user": {"username": "system:serviceaccount:default:intruder"},
        "audiences": ["tether"],
    },
    "wrong-audience": {"authenticated": True, "user": {"username": SA}, "audiences": ["else"]},
}


@attrs.define
class ReviewStats:
    """What the stand-in apiserver saw: TLS connections and reviews."""

    connections: int = 0
    reviews: int = 0


async def serve_tokenreview(
    nursery: trio.Nursery,
    pki: PkiPaths,
    seen: list[dict[str, Any]],
    *,
    tokens: dict[str, dict[str, Any]] | None = None,
    stats: ReviewStats | None = None,
) -> int:
    """A TokenReview endpoint over HTTPS with client-certificate auth; it
    keeps connections alive (HTTP/1.1) like kube-apiserver does and counts
    every TLS connection and every review in ``stats``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(pki.broker_cert), str(pki.broker_key))
    ctx.load_verify_locations(cafile=str(pki.frontend_ca_cert))  # the broker's client cert
    ctx.verify_mode = ssl.CERT_REQUIRED  # like kube-apiserver with client-cert auth
    table = TOKENS if tokens is None else tokens
    counts = stats if stats is not None else ReviewStats()

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        conn = h11.Connection(h11.SERVER)
        counts.connections += 1
        try:
            while True:
                body = b""
                path = ""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = bytes(await stream.receive_some(65536))
                        conn.receive_data(data)
                    elif isinstance(event, h11.Request):
                        path = event.target.decode()
                    elif isinstance(event, h11.Data):
                        body += bytes(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                review = json.loads(body)
                counts.reviews += 1
                seen.append(
                    {"path": path, "review": review, "client": stream.getpeercert()["subject"]}
                )
                token = review["spec"]["token"]
                status = table.get(token, {"authenticated": False, "error": "invalid bearer token"})
                answer = json.dumps({**review, "status": status}).encode()
                out = conn.send(
                    h11.Response(
                        status_code=201,
                        headers=[
                            ("content-type", "application/json"),
                            ("content-length", str(len(answer))),
                        ],
                    )
                )
                out = (out or b"") + (conn.send(h11.Data(data=answer)) or b"")
                out += conn.send(h11.EndOfMessage()) or b""
                await stream.send_all(out)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return  # the client asked to close
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(
        functools.partial(trio.serve_ssl_over_tcp, handler, 0, ctx, host="127.0.0.1")
    )
    return int(listeners[0].transport_listener.socket.getsockname()[1])


def kubeconfig(tmp: Path, pki: PkiPaths, port: int) -> Path:
    path = tmp / "kubeconfig"
    path.write_text(
        f"""apiVersion: v1
kind: Config
current-context: tether
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:{port}
    certificate-authority: {pki.ca_cert}
users:
- name: broker
  user:
    client-certificate: {pki.frontend_cert}
    client-key: {pki.frontend_key}
contexts:
- name: tether
  context: {{cluster: local, user: broker}}
"""
    )
    return path


@pytest.mark.timeout(90)
async def test_tokenreview_accepts_the_allowed_service_account_only(
    tmp_path: Path,
    pki: PkiPaths,
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    seen: list[dict[str, Any]] = []
    port = await serve_tokenreview(nursery, pki, seen)
    broker = broker_factory(
        f"--kubeconfig={kubeconfig(tmp_path, pki, port)}",
        "--authentication-audience=tether",
        "--agent-namespace=kube-system",
        "--agent-service-account=tether-agent",
    )
    await broker.up()

    def token_agent(token: str, agent_id: str) -> Proc:
        path = tmp_path / f"{agent_id}.token"
        path.write_text(token + "\n")
        return agent_factory(
            broker, f"--service-account-token-path={path}", agent_id=agent_id, client_cert=False
        )

    good = token_agent("good-token", "node-1")
    await broker.ready(agents=1)

    async def echo(stream: trio.SocketStream) -> None:
        await stream.send_all(b"via tokenreview")

    listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    target = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    tunnel = await connect_tunnel(broker, target, via="uds")
    assert tunnel.status == 200
    assert await tunnel.read_all() == b"via tokenreview"

    cases = [
        ("other-sa", "node-2", "(403)", "token_scope"),
        ("wrong-audience", "node-3", "(401)", "audience"),
        ("garbage", "node-4", "(401)", "invalid bearer token"),
    ]
    procs = [(token_agent(tok, aid), status, text) for tok, aid, status, text in cases]
    for proc, status, text in procs:
        await wait_for(lambda p=proc: _logged(p, "broker rejected this agent"), 20, proc.name)
        assert status in proc.log() and text in proc.log(), proc.log()[-1000:]
        for secret in ("other-sa", "wrong-audience", "garbage"):
            assert f"Bearer {secret}" not in proc.log() + broker.proc.log()
    # The broker asked for our audience and authenticated with its client cert.
    assert seen and all(s["path"] == "/apis/authentication.k8s.io/v1/tokenreviews" for s in seen)
    assert all(s["review"]["spec"]["audiences"] == ["tether"] for s in seen)
    assert all(("commonName", "tether-frontend") in sum(s["client"], ()) for s in seen)
    assert "good-token" not in good.log() and "good-token" not in broker.proc.log()


async def _logged(proc: Proc, text: str) -> bool:
    return text in proc.log()
