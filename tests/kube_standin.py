"""A stand-in for kube-apiserver's coordination.k8s.io/v1 Lease endpoints.

kube-apiserver cannot run here, so this small HTTPS server plays the parts
of it that the brokers and agents use: list (with an equality label
selector), get, create (409 if it exists), update (409 on a stale
resourceVersion) and delete of Leases, with bearer-token authentication and
kept-alive connections, as the real one has. It counts connections and
requests so tests can check what the clients did.
"""

from __future__ import annotations

import functools
import json
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import h11
import trio

from tether.tools.certs import PkiPaths

PREFIX = "/apis/coordination.k8s.io/v1/namespaces/"


@attrs.define
class LeaseStore:
    token: str
    #: (namespace, name) -> Lease object
    leases: dict[tuple[str, str], dict[str, Any]] = attrs.Factory(dict)
    connections: int = 0
    requests: list[tuple[str, str]] = attrs.Factory(list)
    version: int = 0

    def put(self, lease: dict[str, Any]) -> None:
        """Add or replace a Lease directly (another replica, or an expired one)."""
        self.version += 1
        meta = lease["metadata"]
        meta["resourceVersion"] = str(self.version)
        self.leases[(meta["namespace"], meta["name"])] = lease

    def handle(self, method: str, target: str, body: bytes, auth: str) -> tuple[int, Any]:
        self.requests.append((method, target))
        if auth != f"Bearer {self.token}":
            return 401, {"kind": "Status", "code": 401, "message": "Unauthorized"}
        url = urlsplit(target)
        if not url.path.startswith(PREFIX):
            return 404, {"kind": "Status", "code": 404, "message": "not found"}
        parts = url.path[len(PREFIX) :].split("/")
        namespace = unquote(parts[0])
        if len(parts) < 2 or parts[1] != "leases" or len(parts) > 3:
            return 404, {"kind": "Status", "code": 404, "message": "not found"}
        name = unquote(parts[2]) if len(parts) == 3 else None
        if name is None and method == "GET":
            wanted = {}
            for sel in parse_qs(url.query).get("labelSelector", []):
                for term in sel.split(","):
                    k, _, v = term.partition("=")
                    wanted[k] = v
            items = [
                lease
                for (ns, _), lease in sorted(self.leases.items())
                if ns == namespace
                and all(lease["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
            ]
            return 200, {
                "kind": "LeaseList",
                "apiVersion": "coordination.k8s.io/v1",
                "items": items,
            }
        if name is None and method == "POST":
            lease = json.loads(body)
            key = (namespace, lease["metadata"]["name"])
            if key in self.leases:
                return 409, {"kind": "Status", "code": 409, "message": "already exists"}
            self.put(lease)
            return 201, lease
        if name is None:
            return 405, {"kind": "Status", "code": 405, "message": "method not allowed"}
        key = (namespace, name)
        if method == "GET":
            if key not in self.leases:
                return 404, {"kind": "Status", "code": 404, "message": f"leases {name} not found"}
            return 200, self.leases[key]
        if method == "PUT":
            lease = json.loads(body)
            have = self.leases.get(key)
            if have is None:
                return 404, {"kind": "Status", "code": 404, "message": "not found"}
            if lease["metadata"].get("resourceVersion") != have["metadata"]["resourceVersion"]:
                return 409, {"kind": "Status", "code": 409, "message": "conflict"}
            self.put(lease)
            return 200, lease
        if method == "DELETE":
            if self.leases.pop(key, None) is None:
                return 404, {"kind": "Status", "code": 404, "message": "not found"}
            return 200, {"kind": "Status", "status": "Success"}
        return 405, {"kind": "Status", "code": 405, "message": "method not allowed"}


async def serve_leases(nursery: trio.Nursery, pki: PkiPaths, store: LeaseStore) -> int:
    """Serve ``store`` over HTTPS on 127.0.0.1; returns the port."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pki.broker_cert), str(pki.broker_key))

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        store.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                body = b""
                request: h11.Request | None = None
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = bytes(await stream.receive_some(65536))
                        if not data:
                            return
                        conn.receive_data(data)
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += bytes(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                assert request is not None
                headers = {k.decode().lower(): v.decode() for k, v in request.headers}
                status, answer = store.handle(
                    request.method.decode(),
                    request.target.decode(),
                    body,
                    headers.get("authorization", ""),
                )
                payload = json.dumps(answer).encode()
                out = conn.send(
                    h11.Response(
                        status_code=status,
                        headers=[
                            ("content-type", "application/json"),
                            ("content-length", str(len(payload))),
                        ],
                    )
                )
                out = (out or b"") + (conn.send(h11.Data(data=payload)) or b"")
                out += conn.send(h11.EndOfMessage()) or b""
                await stream.send_all(out)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(
        functools.partial(trio.serve_ssl_over_tcp, handler, 0, ctx, host="127.0.0.1")
    )
    return int(listeners[0].transport_listener.socket.getsockname()[1])


def kubeconfig(path: Path, pki: PkiPaths, port: int, token: str) -> Path:
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
- name: lease-user
  user:
    token: {token}
contexts:
- name: tether
  context: {{cluster: local, user: lease-user}}
"""
    )
    return path
