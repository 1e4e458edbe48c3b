"""``tether-broker --workers N``: one broker host on every core.

A supervisor process binds the frontend Unix sockets (so kube-apiserver
keeps one path) and starts N worker processes. Each worker opens the agent
port and the TCP frontend with ``SO_REUSEPORT`` (the kernel spreads new
connections over the workers) and accepts on the inherited frontend Unix
sockets. An agent keeps its one connection, to the worker that accepted
it; that worker owns it.

Routing view: every worker announces its agents to the supervisor over an
inherited socketpair; the supervisor's :class:`protocol.workers.HostTable`
broadcasts each change to every worker, so each worker routes a dial on
the whole host's agents (:class:`HostRouter`, the same indexes and
most-specific rule as one broker's registry).

A dial that lands on a worker which does not own the chosen agent:

- CONNECT on a frontend Unix socket: the connection's descriptor is handed
  to the owner with ``SCM_RIGHTS``, with the bytes already read; the owner
  serves it as if it had accepted it, so the tunnel's bytes cross one
  process, as with one worker.
- gRPC and the TLS TCP frontend (their protocol state cannot move): the
  worker hands a socketpair end to the owner as a CONNECT request and
  relays the call's bytes over the other end.

Worker-to-worker channels are Unix sockets in a private (0700) directory;
a worker serves a peer only when ``SO_PEERCRED`` names a process of its
uid whose parent is its own supervisor: anyone else is closed at once,
unread, and counted (``bad_input{source="worker_channel"}``).

The supervisor serves the host's health port (``/readyz`` counts every
worker's agents) and admin port (``/metrics``: its own metrics and every
worker's, scraped each second, with a ``worker`` label; ``/agents``: every
worker's rows with a ``worker`` field). It restarts a worker that exits
with backoff, forwards SIGTERM to every worker (each drains as one broker
does) and exits 0 once all have.
"""

from __future__ import annotations

import array
import collections
import contextlib
import errno
import functools
import json
import logging
import os
import random
import shutil
import signal
import socket
import struct
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import prometheus_client as prom
import trio

from broker.config import WORKER_ENV
from broker.dialing import DialError, DialOutcome
from broker.metrics import BrokerMetrics
from broker.registry import Membership, Registry, RoutableAgent
from broker.routing_index import ClusterIndex
from protocol import events
from protocol import workers as wp
from protocol.backoff import Backoff
from protocol.codes import CloseCode
from protocol.identifiers import AgentIdentifiers, match_rank
from protocol.messages import split_host_port
from tether.netio.http import serve_http, text
from tether.netio.listeners import ListenError, listener_port, open_tcp_listener
from tether.netio.logs import event, limited
from tether.netio.process import wait_for_stop_signal
from tether.netio.tunnel import StreamAborted, Tunnel

if TYPE_CHECKING:
    from broker.app import Broker
    from broker.config import BrokerConfig

log = logging.getLogger("tether.broker.workers")

#: How a worker finds its inherited descriptors (JSON); set by the supervisor.
ENV = WORKER_ENV
_MAX_FDS = 16
_CRED = struct.Struct("3i")


def worker_env() -> dict[str, Any] | None:
    raw = os.environ.get(ENV)
    return json.loads(raw) if raw else None


# ------------------------------------------------------------ worker side


@attrs.define(eq=False)
class RemoteAgent:
    """An agent of the host as a worker's router sees it: who owns it."""

    worker: int
    cluster: str
    agent_id: str
    identifiers: AgentIdentifiers
    usable: bool = True
    load: int = 0

    async def dial(
        self, dial_id: int, addr: str, timeout: float, early: bytes | None = None
    ) -> Tunnel:
        """Never called: its worker dials it (:meth:`WorkerLink.relay_dial`)."""
        raise DialError(DialOutcome.AGENT_LOST, f"agent owned by worker {self.worker}")

    def abort(self, reason: str) -> None:
        """Its owner closes it (the supervisor's ``Evict``)."""


