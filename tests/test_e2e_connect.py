"""End to end through the real commands: curl and a Python client through the
CONNECT frontends, to targets next to the agent."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
import trio
from procs import BrokerHandle, Proc, connect_tunnel, serve_echo, serve_local

pytestmark = [pytest.mark.e2e]


async def curl_tcp_frontend(
    broker: BrokerHandle, url: str, *extra: str
) -> subprocess.CompletedProcess[bytes]:
    """GET ``url`` with real curl through the broker's TCP mTLS CONNECT
    frontend (``extra``: more curl arguments); the finished process."""
    curl = shutil.which("curl")
    assert curl, "curl is installed by `make sysdeps`"
    pki = broker.pki
    return await trio.run_process(
        [
            curl,
            "-sS",
            "--max-time",
            "20",
            "-p",
            "--proxy",
            f"https://localhost:{broker.server_port}",
            "--proxy-cacert",
            str(pki.ca_cert),
            "--proxy-cert",
            str(pki.frontend_cert),
            "--proxy-key",
            str(pki.frontend_key),
            *extra,
            url,
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


@pytest.mark.timeout(60)
async def test_curl_through_tcp_mtls_frontend(
    tunnel_env: tuple[BrokerHandle, Proc], nursery: trio.Nursery
) -> None:
    broker, _agent = tunnel_env
    body = os.urandom(200_000)

    async def http_handler(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(4096)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )
        await stream.aclose()

    port = await serve_local(nursery, http_handler)
    result = await curl_tcp_frontend(
        broker, f"http://127.0.0.1:{port}/", "-o", "-", "-w", "\n%{http_connect} %{http_code}"
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr
    payload, _, codes = out.rpartition(b"\n")
    assert codes.split() == [b"200", b"200"]
    assert payload == body


@pytest.mark.timeout(60)
@pytest.mark.parametrize("via", ["uds", "tcp"])
async def test_echo_through_each_frontend(
    tunnel_env: tuple[BrokerHandle, Proc], nursery: trio.Nursery, via: str
) -> None:
    broker, _ = tunnel_env
    port = await serve_echo(nursery)
    tunnel = await connect_tunnel(broker, f"127.0.0.1:{port}", via=via)
    assert tunnel.status == 200
    for size in (1, 64, 70_000):
        msg = os.urandom(size)
        await tunnel.send_all(msg)
        got = b""
        while len(got) < size:
            got += await tunnel.receive_some()
        assert got == msg
    await tunnel.aclose()


@contextlib.contextmanager
def blackhole_listener() -> Iterator[int]:
    """A loopback port whose accept queue is full, so new connects hang
    (the kernel drops their SYNs) until the dialer gives up."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                f.connect(("127.0.0.1", port))
            fillers.append(f)
        time.sleep(0.2)
        yield port
    finally:
        for f in fillers:
            f.close()
        full.close()


