"""A small client of the Kubernetes API for both commands: JSON over one
kept-alive HTTPS connection, with the credentials of a kubeconfig or, in a
pod, of its ServiceAccount.

Used for coordination.k8s.io Leases (the broker publishes one, agents count
them). Nothing here imports PyYAML until a kubeconfig is read, so the agent
pays for it only with ``--count-server-leases``.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import h11
import trio

from protocol import leases

MAX_RESPONSE = 4 * 1024 * 1024
SERVICEACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeApiError(Exception):
    """The request could not be made or was answered with an error; one line."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class ApiServer:
    host: str
    port: int
    ssl_context: ssl.SSLContext
    server_hostname: str
    #: A static token, or the path of one re-read on every request (projected tokens rotate).
    bearer: str | None = None
    bearer_file: str | None = None


def _data_or_file(entry: dict[str, Any], key: str, base: Path) -> bytes | None:
    if entry.get(f"{key}-data"):
        return base64.b64decode(entry[f"{key}-data"])
    if entry.get(key):
        path = Path(entry[key])
        return (path if path.is_absolute() else base / path).read_bytes()
    return None


def load_kubeconfig(path: str) -> ApiServer:
    """The current context's cluster and user from a kubeconfig file."""
    import yaml  # only here: the agent's import path stays light

    try:
        cfg = yaml.safe_load(Path(path).read_text())
        base = Path(path).parent
        ctx_name = cfg["current-context"]
        ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
        url = urlsplit(cluster["server"])
        ca = _data_or_file(cluster, "certificate-authority", base)
        cert = _data_or_file(user, "client-certificate", base)
        key = _data_or_file(user, "client-key", base)
    except (OSError, yaml.YAMLError, KeyError, StopIteration, TypeError, ValueError) as exc:
        raise KubeApiError(f"kubeconfig {path}: cannot read cluster/user: {exc!r}") from None
    if url.scheme != "https" or not url.hostname:
        raise KubeApiError(f"kubeconfig {path}: server must be an https URL")
    try:
        ctx_ssl = ssl.create_default_context(cadata=ca.decode() if ca else None)
        if cert and key:
            # ssl wants files; keep them private and short-lived.
            with tempfile.TemporaryDirectory() as tmp:
                cert_path, key_path = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
                for p, data in ((cert_path, cert), (key_path, key)):
                    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                ctx_ssl.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise KubeApiError(f"kubeconfig {path}: unusable certificate or key: {exc}") from None
    return ApiServer(
        host=url.hostname,
        port=url.port or 443,
        ssl_context=ctx_ssl,
        server_hostname=url.hostname,
        bearer=user.get("token"),
        bearer_file=user.get("tokenFile"),
    )