class HostRouter:
    """Every agent of the host, by cluster, in the registry's indexes."""

    def __init__(self, strategies: Sequence[str], rng: random.Random | None = None) -> None:
        self.strategies = tuple(strategies)
        self._index: dict[str, ClusterIndex[RemoteAgent]] = {}
        self._agents: dict[tuple[str, str], RemoteAgent] = {}
        self._randbelow = (rng or random.Random()).randrange

    def __len__(self) -> int:
        return len(self._agents)

    def up(self, msg: wp.AgentUp) -> None:
        old = self._agents.get((msg.cluster, msg.agent_id))
        if old is not None:
            self.down(msg.cluster, msg.agent_id, old.worker)
        try:
            ids = AgentIdentifiers.parse(msg.identifiers)
        except ValueError:
            ids = AgentIdentifiers.parse("")
        agent = RemoteAgent(msg.worker, msg.cluster, msg.agent_id, ids)
        self._agents[(msg.cluster, msg.agent_id)] = agent
        self._index.setdefault(msg.cluster, ClusterIndex()).add(agent)

    def down(self, cluster: str, agent_id: str, worker: int) -> RemoteAgent | None:
        """Forget ``worker``'s agent (not one that replaced it on another);
        returns it if it was forgotten."""
        old = self._agents.get((cluster, agent_id))
        if old is not None and old.worker == worker:
            del self._agents[(cluster, agent_id)]
            self._index[cluster].remove(old)
            return old
        return None

    def gone(self, worker: int) -> list[RemoteAgent]:
        """Forget every agent of ``worker`` (it exited); returns them."""
        return [
            agent
            for key, agent in list(self._agents.items())
            if agent.worker == worker and self.down(*key, worker) is not None
        ]

    def choose(self, cluster: str, host: str) -> RemoteAgent | None:
        index = self._index.get(cluster)
        return index.choose(self.strategies, host, self._randbelow) if index else None


def tier(ids: AgentIdentifiers, host: str, strategies: Sequence[str]) -> tuple[int, int]:
    """Which tier of the routing rule an agent serves ``host`` from: the
    strategy's position, then (``destHost``) the most specific match
    first. Lower is better; agents of one tier are equally eligible."""
    for i, strategy in enumerate(strategies):
        if strategy == "destHost":
            rank = match_rank(ids, host)
            if rank is not None:
                return (i, -rank)
        elif strategy == "default" or ids.default_route:
            return (i, 0)
    return (len(strategies), 0)


class WorkerRegistry(Registry):
    """A worker's registry: its own agents, announced to the host; dials
    routed on the host's view (:class:`HostRouter`), which also tells it of
    arrivals and departures (:meth:`WorkerLink.routed`)."""

    link: WorkerLink | None = None

    def _departed(self, agent: RoutableAgent) -> None:
        if self.link is None:
            super()._departed(agent)

    def routable(self, cluster: str, host: str) -> bool:
        if super().routable(cluster, host):
            return True
        return self.link is not None and self.link.router.choose(cluster, host) is not None

    def _announce(self, msg: wp.Message) -> None:
        if self.link is not None:
            self.link.announce(msg)

    def add(
        self, agent: RoutableAgent, membership: Membership | None = None
    ) -> RoutableAgent | None:
        old = super().add(agent, membership)
        self._announce_up(agent, membership)
        return old

    def _announce_up(self, agent: RoutableAgent, membership: Membership | None) -> None:
        if self.link is not None:
            self._announce(
                wp.AgentUp(
                    self.link.index,
                    agent.cluster,
                    agent.agent_id,
                    agent.identifiers.render(),
                    (membership.credential if membership else None) or "",
                )
            )

    def remove(self, agent: RoutableAgent) -> None:
        registered = self.get(agent.cluster, agent.agent_id) is agent
        super().remove(agent)
        if registered and self.link is not None:
            self._announce(wp.AgentDown(self.link.index, agent.cluster, agent.agent_id))

    def refresh(self, agent: RoutableAgent) -> None:
        super().refresh(agent)
        if self.get(agent.cluster, agent.agent_id) is agent:
            self._announce_up(agent, self._members.get(agent))

    async def dial(
        self,
        cluster: str,
        addr: str,
        timeout: float,
        early: bytes | None = None,
        *,
        local_only: bool = False,
    ) -> tuple[Tunnel, RoutableAgent]:
        link = self.link
        if link is not None and not local_only:
            try:
                host, _port = split_host_port(addr)
            except DialError:
                host = ""
            timeout -= await self.await_return(cluster, addr, timeout)
            remote = link.remote_owner(cluster, host) if host else None
            if remote is not None:
                try:
                    return await link.relay_dial(remote, addr, timeout, early), remote
                except DialError as exc:
                    self.metrics.dial_failures.labels(exc.code).inc()
                    raise
            # Held above already (if at all): the local route, as it is now.
            return await super().dial(cluster, addr, timeout, early, local_only=True)
        return await super().dial(cluster, addr, timeout, early, local_only=local_only)


