"""Running the real ``tether-broker`` and ``tether-agent`` commands locally,
and a small client for the CONNECT frontend.

``tether demo``, the end-to-end tests and the benchmarks all start processes
and open tunnels the same way, through this module.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import attrs
import trio

from tether.tools.certs import PkiPaths

BIN = Path(sys.executable).parent


#: Ports free_port handed out in this process: never handed out twice, so
#: processes started one after the other (each binding its ports only once
#: it runs) cannot be given the same one (a CI run failed on that, with
#: three brokers).
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    if len(_HANDED_OUT) > 10_000:  # a long session: the oldest are long bound or gone
        _HANDED_OUT.clear()
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class Proc:
    """A command under test; its output goes to a log file for assertions."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 12) -> str:
        """The last ``n`` lines of its output, indented for a report."""
        return "\n    ".join(self.log().splitlines()[-n:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def kill9(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(10)

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM, then SIGKILL; always reaps the process."""
        try:
            if self.alive():
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(10)
            return self.popen.returncode
        finally:
            self._log.close()

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


async def wait_for(
    predicate: Callable[[], Awaitable[object]], timeout: float, what: str, interval: float = 0.05
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await trio.sleep(interval)


async def http_get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """A bare HTTP/1.0 GET, enough for health and metrics endpoints."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def status_of(port: int, path: str) -> int:
    try:
        return (await http_get(port, path))[0]
    except (OSError, trio.TooSlowError, IndexError, ValueError):
        return 0


@attrs.define
class BrokerHandle:
    proc: Proc
    agent_port: int
    server_port: int
    health_port: int
    uds: str
    pki: PkiPaths
    #: /metrics lives here (``--admin-port``), not on the health port.
    admin_port: int = 0

    def crash_and_restart(self, log: Path) -> BrokerHandle:
        """SIGKILL the broker and start the same command on the same ports,
        logging to ``log``; the new handle."""
        self.proc.kill9()
        self.proc.stop()
        return attrs.evolve(self, proc=Proc("broker", self.proc.argv, log))

    async def ready(self, agents: int = 1, timeout: float = 20) -> None:
        async def check() -> bool:
            code, body = (
                (await http_get(self.health_port, "/readyz"))
                if await status_of(self.health_port, "/healthz") == 200
                else (0, b"")
            )
            self._check_alive()
            return code == 200 and int(body.split()[1]) >= agents

        await wait_for(check, timeout, f"broker ready with {agents} agent(s)")

    def _check_alive(self) -> None:
        """Fail at once, with the reason, if the broker died (a port taken
        between choosing and binding it, a bad flag) instead of timing out."""
        if not self.proc.alive():
            raise RuntimeError(
                f"broker exited with {self.proc.popen.returncode}: {self.proc.log()[-2000:]}"
            )

    async def up(self, timeout: float = 20) -> None:
        """Listening (healthz answers), whether or not agents are connected."""

        async def check() -> bool:
            self._check_alive()
            return await status_of(self.health_port, "/healthz") == 200

        await wait_for(check, timeout, "broker /healthz")

    async def metrics(self) -> str:
        code, body = await http_get(self.admin_port, "/metrics")
        assert code == 200
        return body.decode()


def frontend_ca(pki: PkiPaths) -> Path:
    """The CA of the frontend's client certificate: ``frontend-ca.crt``, or
    ``ca.crt`` for a PKI made before the frontend CA existed."""
    return pki.frontend_ca_cert if pki.frontend_ca_cert.exists() else pki.ca_cert


def start_broker(
    tmp: Path,
    pki: PkiPaths,
    *extra: str,
    mode: str = "http-connect",
    tcp: bool = True,
    prefix: Sequence[str] = (),
) -> BrokerHandle:
    """Start a broker on free loopback ports. ``prefix`` wraps the command
    (``ip netns exec NS`` runs it in a network namespace); later ``extra``
    flags override earlier ones, bind addresses included."""
    agent_port, server_port, health_port = free_port(), free_port(), free_port()
    admin_port = free_port()
    uds = str(tmp / f"broker-{agent_port}.sock")
    argv = [
        str(BIN / "tether-broker"),
        f"--mode={mode}",
        f"--uds-name={uds}",
        "--agent-bind-address=127.0.0.1",
        f"--agent-port={agent_port}",
        "--server-bind-address=127.0.0.1",
        f"--server-port={server_port if tcp else 0}",
        "--health-bind-address=127.0.0.1",
        f"--health-port={health_port}",
        f"--admin-port={admin_port}",
        f"--cluster-cert={pki.broker_cert}",
        f"--cluster-key={pki.broker_key}",
        f"--cluster-ca-cert={pki.ca_cert}",
        f"--server-cert={pki.broker_cert}",
        f"--server-key={pki.broker_key}",
        f"--server-ca-cert={frontend_ca(pki)}",
        "--log-level=debug",
        *extra,
    ]
    proc = Proc("broker", [*prefix, *argv], tmp / f"broker-{agent_port}.log")
    return BrokerHandle(proc, agent_port, server_port, health_port, uds, pki, admin_port)


def start_agent(
    tmp: Path,
    broker: BrokerHandle,
    *extra: str,
    agent_id: str = "agent-1",
    port: int | None = None,
    pki: PkiPaths | None = None,
    client_cert: bool = True,
    prefix: Sequence[str] = (),
) -> Proc:
    """Start an agent for ``broker``; its certificate comes from ``pki``
    (default: the broker's), or none at all with ``client_cert=False``."""
    creds: list[str] = []
    if client_cert:
        cert, key = (pki or broker.pki).agent(agent_id)
        creds = [f"--agent-cert={cert}", f"--agent-key={key}"]
    argv = [
        str(BIN / "tether-agent"),
        "--proxy-server-host=127.0.0.1",
        f"--proxy-server-port={port or broker.agent_port}",
        f"--ca-cert={broker.pki.ca_cert}",
        *creds,
        f"--agent-id={agent_id}",
        "--health-server-port=0",
        "--admin-server-port=0",
        "--sync-interval=0.2",
        "--sync-interval-cap=2",
        "--log-level=debug",
        *extra,
    ]
    return Proc(
        f"agent {agent_id}", [*prefix, *argv], tmp / f"agent-{agent_id}-{time.monotonic_ns()}.log"
    )


# ---------------------------------------------------------------- CONNECT client


class Tunnel:
    """A CONNECT client connection after the proxy's response header."""

    def __init__(self, stream: trio.abc.Stream, status: int, body: bytes, leftover: bytes) -> None:
        self.stream = stream
        self.status = status
        self.body = body
        self._leftover = leftover

    async def receive_some(self, n: int = 65536) -> bytes:
        if self._leftover:
            data, self._leftover = self._leftover[:n], self._leftover[n:]
            return data
        return bytes(await self.stream.receive_some(n))

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_eof(self) -> None:
        assert isinstance(self.stream, trio.abc.HalfCloseableStream)
        await self.stream.send_eof()

    async def read_all(self, limit: int = 1 << 31) -> bytes:
        out = bytearray()
        while len(out) < limit:
            chunk = await self.receive_some()
            if not chunk:
                break
            out += chunk
        return bytes(out)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def frontend_ssl(pki: PkiPaths) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(pki.frontend_cert), str(pki.frontend_key))
    return ctx


async def connect_tunnel(
    broker: BrokerHandle, target: str, *, via: str = "tcp", request: bytes | None = None
) -> Tunnel:
    """Open a CONNECT tunnel through the TCP mTLS or the UDS frontend."""
    stream: trio.abc.Stream
    if via == "uds":
        stream = await trio.open_unix_socket(broker.uds)
    else:
        tcp = await trio.open_tcp_stream("127.0.0.1", broker.server_port)
        stream = trio.SSLStream(
            tcp, frontend_ssl(broker.pki), server_hostname="localhost", https_compatible=True
        )
    await stream.send_all(
        request or f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
    )
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head else 0
    body = b""
    if status != 200:
        body = rest
        while chunk := await _safe_receive(stream):
            body += chunk
        rest = b""
    return Tunnel(stream, status, body, rest)


async def _safe_receive(stream: trio.abc.Stream) -> bytes:
    try:
        return bytes(await stream.receive_some(65536))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return b""
