"""Checking agent bearer tokens with a Kubernetes TokenReview.

This is how konnectivity authenticates agents that run in the cluster: the
agent presents its projected ServiceAccount token, and the broker asks the
cluster's apiserver (``POST /apis/authentication.k8s.io/v1/tokenreviews``)
whether it is valid for the expected audience and which ServiceAccount it
belongs to. The apiserver is reached with the credentials of a kubeconfig
(server URL, CA, client certificate or bearer token).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import ssl
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import h11
import trio
import yaml

log = logging.getLogger("tether.broker")

MAX_RESPONSE = 1024 * 1024


class TokenReviewError(Exception):
    """The review could not be performed (apiserver unreachable, bad answer)."""


@attrs.frozen
class ReviewResult:
    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    error: str = ""


@attrs.frozen
class ApiServer:
    host: str
    port: int
    ssl_context: ssl.SSLContext
    server_hostname: str
    bearer: str | None = None


def _data_or_file(entry: dict[str, Any], key: str, base: Path) -> bytes | None:
    if entry.get(f"{key}-data"):
        return base64.b64decode(entry[f"{key}-data"])
    if entry.get(key):
        path = Path(entry[key])
        return (path if path.is_absolute() else base / path).read_bytes()
    return None


def load_kubeconfig(path: str) -> ApiServer:
    """The current context's cluster and user from a kubeconfig file."""
    try:
        cfg = yaml.safe_load(Path(path).read_text())
        base = Path(path).parent
        ctx_name = cfg["current-context"]
        ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
    except (OSError, yaml.YAMLError, KeyError, StopIteration, TypeError) as exc:
        raise TokenReviewError(f"kubeconfig {path}: cannot read cluster/user: {exc!r}") from None
    url = urlsplit(cluster["server"])
    if url.scheme != "https" or not url.hostname:
        raise TokenReviewError(f"kubeconfig {path}: server must be an https URL")
    ctx_ssl = ssl.create_default_context()
    ca = _data_or_file(cluster, "certificate-authority", base)
    if ca:
        ctx_ssl = ssl.create_default_context(cadata=ca.decode())
    cert = _data_or_file(user, "client-certificate", base)
    key = _data_or_file(user, "client-key", base)
    if cert and key:
        # ssl wants files; keep them private and short-lived.
        with tempfile.TemporaryDirectory() as tmp:
            cert_path, key_path = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
            for p, data in ((cert_path, cert), (key_path, key)):
                fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            ctx_ssl.load_cert_chain(cert_path, key_path)
    return ApiServer(
        host=url.hostname,
        port=url.port or 443,
        ssl_context=ctx_ssl,
        server_hostname=url.hostname,
        bearer=user.get("token"),
    )


class TokenReviewer:
    def __init__(self, apiserver: ApiServer, audience: str, timeout: float = 5.0) -> None:
        self.apiserver = apiserver
        self.audience = audience
        self.timeout = timeout

    async def review(self, token: str) -> ReviewResult:
        body = json.dumps(
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {
                    "token": token,
                    **({"audiences": [self.audience]} if self.audience else {}),
                },
            }
        ).encode()
        status, data = await self._post("/apis/authentication.k8s.io/v1/tokenreviews", body)
        if status != 201 and status != 200:
            raise TokenReviewError(f"apiserver answered {status}: {data[:200]!r}")
        try:
            st = json.loads(data).get("status", {})
            user = st.get("user") or {}
            return ReviewResult(
                authenticated=bool(st.get("authenticated")),
                username=str(user.get("username", "")),
                audiences=tuple(str(a) for a in st.get("audiences") or ()),
                error=str(st.get("error", "")),
            )
        except (ValueError, AttributeError) as exc:
            raise TokenReviewError(f"unreadable TokenReview answer: {exc}") from None

    async def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        api = self.apiserver
        headers = [
            ("host", f"{api.host}:{api.port}"),
            ("content-type", "application/json"),
            ("accept", "application/json"),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        if api.bearer:
            headers.append(("authorization", f"Bearer {api.bearer}"))
        conn = h11.Connection(h11.CLIENT)
        try:
            with trio.fail_after(self.timeout):
                tcp = await trio.open_tcp_stream(api.host, api.port)
                stream = trio.SSLStream(tcp, api.ssl_context, server_hostname=api.server_hostname)
                async with stream:
                    out = conn.send(h11.Request(method="POST", target=path, headers=headers))
                    out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
                    out += conn.send(h11.EndOfMessage()) or b""
                    await stream.send_all(out)
                    status, data = 0, b""
                    while True:
                        event = conn.next_event()
                        if event is h11.NEED_DATA:
                            conn.receive_data(bytes(await stream.receive_some(65536)))
                        elif isinstance(event, h11.Response):
                            status = event.status_code
                        elif isinstance(event, h11.Data):
                            data += bytes(event.data)
                            if len(data) > MAX_RESPONSE:
                                raise TokenReviewError("TokenReview answer too large")
                        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                            return status, data
        except trio.TooSlowError:
            raise TokenReviewError(f"apiserver did not answer within {self.timeout:g}s") from None
        except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            raise TokenReviewError(f"apiserver unreachable: {exc!r}") from None