def make_registry(metrics: BrokerMetrics, strategies: tuple[str, ...]) -> Registry:
    return WorkerRegistry(metrics, strategies)


class PrefixStream(trio.abc.HalfCloseableStream):
    """A handed-over connection: what the first worker read, then the socket."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self.stream = stream
        self.socket = stream.socket
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            out, self._prefix = self._prefix[:n], self._prefix[n:]
            return out
        return bytes(await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


class SocketTunnel:
    """A dial relayed through the owner worker, as a :class:`Tunnel`."""

    stream_id = 0
    buffered = 0

    def __init__(self, stream: trio.SocketStream, first: bytes) -> None:
        self._stream = stream
        self._first = first
        self.aborted = False

    async def receive(self) -> events.StreamData | None:
        if self._first:
            data, self._first = self._first, b""
            return events.StreamData(0, data, 0)
        try:
            data = bytes(await self._stream.receive_some(65536))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise StreamAborted(f"relay to the owner worker lost: {exc!r}") from None
        return events.StreamData(0, data, 0) if data else None

    def acknowledge(self, flow_len: int) -> None:
        pass

    async def wait_writable(self) -> int:
        return 65536

    async def send_all(self, data: bytes | memoryview) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise StreamAborted(f"relay to the owner worker lost: {exc!r}") from None

    def send_eof(self) -> None:
        try:
            self._stream.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def send_close(self, code: CloseCode, msg: str) -> None:
        self.reset()

    def reset(self, error_code: int = 0) -> None:
        self.aborted = True
        self._stream.socket.close()

    def forget(self) -> None:
        self._stream.socket.close()


_STATUS = {
    400: DialOutcome.BAD_ADDRESS,
    403: DialOutcome.FORBIDDEN,
    502: DialOutcome.FAILED,
    503: DialOutcome.NO_AGENT,
    504: DialOutcome.TIMEOUT,
}


def _peer_is_sibling(sock: trio.socket.SocketType, supervisor: int) -> bool:
    """Whether the peer is a process of our uid whose parent is our supervisor."""
    pid, uid, _gid = _CRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    )
    if uid != os.getuid():
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rfind(b")") + 2 :].split()
    return len(fields) > 1 and int(fields[1]) == supervisor


class WorkerLink:
    """A worker's side of the host: the control channel to the supervisor,
    the peer channels to the other workers, the shared listeners."""

    def __init__(self, env: dict[str, Any], metrics: BrokerMetrics, registry: Registry) -> None:
        self.index = int(env["index"])
        #: Our parent when we started (if it dies we are re-parented, and a
        #: process that init adopted must not pass for a sibling).
        self._supervisor = os.getppid()
        self.dir = str(env["dir"])
        self.metrics = metrics
        self.registry = registry
        self.router = HostRouter(registry.strategies)
        self._control = trio.socket.from_stdlib_socket(socket.socket(fileno=int(env["control"])))
        self.inherited: dict[str, trio.SocketListener] = {
            name: trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))
            for name, fd in env["sockets"].items()
        }
        self._outbox: collections.deque[bytes] = collections.deque()
        self._outbox_ready = trio.Event()
        self._peers: dict[int, tuple[trio.socket.SocketType, trio.Lock]] = {}
        self._broker: Broker | None = None
        self._nursery: trio.Nursery | None = None
        self.handovers = prom.Counter(
            "tether_broker_worker_handovers",
            "Frontend connections and relayed dials handed to the owner worker, by result",
            ["kind", "result"],
            registry=metrics.registry,
        )
        if isinstance(registry, WorkerRegistry):
            registry.link = self

    def remote_owner(self, cluster: str, host: str) -> RemoteAgent | None:
        """The other worker's agent a dial to ``host`` should go to, or None
        to serve it here: the host's choice, unless one of this worker's
        own agents is in the same tier of the routing rule (then any of
        them is as right, and no hand-over is needed)."""
        remote = self.router.choose(cluster, host)
        if remote is None or remote.worker == self.index:
            return None
        local = self.registry.choose(cluster, host)
        strategies = self.router.strategies
        if local is not None and tier(local.identifiers, host, strategies) <= tier(
            remote.identifiers, host, strategies
        ):
            return None
        return remote

    def path(self, worker: int) -> str:
        return os.path.join(self.dir, f"worker-{worker}.sock")

    async def open_listener(
        self, host: str, port: int, *, backlog: int = 512, what: str = "listener"
    ) -> trio.SocketListener:
        """A TCP listener sharing its port with the other workers (SO_REUSEPORT)."""
        try:
            infos = await trio.socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, type_, proto, _, addr = infos[0]
            sock = trio.socket.socket(family, type_, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            await sock.bind(addr)
            sock.listen(backlog)
        except OSError as exc:
            where = f"{host or '*'}:{port}"
            raise ListenError(
                exc.errno, f"cannot listen on {what} {where}: {exc.strerror or exc}"
            ) from None
        return trio.SocketListener(sock)

    # ------------------------------------------------------------ control

    def announce(self, msg: wp.Message) -> None:
        """Tell the supervisor about one of our agents; our own router takes
        it at once (the supervisor's broadcast skips the worker it came from)."""
        self.routed(msg)
        self._outbox.append(wp.encode(msg))
        self._outbox_ready.set()

    async def run(
        self, broker: Broker, ports: dict[str, int], *, task_status: trio.TaskStatus[None]
    ) -> None:
        self._broker = broker
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = self.path(self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # our predecessor's (a crashed worker of this slot)
        old_umask = os.umask(0o177)
        try:
            await listener.bind(path)
        finally:
            os.umask(old_umask)
        listener.listen(128)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._outbox.appendleft(wp.encode(wp.Hello(self.index, os.getpid(), ports["admin"])))
            self._outbox_ready.set()
            nursery.start_soon(self._write_control)
            nursery.start_soon(self._read_control)
            nursery.start_soon(self._accept_peers, listener)
            task_status.started()

    async def _write_control(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            # Everything queued in one write: a storm's announcements batch.
            data = b"".join(self._outbox)
            self._outbox.clear()
            while data:
                data = data[await self._control.send(data) :]

    async def _read_control(self) -> None:
        decoder = wp.FrameDecoder()
        while True:
            try:
                data = await self._control.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            try:
                messages = decoder.feed(data)
            except wp.WorkerProtocolError as exc:
                self.metrics.bad_input.labels("worker_control", exc.reason).inc()
                log.error("control channel from the supervisor: %s; stopping", exc)
                break
            for msg in messages:
                self._on_control(msg)
        log.warning("supervisor gone: this worker drains and stops")
        os.kill(os.getpid(), signal.SIGTERM)

    def routed(self, msg: wp.Message) -> None:
        """An agent of the host (ours or another worker's) came or went:
        the router's view, and the registry's departures
        (``--agent-return-wait``) from it."""
        if isinstance(msg, wp.AgentUp):
            self.router.up(msg)
            self.registry.note_arrival(msg.cluster, msg.agent_id)
        elif isinstance(msg, wp.AgentDown):
            gone = self.router.down(msg.cluster, msg.agent_id, msg.worker)
            if gone is not None:
                self.registry.note_departure(gone.cluster, gone.agent_id, gone.identifiers)

    def _on_control(self, msg: wp.Message) -> None:
        if isinstance(msg, wp.AgentUp | wp.AgentDown):
            self.routed(msg)
        elif isinstance(msg, wp.WorkerGone):
            for gone in self.router.gone(msg.worker):
                self.registry.note_departure(gone.cluster, gone.agent_id, gone.identifiers)
            self._peers.pop(msg.worker, None)
        elif isinstance(msg, wp.Evict):
            agent = self.registry.get(msg.cluster, msg.agent_id)
            if agent is not None:
                log.info(
                    "agent %s/%s: %s on another worker; closing this connection",
                    msg.cluster,
                    msg.agent_id,
                    msg.reason,
                    extra=event("agent_evicted", cluster=msg.cluster, agent_id=msg.agent_id),
                )
                if msg.reason != "replaced":  # a replacement counts as a disconnect
                    self.metrics.agent_rejected.labels(msg.reason).inc()
                agent.abort(msg.reason)
        else:
            self.metrics.bad_input.labels("worker_control", "unexpected_kind").inc()

    # -------------------------------------------------------------- peers

    async def _accept_peers(self, listener: trio.socket.SocketType) -> None:
        assert self._nursery is not None
        while True:
            conn, _ = await listener.accept()
            if not _peer_is_sibling(conn, self._supervisor):
                self.metrics.bad_input.labels("worker_channel", "peer_not_worker").inc()
                limited(
                    log,
                    logging.WARNING,
                    "worker_channel",
                    "worker channel: refused a connection from a process that is not "
                    "a worker of this broker",
                    extra=event("bad_input", source="worker_channel", reason="peer_not_worker"),
                )
                conn.close()
                continue
            self._nursery.start_soon(self._read_peer, conn)

    async def _read_peer(self, conn: trio.socket.SocketType) -> None:
        decoder = wp.FrameDecoder()
        fds: collections.deque[int] = collections.deque()
        try:
            while True:
                data, anc, flags, _addr = await conn.recvmsg(65536, socket.CMSG_SPACE(_MAX_FDS * 4))
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        got = array.array("i")
                        got.frombytes(payload[: len(payload) - len(payload) % 4])
                        fds.extend(got)
                if flags & socket.MSG_CTRUNC:
                    raise wp.WorkerProtocolError("fd_truncated", "too many descriptors at once")
                if not data:
                    return
                for msg in decoder.feed(data):
                    if not isinstance(msg, wp.Handover):
                        raise wp.WorkerProtocolError("unexpected_kind", "not a Handover")
                    if not fds:
                        raise wp.WorkerProtocolError("missing_fd", "Handover without a socket")
                    self._serve_handover(fds.popleft(), msg)
        except wp.WorkerProtocolError as exc:
            self.metrics.bad_input.labels("worker_channel", exc.reason).inc()
            log.warning("worker channel: %s; closing it", exc)
        except OSError as exc:
            log.debug("worker channel closed: %r", exc)
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()

    def _serve_handover(self, fd: int, msg: wp.Handover) -> None:
        broker = self._broker
        assert broker is not None and self._nursery is not None
        sock = socket.socket(fileno=fd)
        if msg.frontend not in ("uds", "relay") or msg.cluster not in broker.cluster_names:
            self.metrics.bad_input.labels("worker_channel", "bad_handover").inc()
            sock.close()
            return
        sock.setblocking(False)
        stream = PrefixStream(trio.SocketStream(trio.socket.from_stdlib_socket(sock)), msg.data)
        handler = broker.frontend_handler(msg.frontend, msg.cluster, local_only=True)
        self.handovers.labels(msg.frontend, "received").inc()
        self._nursery.start_soon(handler, stream)

    async def _send_handover(self, worker: int, msg: wp.Handover, fd: int) -> None:
        """Send ``msg`` with ``fd`` to ``worker``; OSError if it cannot be reached."""
        peer = self._peers.get(worker)
        if peer is None:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await sock.connect(self.path(worker))
            except OSError:
                sock.close()
                raise
            peer = self._peers[worker] = (sock, trio.Lock())
        sock, lock = peer
        data = wp.encode(msg)
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
        try:
            async with lock:
                sent = await sock.sendmsg([data], fds)
                while sent < len(data):
                    data = data[sent:]
                    sent = await sock.send(data)
        except OSError:
            if self._peers.get(worker) is peer:
                del self._peers[worker]
            sock.close()
            raise

    async def handover(
        self, stream: trio.abc.Stream, cluster: str, target: str, raw: bytes
    ) -> bool:
        """The CONNECT frontend's hook: hand the connection to the worker
        owning the agent the host's view chooses; False to serve it here."""
        try:
            host, _port = split_host_port(target)
        except DialError:
            return False
        remote = self.remote_owner(cluster, host)
        sock = getattr(stream, "socket", None)
        if remote is None or sock is None:
            return False
        try:
            await self._send_handover(
                remote.worker, wp.Handover(cluster, "uds", raw), sock.fileno()
            )
        except (OSError, ValueError) as exc:
            self.handovers.labels("uds", "failed").inc()
            log.info("hand-over to worker %d failed (%r); serving here", remote.worker, exc)
            return False
        self.handovers.labels("uds", "sent").inc()
        return True

    async def relay_dial(
        self, remote: RemoteAgent, addr: str, timeout: float, early: bytes | None
    ) -> Tunnel:
        """Dial through the owner: a CONNECT on a socketpair handed to it."""
        mine, theirs = socket.socketpair()
        request = b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (addr.encode(), addr.encode())
        try:
            await self._send_handover(
                remote.worker,
                wp.Handover(remote.cluster, "relay", request + (early or b"")),
                theirs.fileno(),
            )
        except (OSError, ValueError) as exc:
            mine.close()
            self.handovers.labels("relay", "failed").inc()
            raise DialError(
                DialOutcome.AGENT_LOST, f"owner worker {remote.worker} unreachable: {exc}"
            ) from None
        finally:
            theirs.close()
        self.handovers.labels("relay", "sent").inc()
        mine.setblocking(False)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(mine))
        head = b""
        try:
            with trio.fail_after(timeout + 5):
                while b"\r\n\r\n" not in head:
                    chunk = await stream.receive_some(16384)
                    if not chunk or len(head) > 16384:
                        raise DialError(DialOutcome.AGENT_LOST, "owner worker closed the dial")
                    head += chunk
        except trio.TooSlowError:
            mine.close()
            raise DialError(DialOutcome.TIMEOUT, "owner worker did not answer") from None
        except (DialError, trio.BrokenResourceError):
            mine.close()
            raise
        end = head.index(b"\r\n\r\n") + 4
        status_line = head.split(b"\r\n", 1)[0].split(b" ", 2)
        status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
        if status != 200:
            mine.close()
            body = head[end:].decode("utf-8", "replace").strip()
            raise DialError(_STATUS.get(status, DialOutcome.FAILED), body or f"status {status}")
        return SocketTunnel(stream, head[end:])


# ------------------------------------------------------------- supervisor


@attrs.define(eq=False)
class _Slot:
    index: int
    proc: trio.Process | None = None
    sock: trio.socket.SocketType | None = None
    outbox: collections.deque[bytes] = attrs.Factory(collections.deque)
    outbox_ready: trio.Event = attrs.Factory(trio.Event)
    live: bool = False
    #: Said Hello once: a later exit is a crash, not a start-up error.
    started: bool = False
    admin_port: int = 0
    pid: int = 0
    metrics: bytes = b""
    agents: list[Any] = attrs.Factory(list)


class Supervisor:
    """The parent of the workers (see the module docstring)."""

    def __init__(self, broker: Broker, argv: Sequence[str]) -> None:
        self.broker = broker
        self.cfg: BrokerConfig = broker.cfg
        self.argv = list(argv)
        self.table = wp.HostTable()
        self.slots = [_Slot(i) for i in range(self.cfg.workers)]
        self.stopping = False
        self.dir = ""
        r = self.registry = prom.CollectorRegistry()
        self.workers_up = prom.Gauge(
            "tether_broker_workers_up", "Worker processes running", registry=r
        )
        self.restarts = prom.Counter(
            "tether_broker_worker_restarts", "Worker processes restarted after exiting", registry=r
        )
        self.bad_input = prom.Counter(
            "tether_broker_supervisor_bad_input",
            "Malformed or forged messages from workers, by reason",
            ["reason"],
            registry=r,
        )

    # --------------------------------------------------------------- run

    async def run(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="tether-workers-")
        try:
            async with trio.open_nursery() as nursery:
                for slot in self.slots:
                    nursery.start_soon(self._keep_running, slot)
                await self._serve_ports(nursery)
                nursery.start_soon(self._scrape)
                log.info(
                    "broker %s supervisor up: %d workers, agent port %s, worker channels in %s",
                    self.cfg.server_id,
                    len(self.slots),
                    self.cfg.agent_port,
                    self.dir,
                    extra=event("supervisor_started", workers=len(self.slots), dir=self.dir),
                )
                await wait_for_stop_signal(log)
                await self._stop_workers()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._stop_workers()
            self.broker.remove_sockets()
            shutil.rmtree(self.dir, ignore_errors=True)
            log.info("broker supervisor stopped", extra=event("stopped"))

    async def _stop_workers(self) -> None:
        """SIGTERM every running worker (each drains), wait, kill stragglers:
        the drain, and after a start-up failure too (no worker outlives us)."""
        self.stopping = True
        running = [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]
        if running:
            log.info("draining %d worker(s)", len(running))
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        limit = self.cfg.drain_timeout + self.cfg.drain_retry + 10
        with trio.move_on_after(limit):
            for proc in running:
                await proc.wait()
        for proc in running:
            if proc.returncode is None:
                log.warning("worker pid %d did not stop within %gs; killing it", proc.pid, limit)
                proc.kill()
                await proc.wait()

    async def _keep_running(self, slot: _Slot) -> None:
        backoff = Backoff(base=0.5, cap=10.0, stable_after=30.0)
        while not self.stopping:
            started = trio.current_time()
            code = await self._run_worker(slot)
            if self.stopping:
                return
            if code == 2 and not slot.started:
                # A start-up error (a port taken, a bad address): restarting
                # cannot fix it. The worker logged why; stop the host.
                raise ListenError(
                    errno.EINVAL, f"worker {slot.index} could not start (see its error above)"
                )
            backoff.connected_for(trio.current_time() - started)
            delay = backoff.next_delay()
            self.restarts.inc()
            log.warning(
                "worker %d exited (%s); restarting in %.1fs",
                slot.index,
                code,
                delay,
                extra=event("worker_exited", worker=slot.index, code=code),
            )
            await trio.sleep(delay)

    async def _run_worker(self, slot: _Slot) -> int | None:
        mine, theirs = socket.socketpair()
        fds = {name: bound.sock.fileno() for name, bound in self.broker.sockets.items()}
        env = dict(os.environ)
        env[ENV] = json.dumps(
            {"index": slot.index, "control": theirs.fileno(), "dir": self.dir, "sockets": fds}
        )
        argv = [sys.executable, "-m", "broker", *self.argv, f"--server-id={self.cfg.server_id}"]
        try:
            proc = await trio.lowlevel.open_process(
                argv, env=env, pass_fds=[theirs.fileno(), *fds.values()]
            )
        finally:
            theirs.close()
        slot.proc, slot.sock = proc, trio.socket.from_stdlib_socket(mine)
        self.workers_up.inc()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_worker, slot)
                nursery.start_soon(self._write_worker, slot)
                await proc.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.workers_up.dec()
            slot.live = False
            slot.sock.close()
            slot.outbox.clear()  # a restarted worker starts from the snapshot
            slot.metrics, slot.agents = b"", []
        self._send_all(self.table.apply_gone(slot.index))
        return proc.returncode

    async def _read_worker(self, slot: _Slot) -> None:
        assert slot.sock is not None
        decoder = wp.FrameDecoder()
        while True:
            try:
                data = await slot.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            try:
                messages = decoder.feed(data)
            except wp.WorkerProtocolError as exc:
                self.bad_input.labels(exc.reason).inc()
                log.error("worker %d: %s; stopping it", slot.index, exc)
                if slot.proc is not None:
                    slot.proc.kill()
                return
            for msg in messages:
                self._on_worker(slot, msg)

    def _on_worker(self, slot: _Slot, msg: wp.Message) -> None:
        if isinstance(msg, wp.Hello):
            slot.admin_port, slot.pid = msg.admin_port, msg.pid
            slot.started = True
            slot.live = True
            for m in self.table.snapshot():  # queued before any later change
                self._queue(slot, wp.encode(m))
        elif isinstance(msg, (wp.AgentUp, wp.AgentDown)) and msg.worker == slot.index:
            out = (
                self.table.apply_up(msg)
                if isinstance(msg, wp.AgentUp)
                else (self.table.apply_down(msg))
            )
            self._send_all(out)
        else:
            self.bad_input.labels("unexpected_message").inc()

    @staticmethod
    def _queue(slot: _Slot, frame: bytes) -> None:
        slot.outbox.append(frame)
        slot.outbox_ready.set()

    async def _write_worker(self, slot: _Slot) -> None:
        """The only writer of a worker's channel: queued frames in order,
        as many as are waiting in one write."""
        assert slot.sock is not None
        while True:
            await slot.outbox_ready.wait()
            slot.outbox_ready = trio.Event()
            data = b"".join(slot.outbox)
            slot.outbox.clear()
            try:
                while data:
                    data = data[await slot.sock.send(data) :]
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.EBADF, errno.ECONNRESET):
                    raise
                return

    def _send_all(self, out: list[tuple[int, wp.Message]]) -> None:
        for target, msg in out:
            origin = msg.worker if isinstance(msg, (wp.AgentUp, wp.AgentDown)) else -1
            frame = wp.encode(msg)
            for slot in self.slots:
                if slot.live and target in (-1, slot.index) and slot.index != origin:
                    self._queue(slot, frame)

    # ------------------------------------------------- health and admin

    async def _serve_ports(self, nursery: trio.Nursery) -> None:
        cfg = self.cfg
        serve = functools.partial(serve_http, header_timeout=cfg.frontend_header_timeout)
        if cfg.health_port:
            health_l = await open_tcp_listener(
                cfg.health_bind_address, cfg.health_port, what="the health port (--health-port)"
            )
            nursery.start_soon(serve, health_l, self._health_routes())
            log.info("health port %d (the host's)", listener_port(health_l))
        if cfg.admin_port:
            admin_l = await open_tcp_listener(
                cfg.admin_bind_address, cfg.admin_port, what="the admin port (--admin-port)"
            )
            nursery.start_soon(serve, admin_l, self._admin_routes())

    def _health_routes(self) -> dict[str, Callable[[], tuple[int, str, bytes]]]:
        def healthz() -> tuple[int, str, bytes]:
            live = sum(s.live for s in self.slots)
            return text(200, "ok") if live else text(503, "no worker running")

        def readyz() -> tuple[int, str, bytes]:
            if self.stopping:
                return text(503, "shutting down")
            lost = self.broker.lost_sockets()
            if lost:
                return text(503, f"frontend socket lost: {', '.join(sorted(lost))}")
            n = len(self.table)
            return text(200, f"ready: {n} agent(s)") if n else text(503, "no agent connected")

        return {"/healthz": healthz, "/readyz": readyz}

    def _admin_routes(self) -> dict[str, Callable[[], tuple[int, str, bytes]]]:
        def metrics() -> tuple[int, str, bytes]:
            merged = wp.merge_metrics({str(s.index): s.metrics for s in self.slots if s.metrics})
            body = prom.generate_latest(self.registry) + merged
            return 200, "text/plain; version=0.0.4; charset=utf-8", body

        def agents() -> tuple[int, str, bytes]:
            rows = wp.merged_agents((s.index, s.agents) for s in self.slots)
            return 200, "application/json", json.dumps(rows, indent=1).encode() + b"\n"

        def workers() -> tuple[int, str, bytes]:
            rows = [
                {
                    "worker": s.index,
                    "pid": s.proc.pid if s.proc is not None and s.live else 0,
                    "live": s.live,
                    "agents": self.table.count(s.index),
                }
                for s in self.slots
            ]
            return 200, "application/json", json.dumps(rows, indent=1).encode() + b"\n"

        return {"/metrics": metrics, "/agents": agents, "/workers": workers}

    async def _scrape(self, interval: float = 1.0) -> None:
        """Each worker's /metrics and /agents, for the host's admin port."""
        while True:
            for slot in self.slots:
                if slot.live and slot.admin_port:
                    with trio.move_on_after(interval):
                        slot.metrics = await _fetch(slot.admin_port, "/metrics")
                        raw = await _fetch(slot.admin_port, "/agents")
                        try:
                            slot.agents = json.loads(raw) if raw else []
                        except ValueError:
                            slot.agents = []
            await trio.sleep(interval)


async def _fetch(port: int, path: str) -> bytes:
    """GET a worker's admin path; b"" on any failure."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return b""
    async with stream:
        try:
            await stream.send_all(b"GET %s HTTP/1.0\r\nHost: worker\r\n\r\n" % path.encode())
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return body if head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200") else b""