async def serve_sink_source(nursery: trio.Nursery) -> int:
    """A target for bulk checks. ``U`` + 8-byte length: read that many bytes and
    answer their sha256 (hex). ``D`` + 8-byte length: send that many random
    bytes followed by their sha256 (hex)."""

    async def read_exact(stream: trio.SocketStream, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = await stream.receive_some(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    async def handler(stream: trio.SocketStream) -> None:
        try:
            header = await read_exact(stream, 9)
            kind, size = header[:1], int.from_bytes(header[1:], "big")
            digest = hashlib.sha256()
            if kind == b"D":
                block = os.urandom(1 << 20)
                sent = 0
                while sent < size:
                    chunk = block[: size - sent]
                    digest.update(chunk)
                    await stream.send_all(chunk)
                    sent += len(chunk)
            else:
                got = 0
                while got < size:
                    chunk = await stream.receive_some(min(1 << 20, size - got))
                    if not chunk:
                        break
                    digest.update(chunk)
                    got += len(chunk)
            await stream.send_all(digest.hexdigest().encode())
            await stream.send_eof()
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    return await serve_local(nursery, handler)


async def upload(broker: BrokerHandle, port: int, size: int, via: str = "uds") -> None:
    tunnel = await connect_tunnel(broker, f"127.0.0.1:{port}", via=via)
    assert tunnel.status == 200
    await tunnel.send_all(b"U" + size.to_bytes(8, "big"))
    digest = hashlib.sha256()
    block = os.urandom(1 << 20)
    sent = 0
    while sent < size:
        chunk = block[: size - sent]
        digest.update(chunk)
        await tunnel.send_all(chunk)
        sent += len(chunk)
    assert await tunnel.read_all() == digest.hexdigest().encode()
    await tunnel.aclose()


async def download(broker: BrokerHandle, port: int, size: int, via: str = "uds") -> None:
    tunnel = await connect_tunnel(broker, f"127.0.0.1:{port}", via=via)
    assert tunnel.status == 200
    await tunnel.send_all(b"D" + size.to_bytes(8, "big"))
    digest = hashlib.sha256()
    got = 0
    rest = b""
    while got < size:
        chunk = await tunnel.receive_some(min(1 << 20, size - got))
        assert chunk, f"tunnel ended after {got} of {size} bytes"
        digest.update(chunk)
        got += len(chunk)
    rest = await tunnel.read_all()
    assert rest == digest.hexdigest().encode()
    await tunnel.aclose()


@pytest.mark.timeout(120)
async def test_100mb_each_way_sha256(
    tunnel_env: tuple[BrokerHandle, Proc], nursery: trio.Nursery
) -> None:
    broker, _ = tunnel_env
    port = await serve_sink_source(nursery)
    await upload(broker, port, 100 * 1024 * 1024)
    await download(broker, port, 100 * 1024 * 1024)


@pytest.mark.timeout(120)
async def test_200_concurrent_tunnels(
    tunnel_env: tuple[BrokerHandle, Proc], nursery: trio.Nursery
) -> None:
    broker, _ = tunnel_env
    port = await serve_echo(nursery)
    done = 0
    all_open = trio.Event()

    async def one(i: int) -> None:
        nonlocal done
        tunnel = await connect_tunnel(broker, f"127.0.0.1:{port}", via="uds" if i % 2 else "tcp")
        assert tunnel.status == 200
        msg = os.urandom(1000 + i)
        await tunnel.send_all(msg)
        got = b""
        while len(got) < len(msg):
            got += await tunnel.receive_some()
        assert got == msg
        # Hold every tunnel open until all 200 exist at once.
        done += 1
        if done == 200:
            all_open.set()
        await all_open.wait()
        await tunnel.aclose()

    async with trio.open_nursery() as inner:
        for i in range(200):
            inner.start_soon(one, i)
    assert done == 200
    metrics = await broker.metrics()
    assert 'tether_frontend_requests_total{frontend="uds",status="200"} 100.0' in metrics


@pytest.mark.timeout(60)
async def test_half_close_client_still_reads_reply(
    tunnel_env: tuple[BrokerHandle, Proc], nursery: trio.Nursery
) -> None:
    """The client shuts down writing; the target sees EOF, then replies."""
    broker, _ = tunnel_env

    async def handler(stream: trio.SocketStream) -> None:
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
        # Only after EOF: answer with the reversed request and a big tail.
        await stream.send_all(received[::-1] + b"x" * 500_000)
        await stream.aclose()

    port = await serve_local(nursery, handler)
    tunnel = await connect_tunnel(broker, f"127.0.0.1:{port}", via="uds")
    await tunnel.send_all(b"hello, half-closed world")
    await tunnel.send_eof()
    reply = await tunnel.read_all()
    assert reply == b"hello, half-closed world"[::-1] + b"x" * 500_000


@pytest.mark.timeout(60)
async def test_error_statuses_for_real(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
) -> None:
    broker = broker_factory("--backend-dial-timeout=1")
    await broker.up()
    # 503: no agent connected yet.
    tunnel = await connect_tunnel(broker, "127.0.0.1:9", via="uds")
    assert tunnel.status == 503
    assert b"no agent available" in tunnel.body
    agent_factory(broker)
    await broker.ready(agents=1)
    # 502: nothing listens on the port (bind one and close it to be sure).
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    tunnel = await connect_tunnel(broker, f"127.0.0.1:{closed_port}", via="uds")
    assert tunnel.status == 502
    assert b"refused" in tunnel.body
    # 504: a listener whose accept queue is full never completes the connect.
    with blackhole_listener() as port:
        tunnel = await connect_tunnel(broker, f"127.0.0.1:{port}", via="uds")
    assert tunnel.status == 504, tunnel.body
    assert b"timed out" in tunnel.body
    metrics = await broker.metrics()
    assert (
        'konnectivity_network_proxy_server_dial_failure_count_total{reason="no_agent"}' in metrics
    )
    assert 'dial_failure_count_total{reason="refused"}' in metrics
