"""The contenders and the processes behind them, on one (emulated) link.

Placement, the same for every contender::

    cloud namespace                          edge namespace
    ---------------                          --------------
    client (this process, sockets            targets (echo, source) on 0.0.0.0
      created in the cloud namespace)        tether-agent x2  --TLS/h2-->  brokers
    tether-broker (CONNECT, UDS)             autossh -> ssh -R (SOCKS)  -->  sshd
    tether-broker (gRPC, UDS)
    sshd on a private port

- **direct**: a TCP connection from the cloud namespace to the target's link
  address; the limit, since nothing is in between.
- **ssh**: ``ssh -R 127.0.0.1:PORT`` (dynamic reverse forwarding: the SOCKS
  server is the ssh client on the edge) to our own sshd; the client speaks
  SOCKS5 to 127.0.0.1:PORT in the cloud namespace. ssh runs under autossh so
  that it comes back after an outage, as the agent does.
- **tether-connect** / **tether-grpc**: the broker's CONNECT and gRPC
  frontends over their Unix sockets (the kube-apiserver egress modes), each
  broker with its own agent.

Every tunnel dials the target on the edge's 127.0.0.1, as an agent next to a
kubelet would. With the ``loopback`` profile everything runs in the current
namespace on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from benchmarks.linksim import LinkSim, Side
from benchmarks.measure import Conn
from tether.tools.certs import PkiPaths, init_pki
from tether.tools.launch import BIN, Proc, free_port

REPO = Path(__file__).resolve().parent.parent
SSHD = "/usr/sbin/sshd"

CONTENDERS = ("direct", "ssh", "tether-connect", "tether-grpc")
LABELS = {
    "direct": "direct TCP",
    "ssh": "ssh -R (SOCKS)",
    "tether-connect": "Tether CONNECT",
    "tether-grpc": "Tether gRPC",
    "tether-connect-optimistic": "Tether CONNECT, optimistic",
}

#: Log level of the tunnels' brokers and agents (``TETHER_BENCH_LOG_LEVEL``,
#: e.g. debug to follow a reconnect; default info).
LOG_LEVEL = os.environ.get("TETHER_BENCH_LOG_LEVEL", "info")


class SetupError(RuntimeError):
    """A contender's processes did not come up (the log tail says why)."""


# ------------------------------------------------------------------ connections


class SocketConn:
    """A connected stream socket plus bytes that arrived with a handshake."""

    def __init__(self, sock: socket.socket, leftover: bytes = b"") -> None:
        self.sock = sock
        self._leftover = leftover

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        if self._leftover:
            data, self._leftover = self._leftover[:n], self._leftover[n:]
            return data
        return self.sock.recv(n)

    def close(self) -> None:
        self.sock.close()


def _read_until(sock: socket.socket, marker: bytes, limit: int = 65536) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed during handshake after {data[:200]!r}")
        data += chunk
        if len(data) > limit:
            raise ConnectionError("handshake response too long")
    return data


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed during handshake")
        data += chunk
    return data


def socks5_connect(sock: socket.socket, host: str, port: int) -> None:
    """SOCKS5 (RFC 1928), no authentication, IPv4 CONNECT. Waits for the
    method reply before sending the request, as common clients do."""
    sock.sendall(b"\x05\x01\x00")
    if _read_exact(sock, 2) != b"\x05\x00":
        raise ConnectionError("SOCKS5 server refused no-auth")
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big"))
    head = _read_exact(sock, 4)
    if head[1] != 0:
        raise ConnectionError(f"SOCKS5 CONNECT failed with reply {head[1]}")
    if head[3] == 3:  # domain name: length byte, name, port
        _read_exact(sock, _read_exact(sock, 1)[0] + 2)
    else:  # IPv4 or IPv6 address and port
        _read_exact(sock, 18 if head[3] == 4 else 6)