def in_cluster() -> ApiServer:
    """The pod's own apiserver and ServiceAccount token, as client-go finds them."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise KubeApiError("not in a pod (KUBERNETES_SERVICE_HOST unset); give --kubeconfig")
    try:
        ctx = ssl.create_default_context(cafile=str(SERVICEACCOUNT / "ca.crt"))
    except (OSError, ssl.SSLError) as exc:
        raise KubeApiError(f"in-cluster CA {SERVICEACCOUNT / 'ca.crt'}: {exc}") from None
    return ApiServer(
        host=host.strip("[]"),
        port=int(port),
        ssl_context=ctx,
        server_hostname=host.strip("[]"),
        bearer_file=str(SERVICEACCOUNT / "token"),
    )


def bearer_token(api: ApiServer) -> str | None:
    """The token to send: the static one, or the file's current content
    (a projected ServiceAccount token rotates under a running process)."""
    if api.bearer_file:
        try:
            return Path(api.bearer_file).read_text().strip() or None
        except OSError as exc:
            raise KubeApiError(f"cannot read token {api.bearer_file}: {exc}") from None
    return api.bearer


async def list_leases(
    client: KubeClient, namespace: str, labels: Mapping[str, str]
) -> list[leases.LeaseState]:
    """The Leases with ``labels`` in ``namespace`` (protocol/leases.py reads them)."""
    status, answer = await client.request("GET", leases.collection_path(namespace, labels))
    if status != 200:
        raise KubeApiError(f"listing leases: {status} {answer.get('message', '')}", status)
    items = answer.get("items")
    return leases.read_leases(items if isinstance(items, list) else [])


def load(kubeconfig: str) -> ApiServer:
    return load_kubeconfig(kubeconfig) if kubeconfig else in_cluster()


class KubeClient:
    """JSON requests over one HTTPS connection, opened on first use and again
    after it breaks; one request at a time (a lock keeps them in order)."""

    def __init__(self, api: ApiServer, timeout: float = 10.0) -> None:
        self.api = api
        self.timeout = timeout
        self._stream: trio.SSLStream[trio.SocketStream] | None = None
        self._conn: h11.Connection | None = None
        self._lock = trio.Lock()
        #: TLS connections opened so far.
        self.connections_opened = 0

    async def request(
        self, method: str, path: str, body: object | None = None
    ) -> tuple[int, dict[str, Any]]:
        """(status, decoded JSON object); raises KubeApiError when the
        apiserver cannot be reached or answers something that is not JSON."""
        data = json.dumps(body).encode() if body is not None else b""
        async with self._lock:
            for attempt in (1, 2):
                try:
                    with trio.fail_after(self.timeout):
                        status, raw = await self._exchange(method, path, data)
                    break
                except trio.TooSlowError:
                    await self.aclose()
                    raise KubeApiError(
                        f"apiserver did not answer {method} {path} within {self.timeout:g}s"
                    ) from None
                except (OSError, trio.BrokenResourceError, h11.ProtocolError, _Closed) as exc:
                    await self.aclose()
                    if attempt == 2:
                        raise KubeApiError(f"apiserver unreachable: {exc!r}") from None
        try:
            decoded = json.loads(raw) if raw else {}
        except ValueError:
            raise KubeApiError(f"{method} {path}: answer is not JSON ({status})", status) from None
        if not isinstance(decoded, dict):
            raise KubeApiError(f"{method} {path}: answer is not a JSON object", status)
        return status, decoded

    async def _connect(self) -> tuple[trio.SSLStream[trio.SocketStream], h11.Connection]:
        if self._stream is None or self._conn is None:
            tcp = await trio.open_tcp_stream(self.api.host, self.api.port)
            stream = trio.SSLStream(
                tcp, self.api.ssl_context, server_hostname=self.api.server_hostname
            )
            try:
                await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            self.connections_opened += 1
            self._stream, self._conn = stream, h11.Connection(h11.CLIENT)
        return self._stream, self._conn

    async def _exchange(self, method: str, path: str, data: bytes) -> tuple[int, bytes]:
        stream, conn = await self._connect()
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        api = self.api
        headers = [
            ("host", f"{api.host}:{api.port}"),
            ("accept", "application/json"),
            ("user-agent", "tether"),
        ]
        if data:
            headers += [("content-type", "application/json"), ("content-length", str(len(data)))]
        elif method in ("POST", "PUT", "PATCH"):
            headers.append(("content-length", "0"))
        token = bearer_token(self.api)
        if token:
            headers.append(("authorization", f"Bearer {token}"))
        out = conn.send(h11.Request(method=method, target=path, headers=headers)) or b""
        if data:
            out += conn.send(h11.Data(data=data)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out)
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                chunk = bytes(await stream.receive_some(65536))
                if not chunk and conn.their_state is not h11.SEND_BODY:
                    raise _Closed("connection closed before the answer")
                conn.receive_data(chunk)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
                if len(body) > MAX_RESPONSE:
                    raise KubeApiError(f"{method} {path}: answer over {MAX_RESPONSE} bytes")
            elif isinstance(event, h11.EndOfMessage):
                if conn.their_state is not h11.DONE or conn.our_state is not h11.DONE:
                    await self.aclose()
                return status, body
            elif isinstance(event, h11.ConnectionClosed):
                await self.aclose()
                return status, body

    async def aclose(self) -> None:
        stream, self._stream, self._conn = self._stream, None, None
        if stream is not None:
            await trio.aclose_forcefully(stream)


class _Closed(Exception):
    pass