def http_connect(sock: socket.socket, target: str) -> bytes:
    """Send CONNECT and read the response header; returns early tunnel bytes."""
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    data = _read_until(sock, b"\r\n\r\n")
    head, _, rest = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if b" " in head else b"?"
    if status != b"200":
        raise ConnectionError(f"CONNECT answered {head[:120]!r}")
    return rest


class GrpcConn:
    """One konnectivity ``Proxy`` call over its own h2 connection (as
    kube-apiserver's single-use tunnels), driven by grpcio.

    Requests come from a queue; responses are pulled only when :meth:`recv`
    is called, so a reader that stops reading stalls its call's h2 windows
    and nothing else (what S6 needs).
    """

    _END = object()

    def __init__(self, uds: str, target: str, timeout: float) -> None:
        import grpc

        from protocol import konnectivity_pb2 as pb

        self._pb = pb
        self._requests: queue.Queue[Any] = queue.Queue()
        self._channel = grpc.insecure_channel(
            f"unix:{uds}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self._buf = b""
        self._done = False
        try:
            stub = _grpc_stub()(self._channel)
            rnd = random.getrandbits(62)
            self._requests.put(
                pb.Packet(
                    type=pb.DIAL_REQ,
                    dialRequest=pb.DialRequest(protocol="tcp", address=target, random=rnd),
                )
            )
            # The call's deadline plays the part of a socket timeout.
            self._call = stub.Proxy(self._iter(), timeout=timeout)
            first = self._next(timeout)
            if first is None or first.type != pb.DIAL_RSP or first.dialResponse.error:
                raise ConnectionError(f"gRPC dial failed: {first}")
            self.connect_id = first.dialResponse.connectID
        except BaseException:
            self.close()
            raise

    def _iter(self) -> Iterator[Any]:
        while (item := self._requests.get()) is not self._END:
            yield item

    def _next(self, timeout: float | None = None) -> Any:
        import grpc

        result: list[Any] = []

        def pull() -> None:
            try:
                result.append(next(self._call))
            except (StopIteration, grpc.RpcError):
                result.append(None)

        if timeout is None:
            pull()
            return result[0]
        t = threading.Thread(target=pull, daemon=True)
        t.start()
        t.join(timeout)
        if not result:
            self._call.cancel()
            t.join(5)
            raise TimeoutError("gRPC dial timed out")
        return result[0]

    def sendall(self, data: bytes) -> None:
        pb = self._pb
        for i in range(0, len(data), 1 << 20):
            self._requests.put(
                pb.Packet(
                    type=pb.DATA,
                    data=pb.Data(connectID=self.connect_id, data=data[i : i + (1 << 20)]),
                )
            )

    def recv(self, n: int) -> bytes:
        while not self._buf and not self._done:
            pkt = self._next()
            if pkt is None or pkt.type == self._pb.CLOSE_RSP:
                self._done = True
            elif pkt.type == self._pb.DATA:
                self._buf = pkt.data.data
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def close(self) -> None:
        pb = self._pb
        with contextlib.suppress(Exception):
            if hasattr(self, "connect_id"):
                self._requests.put(
                    pb.Packet(
                        type=pb.CLOSE_REQ, closeRequest=pb.CloseRequest(connectID=self.connect_id)
                    )
                )
            self._requests.put(self._END)
        with contextlib.suppress(Exception):
            self._call.cancel()
        self._channel.close()


def _grpc_stub() -> Any:
    """The konnectivity ProxyService stub, generated by the test suite's
    helper (one generator for tests and benchmarks)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.grpc_stubs import proxy_service_stub

    return proxy_service_stub()


# ------------------------------------------------------------------ processes


@attrs.define
class Broker:
    proc: Proc
    agent: Proc
    uds: str
    agent_port: int
    health_port: int


@attrs.define
class Ssh:
    sshd: Proc
    client: Proc  # autossh, with ssh as its child
    sshd_port: int
    socks_port: int
    version: str


@attrs.define
class Stacks:
    """Everything that runs on one link, and how to reach the target through
    each contender."""

    link: LinkSim
    workdir: Path
    pki: PkiPaths
    targets: Proc
    echo_port: int
    source_port: int
    brokers: dict[str, Broker] = attrs.Factory(dict)
    ssh: Ssh | None = None
    procs: list[Proc] = attrs.Factory(list)

    # -- opening connections --------------------------------------------------

    @property
    def contenders(self) -> list[str]:
        names = ["direct"]
        if self.ssh is not None:
            names.append("ssh")
        names += [n for n in ("tether-connect", "tether-grpc") if n in self.brokers]
        return names

    def sock(self, side: Side = "cloud") -> socket.socket:
        return self.link.socket(side)

    def opener(self, name: str) -> Any:
        """``open(port, timeout) -> Conn`` for contender ``name``."""

        def direct(port: int, timeout: float) -> Conn:
            s = self.sock()
            try:
                s.settimeout(timeout)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.connect((self.link.edge_addr, port))
                return SocketConn(s)
            except BaseException:
                s.close()
                raise

        def ssh(port: int, timeout: float) -> Conn:
            assert self.ssh is not None
            s = self.sock()
            try:
                s.settimeout(timeout)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.connect(("127.0.0.1", self.ssh.socks_port))
                socks5_connect(s, "127.0.0.1", port)
                return SocketConn(s)
            except BaseException:
                s.close()
                raise

        def connect(which: str) -> Any:
            def open_(port: int, timeout: float) -> Conn:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.settimeout(timeout)
                    s.connect(self.brokers[which].uds)
                    rest = http_connect(s, f"127.0.0.1:{port}")
                    return SocketConn(s, rest)
                except BaseException:
                    s.close()
                    raise

            return open_

        def grpc_(port: int, timeout: float) -> Conn:
            return GrpcConn(self.brokers["tether-grpc"].uds, f"127.0.0.1:{port}", timeout)

        if name == "direct":
            return direct
        if name == "ssh":
            return ssh
        if name == "tether-grpc":
            return grpc_
        return connect(name)

    # -- process ids for accounting -------------------------------------------

    def edge_pid(self, name: str) -> int | None:
        """The edge-side tunnel process: the agent, or the ssh client."""
        if name in self.brokers:
            return self.brokers[name].agent.pid
        if name == "ssh" and self.ssh is not None:
            kids = [p for p in _children(self.ssh.client.pid)]
            return kids[0] if kids else None
        return None

    def cloud_pids(self, name: str) -> list[int]:
        """The cloud-side tunnel process(es): the broker, or sshd and its sessions."""
        if name in self.brokers:
            return [self.brokers[name].proc.pid]
        if name == "ssh" and self.ssh is not None:
            return [self.ssh.sshd.pid]
        return []

    def tunnel_port(self, name: str) -> int | None:
        """The cloud-side port of the contender's link connection."""
        if name in self.brokers:
            return self.brokers[name].agent_port
        if name == "ssh" and self.ssh is not None:
            return self.ssh.sshd_port
        return None

    def stop(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                p.stop(timeout=5)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _proc(link: LinkSim, side: Side, name: str, argv: Sequence[str], log: Path, **kw: Any) -> Proc:
    return Proc(name, [*link.exec_prefix(side), *argv], log, **kw)


def optimistic_flag() -> str | None:
    """The broker's optimistic-CONNECT flag, if this build has one."""
    try:
        text = subprocess.run(
            [str(BIN / "tether-broker"), "--help"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"(--[\w-]*optimistic[\w-]*)", text)
    return m.group(1) if m else None


def _wait(predicate: Any, timeout: float, what: str, procs: Sequence[Proc] = ()) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except OSError:
            pass
        for p in procs:
            if not p.alive():
                raise SetupError(f"{p.name} exited ({p.popen.returncode}): {p.log()[-1500:]}")
        if time.monotonic() > deadline:
            tails = "; ".join(f"{p.name}: {p.log()[-600:]}" for p in procs)
            raise SetupError(f"timed out after {timeout:g}s waiting for {what}. {tails}")
        time.sleep(0.1)


def _http_get_in(stacks: Stacks, port: int, path: str) -> tuple[int, bytes]:
    s = stacks.sock()
    with s:
        s.settimeout(3)
        s.connect(("127.0.0.1", port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _start_broker(
    stacks: Stacks, name: str, mode: str, agent_id: str, extra: Sequence[str] = ()
) -> Broker:
    link, wd, pki = stacks.link, stacks.workdir, stacks.pki
    agent_port, health_port = free_port(), free_port()
    uds = str(wd / f"{name.rsplit('-', 1)[-1][:4]}.sock")  # short: AF_UNIX paths are <108 bytes
    broker = _proc(
        link,
        "cloud",
        f"broker {name}",
        [
            str(BIN / "tether-broker"),
            f"--mode={mode}",
            f"--uds-name={uds}",
            f"--agent-bind-address={link.cloud_addr}",
            f"--agent-port={agent_port}",
            "--server-port=0",
            "--health-bind-address=127.0.0.1",
            f"--health-port={health_port}",
            "--admin-port=0",
            f"--cluster-cert={pki.broker_cert}",
            f"--cluster-key={pki.broker_key}",
            f"--cluster-ca-cert={pki.ca_cert}",
            f"--log-level={LOG_LEVEL}",
            "--config-file=",
            *extra,
        ],
        wd / f"broker-{name}.log",
    )
    stacks.procs.append(broker)
    cert, key = pki.agent(agent_id)
    agent = _proc(
        link,
        "edge",
        f"agent {name}",
        [
            str(BIN / "tether-agent"),
            f"--proxy-server-host={link.cloud_addr}",
            f"--proxy-server-port={agent_port}",
            f"--ca-cert={pki.ca_cert}",
            f"--agent-cert={cert}",
            f"--agent-key={key}",
            f"--agent-id={agent_id}",
            "--health-server-port=0",
            f"--log-level={LOG_LEVEL}",
            "--config-file=",
        ],
        wd / f"agent-{name}.log",
    )
    stacks.procs.append(agent)
    return Broker(broker, agent, uds, agent_port, health_port)


def _broker_ready(stacks: Stacks, b: Broker) -> bool:
    code, body = _http_get_in(stacks, b.health_port, "/readyz")
    return code == 200 and int(body.split()[1]) >= 1


def _start_ssh(stacks: Stacks) -> Ssh:
    link, wd = stacks.link, stacks.workdir / "ssh"
    wd.mkdir(mode=0o700)
    for key in ("host_ed25519", "id_ed25519"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(wd / key)],
            check=True,
            stdin=subprocess.DEVNULL,
        )
    shutil.copy(wd / "id_ed25519.pub", wd / "authorized_keys")
    sshd_port, socks_port = free_port(), free_port()
    # The same liveness budget as the tunnel's keepalive (15 s + 15 s).
    (wd / "sshd_config").write_text(
        "\n".join(
            [
                f"Port {sshd_port}",
                f"ListenAddress {link.cloud_addr}",
                f"HostKey {wd / 'host_ed25519'}",
                f"PidFile {wd / 'sshd.pid'}",
                f"AuthorizedKeysFile {wd / 'authorized_keys'}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "AllowTcpForwarding yes",
                "GatewayPorts no",
                "PermitTTY no",
                "X11Forwarding no",
                "PrintMotd no",
                "ClientAliveInterval 15",
                "ClientAliveCountMax 1",
                "MaxStartups 100:30:200",
                "LogLevel INFO",
                "",
            ]
        )
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
    sshd = _proc(
        link,
        "cloud",
        "sshd",
        [SSHD, "-D", "-e", "-f", str(wd / "sshd_config")],
        stacks.workdir / "sshd.log",
    )
    stacks.procs.append(sshd)
    ssh_argv = [
        "-N",
        "-F",
        "/dev/null",
        "-i",
        str(wd / "id_ed25519"),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "ServerAliveInterval=15",
        "-o",
        "ServerAliveCountMax=1",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "LogLevel=INFO",
        "-R",
        f"127.0.0.1:{socks_port}",
        "-p",
        str(sshd_port),
        f"root@{link.cloud_addr}",
    ]
    autossh = shutil.which("autossh")
    env = dict(os.environ)
    if autossh:
        # -M 0: no monitor port, ssh's own ServerAlive checks decide; restart
        # at once, then back off up to 30 s (the agent's default cap).
        env.update({"AUTOSSH_GATETIME": "0", "AUTOSSH_POLL": "30"})
        argv = [autossh, "-M", "0", *ssh_argv]
    else:  # the same behaviour from a shell loop
        quoted = " ".join(f"'{a}'" for a in ssh_argv)
        argv = ["sh", "-c", f"while :; do ssh {quoted}; sleep 1; done"]
    client = _proc(link, "edge", "ssh", argv, stacks.workdir / "ssh.log", env=env)
    stacks.procs.append(client)
    version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    return Ssh(sshd, client, sshd_port, socks_port, version)


def _socks_ready(stacks: Stacks) -> bool:
    assert stacks.ssh is not None
    s = stacks.sock()
    with s:
        s.settimeout(3)
        s.connect(("127.0.0.1", stacks.ssh.socks_port))
        socks5_connect(s, "127.0.0.1", stacks.echo_port)
        s.sendall(b"x")
        return s.recv(1) == b"x"


def start_stacks(
    link: LinkSim,
    workdir: Path,
    *,
    ssh: bool = True,
    optimistic: str | None = None,
    timeout: float = 60,
) -> Stacks:
    """Start targets, both Tether stacks and the ssh tunnel on ``link``; wait
    until every contender can reach the echo target. On failure, everything
    started is stopped before the error propagates."""
    workdir.mkdir(parents=True, exist_ok=True)
    pki = init_pki(
        workdir / "pki",
        agents=["agent-connect", "agent-grpc", "agent-optimistic"],
        extra_sans=[link.cloud_addr],
    )
    portfile = workdir / "target-ports"
    host = "0.0.0.0" if link.emulated else "127.0.0.1"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    targets = _proc(
        link,
        "edge",
        "targets",
        [sys.executable, "-m", "benchmarks.targets", str(portfile), "--host", host],
        workdir / "targets.log",
        env=env,
    )
    stacks = Stacks(link, workdir, pki, targets, 0, 0, procs=[targets])
    try:
        _wait(portfile.exists, timeout, "targets", [targets])
        stacks.echo_port, stacks.source_port = map(int, portfile.read_text().split())
        stacks.brokers["tether-connect"] = _start_broker(
            stacks, "tether-connect", "http-connect", "agent-connect"
        )
        stacks.brokers["tether-grpc"] = _start_broker(stacks, "tether-grpc", "grpc", "agent-grpc")
        if optimistic:
            stacks.brokers["tether-connect-optimistic"] = _start_broker(
                stacks,
                "tether-connect-optimistic",
                "http-connect",
                "agent-optimistic",
                [optimistic],
            )
        if ssh:
            stacks.ssh = _start_ssh(stacks)
        for b in stacks.brokers.values():
            _wait(
                lambda b=b: _broker_ready(stacks, b),
                timeout,
                f"{b.proc.name} with its agent",
                [b.proc, b.agent],
            )
        if stacks.ssh is not None:
            _wait(
                lambda: _socks_ready(stacks),
                timeout,
                "the ssh reverse SOCKS tunnel",
                [stacks.ssh.sshd, stacks.ssh.client],
            )
    except BaseException:
        stacks.stop()
        raise
    return stacks
