"""S9, broker scale: N agents simulated in one process against one real broker.

    python -m benchmarks.many_agents [--agents 1000] [--dial-seconds 5]
        [--idle-seconds 60] [--no-storm] [--broker-source DIR] [--json OUT]

Each simulated agent is the project's own protocol stack, not a mock: a TCP
connection, :class:`tether.netio.tls_stream.TLSStream` (TLS 1.3, ALPN h2),
:class:`protocol.session.TunnelSession` in the agent role and
:class:`tether.netio.tunnel.TunnelConnection`, with the real reconnect
schedule (:class:`protocol.backoff.Backoff`, the agent's defaults: base 1 s,
cap 30 s, full jitter). What it does not do is dial real targets: a dial is
answered with a data stream that echoes, so the figures are the broker's.

Agents log in with one bearer token (``--agent-token-file`` with an id glob)
rather than N client certificates, and each uses its own source address in
127.0.0.0/8, as a fleet behind many NATs would (the broker limits concurrent
handshakes per source address).

Measured:

- memory per connected agent: broker RSS (and USS) with N agents connected,
  minus the same broker with none, divided by N;
- idle CPU: the broker's CPU use (% of one core) over ``--idle-seconds``
  with all N agents connected and nothing else happening: keepalive,
  timers and tasks, per agent per hour as well;
- dials per second: 64 concurrent CONNECT clients on the broker's Unix
  socket, each dial carrying one echoed byte, for ``--dial-seconds``; the
  broker's and this process's CPU use are recorded, since on a 2-core box
  the simulator competes with the broker; broker CPU seconds per 1,000 dials;
- reconnect storm: the broker is killed (SIGKILL: a crash, no drain hint)
  and started again on the same port (with the same
  ``--agent-tls-ticket-key-file``, so reconnects may resume their TLS
  sessions; ``--no-ticket-key`` for a broker without it); the time from the
  restart until all N agents are connected again, while ``/healthz`` is
  polled every 100 ms from a separate process (p50, p99, worst, failures)
  and 4 CONNECT clients dial the agents already back. The simulated agents
  offer their last TLS session and wait out a ``503 overloaded`` retry hint,
  as tether-agent does (``--no-storm`` skips it).

``--broker-source DIR`` runs the broker from another checkout of the
project (``PYTHONPATH=DIR``) with this simulator, for before/after
comparisons of the broker alone.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import resource
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from benchmarks import measure
from protocol import keepalive, messages, session
from protocol.backoff import Backoff
from protocol.session import Role, SessionConfig, TunnelSession
from tether.netio import keepalive as keepalive_timers
from tether.netio import sockopts, tls
from tether.netio.tls_stream import TLSStream
from tether.netio.tunnel import Keepalive, StreamAborted, TunnelClosed, TunnelConnection
from tether.tools.certs import init_pki
from tether.tools.launch import http_get, start_broker

CLUSTER = "default"
#: What ``tether-agent`` sets with its default keepalive (15 s + 15 s).
KEEPALIVE = Keepalive(15, 15)
SOCKET_OPTIONS = sockopts.TunnelSocketOptions(user_timeout=30.0, keepalive_idle=15.0)


def raise_fd_limit(want: int) -> int:
    """Raise RLIMIT_NOFILE (children inherit it: the broker needs one fd per
    agent). Root may raise the hard limit up to fs.nr_open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except OSError:
        nr_open = hard
    target = max(soft, min(want, nr_open))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def source_address(i: int) -> str:
    return f"127.{1 + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}"


class FleetCounts:
    """What a run reads of a fleet, in one process (:class:`Fleet`) or
    several (:class:`ShardedFleet`), and how it waits on it: ``changed`` is
    set (and replaced) whenever a count moved."""

    changed: trio.Event

    @property
    def pids(self) -> tuple[int, ...]:
        """Simulator processes besides this one."""
        return ()

    @property
    def count(self) -> int:
        """Agents connected now."""
        raise NotImplementedError

    @property
    def lost(self) -> int:
        """Accepted connections that ended (a storm waits for all N)."""
        raise NotImplementedError

    async def wait_connected(self, count: int) -> None:
        while self.count < count:
            await self.changed.wait()

    async def wait_lost(self, count: int) -> None:
        while self.lost < count:
            await self.changed.wait()

    async def stop(self) -> None:
        """Stop the simulator processes besides this one (none here)."""


class Fleet(FleetCounts):
    def __init__(
        self, n: int, port: int, token: str, ca: Path, keepalive: Keepalive = KEEPALIVE
    ) -> None:
        # The simulated agents share one timer task in this process, but in
        # a fleet each has its own: their PINGs must not leave in batches.
        keepalive_timers.SLACK = 0.0
        self.n = n
        self.keepalive = keepalive
        self.port = port
        self.token = token
        self.ctx = tls.client_context(ca, None, None, alpn=["h2"])
        self.connected: set[int] = set()
        self.changed = trio.Event()
        self.handshake_failures = 0
        self.failure_kinds: dict[str, int] = {}
        self.dials_served = 0
        #: Each agent's last TLS session, offered for resumption (as tether-agent does).
        self.sessions: dict[int, ssl.SSLSession] = {}
        self.resumed = 0
        self.full_handshakes = 0
        #: 503 overloaded answers, and the retry hints they carried.
        self.shed = 0
        self._lost = 0

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    @property
    def count(self) -> int:
        return len(self.connected)

    @property
    def lost(self) -> int:
        return self._lost

    async def start(self, nursery: trio.Nursery, agents: range | None = None) -> None:
        """Run agents ``agents`` (default: all ``n``) in ``nursery``."""
        for i in agents if agents is not None else range(self.n):
            nursery.start_soon(self.run_agent, i)

    def snapshot(self) -> dict[str, Any]:
        """The counts a shard reports to the parent (:class:`ShardedFleet`),
        by attribute name."""
        return {
            "count": len(self.connected),
            "handshake_failures": self.handshake_failures,
            "failure_kinds": dict(self.failure_kinds),
            "dials_served": self.dials_served,
            "resumed": self.resumed,
            "full_handshakes": self.full_handshakes,
            "shed": self.shed,
            "lost": self.lost,
        }

    async def run_agent(self, i: int) -> None:
        backoff = Backoff(1.0, 30.0, 30.0)
        await trio.sleep(backoff.rng.uniform(0, 1.0))
        while True:
            started = trio.current_time()
            accepted, retry_after = await self._connection(i)
            if accepted:
                backoff.connected_for(trio.current_time() - started)
            if retry_after is not None:
                backoff.retry_hint(retry_after)
            await trio.sleep(backoff.next_delay())

    async def _connection(self, i: int) -> tuple[bool, float | None]:
        """One connection's life: whether it was accepted, and an
        overloaded broker's retry hint."""
        try:
            with trio.fail_after(10):
                tcp = await trio.open_tcp_stream(
                    "127.0.0.1", self.port, local_address=source_address(i)
                )
                # The agent's own socket options (TCP_NODELAY above all).
                sockopts.apply(tcp.socket, SOCKET_OPTIONS)  # type: ignore[arg-type]
                stream = TLSStream(
                    tcp,
                    self.ctx,
                    server_side=False,
                    server_hostname="127.0.0.1",
                    session=self.sessions.get(i),
                )
                try:
                    await stream.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            self.handshake_failures += 1
            kind = type(exc).__name__
            self.failure_kinds[kind] = self.failure_kinds.get(kind, 0) + 1
            return False, None
        if stream.session_reused:
            self.resumed += 1
        else:
            self.full_handshakes += 1
        sess = TunnelSession(Role.AGENT, SessionConfig(), clock=trio.current_time)
        sess.initiate()
        sess.open_control(
            {
                "tether-agent-id": f"sim-{i}",
                "tether-agent-identifiers": f"host=sim-{i}",
                "tether-cluster": CLUSTER,
                "authorization": f"Bearer {self.token}",
                # As tether-agent: it drives keepalive, the broker answers.
                keepalive.HEADER: keepalive.header_value(self.keepalive.interval) or "",
            },
            f"127.0.0.1:{self.port}",
        )
        agent = SimAgent(self, i)
        conn = TunnelConnection(stream, sess, agent, keepalive=self.keepalive, name="sim")
        agent.conn = conn
        agent.stream = stream
        try:
            async with trio.open_nursery() as nursery:
                agent.nursery = nursery
                await conn.run()
                nursery.cancel_scope.cancel()
        finally:
            if i in self.connected:
                self.connected.discard(i)
                self._lost += 1
                self._changed()
        rejection = conn.rejection
        if rejection is not None and rejection.reason_token == "overloaded":
            self.shed += 1
            return False, rejection.retry_after
        return agent.accepted, None


class _Summed:
    """One count of :meth:`Fleet.snapshot`, summed over the shards' last
    reports (the attribute's name is the key)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = name

    def __get__(self, fleet: ShardedFleet, owner: type | None = None) -> int:
        return sum(int(state.get(self.key, 0)) for state in fleet._state)


class ShardedFleet(FleetCounts):
    """The fleet in ``procs`` processes (``--sim-procs``): each runs a
    :class:`Fleet` for a slice of the agent numbers (``--shard A:B``) and
    prints its counts (:meth:`Fleet.snapshot`) as a JSON line whenever they
    changed. One process's event loop then does not set the pace of all
    simulated agents, as it does in a 10,000-agent storm (the simulator at
    80-85% of a core while the broker used 36%). Children are started and
    killed by their own PIDs; one whose parent went away exits at EOF on its
    stdin."""

    def __init__(
        self, n: int, procs: int, port: int, token_file: Path, ca: Path, keepalive_s: float
    ) -> None:
        self.argv = [
            sys.executable,
            "-m",
            "benchmarks.many_agents",
            f"--shard-port={port}",
            f"--shard-token-file={token_file}",
            f"--shard-ca={ca}",
            f"--keepalive={keepalive_s}",
        ]
        self.slices = [range(k * n // procs, (k + 1) * n // procs) for k in range(procs)]
        self.procs: list[trio.Process] = []
        self._state: list[dict[str, Any]] = [{} for _ in self.slices]
        self.changed = trio.Event()

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self.procs)

    count = _Summed()
    lost = _Summed()
    handshake_failures = _Summed()
    resumed = _Summed()
    full_handshakes = _Summed()
    shed = _Summed()

    @property
    def failure_kinds(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for state in self._state:
            for kind, count in state.get("failure_kinds", {}).items():
                kinds[kind] = kinds.get(kind, 0) + count
        return kinds

    async def start(self, nursery: trio.Nursery) -> None:
        for k, part in enumerate(self.slices):
            proc = await trio.lowlevel.open_process(
                [*self.argv, f"--shard={part.start}:{part.stop}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            self.procs.append(proc)
            nursery.start_soon(self._follow, k, proc)

    async def _follow(self, k: int, proc: trio.Process) -> None:
        assert proc.stdout is not None
        pending = b""
        async for chunk in proc.stdout:
            *lines, pending = (pending + chunk).split(b"\n")
            if lines:
                self._state[k] = json.loads(lines[-1])
                self.changed.set()
                self.changed = trio.Event()

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()
        with trio.CancelScope(shield=True):
            for proc in self.procs:
                await proc.wait()


async def run_shard(agents: range, port: int, token: str, ca: Path, keepalive_s: float) -> None:
    """One :class:`ShardedFleet` child: agents ``agents``, counts on stdout."""
    fleet = Fleet(agents.stop, port, token, ca, Keepalive(keepalive_s, 15))

    async def report() -> None:
        last = None
        while True:
            now = json.dumps(fleet.snapshot())
            if now != last:
                sys.stdout.write(now + "\n")
                sys.stdout.flush()
                last = now
            await trio.sleep(0.1)

    async def parent_gone(cancel: trio.CancelScope) -> None:
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        while await stdin.receive_some(1024):
            pass
        cancel.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(report)
        nursery.start_soon(parent_gone, nursery.cancel_scope)
        await fleet.start(nursery, agents)


class SimAgent:
    """The handler of one simulated agent's connection."""

    def __init__(self, fleet: Fleet, i: int) -> None:
        self.fleet = fleet
        self.i = i
        self.conn: TunnelConnection | None = None
        self.stream: TLSStream | None = None
        self.nursery: trio.Nursery | None = None
        self.accepted = False

    def on_control_requested(self, ev: session.ControlRequested) -> None:
        raise AssertionError("agents receive no requests")

    def on_data_stream_requested(self, ev: session.DataStreamRequested) -> None:
        raise AssertionError("agents receive no requests")

    def on_control_accepted(self, ev: session.ControlAccepted) -> None:
        self.accepted = True
        tls_session = self.stream.session if self.stream is not None else None
        if tls_session is not None and tls_session.has_ticket:
            self.fleet.sessions[self.i] = tls_session
        self.fleet.connected.add(self.i)
        self.fleet._changed()

    def on_message(self, msg: messages.Message) -> None:
        if isinstance(msg, messages.Dial) and self.nursery is not None:
            self.nursery.start_soon(self._echo, msg)

    async def _echo(self, msg: messages.Dial) -> None:
        conn = self.conn
        assert conn is not None
        try:
            sid = conn.session.open_data_stream(msg.id, f"127.0.0.1:{self.fleet.port}")
            ts = conn.add_stream(sid, msg.id)
        except (TunnelClosed, Exception):
            return
        conn.wake_writer()
        self.fleet.dials_served += 1
        try:
            while (chunk := await ts.receive()) is not None:
                await ts.send_all(chunk.data)
                ts.acknowledge(chunk.flow_len)
            ts.send_eof()
        except (StreamAborted, TunnelClosed, Exception):
            return
        finally:
            # As the agent's relay does: without it the connection keeps
            # every stream it ever served (and tunes them all, forever).
            ts.forget()


async def _connect_client(uds: str) -> None:
    stream = await trio.open_unix_socket(uds)
    async with stream:
        await _connect_over(stream)


async def _connect_over(stream: trio.SocketStream) -> None:
    """CONNECT through the broker on ``stream`` and check one echoed byte."""
    await stream.send_all(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    if not data.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(data[:80].decode(errors="replace"))
    rest = data.partition(b"\r\n\r\n")[2]
    await stream.send_all(b"x")
    if not rest:
        rest = await stream.receive_some(16)
    if rest != b"x":
        raise ConnectionError("no echo")


async def _dial_load(uds: str, seconds: float, concurrency: int = 64) -> dict[str, Any]:
    ok = 0
    failed = 0
    latencies: list[float] = []
    deadline = trio.current_time() + seconds

    async def worker() -> None:
        nonlocal ok, failed
        while trio.current_time() < deadline:
            t0 = trio.current_time()
            try:
                with trio.fail_after(10):
                    await _connect_client(uds)
                ok += 1
                latencies.append(trio.current_time() - t0)
            except (OSError, ConnectionError, trio.TooSlowError, trio.BrokenResourceError):
                failed += 1

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    elapsed = trio.current_time() - start
    return {
        "dials_ok": ok,
        "dials_failed": failed,
        "seconds": elapsed,
        "dials_per_s": ok / elapsed,
        "latency_p50_ms": measure.pct(latencies, 0.5) * 1000,
        "latency_p99_ms": measure.pct(latencies, 0.99) * 1000,
        "concurrency": concurrency,
    }


def probe_loop(port: int, stop_file: Path, out_file: Path, interval: float = 0.1) -> None:
    """``/healthz`` every ``interval`` with blocking sockets until
    ``stop_file`` exists; the latencies (seconds, -1 failed) go to
    ``out_file``. Run in its own process, so the simulator's event loop
    (thousands of agents' TLS) is not part of what it measures."""
    samples: list[float] = []
    while not stop_file.exists():
        t0 = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.settimeout(2)
                sock.sendall(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
            ok = data.startswith(b"HTTP/1.") and data.split(b" ", 2)[1] == b"200"
        except OSError:
            ok = False
        elapsed = time.monotonic() - t0
        samples.append(elapsed if ok else -1.0)
        time.sleep(max(0.0, interval - elapsed))
    out_file.write_text(json.dumps(samples))


async def _health_probe(port: int, stop: trio.Event, out: dict[str, Any], workdir: Path) -> None:
    """:func:`probe_loop` in a child process until ``stop``: latency
    p50/p99/worst and failures (a probe over 2 s fails)."""
    stop_file, out_file = workdir / "probe.stop", workdir / "probe.json"
    stop_file.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "benchmarks.many_agents", "--probe", str(port)]
    argv += ["--probe-files", str(stop_file), str(out_file)]
    proc = await trio.lowlevel.open_process(argv)
    try:
        await stop.wait()
    finally:
        stop_file.touch()
        with trio.move_on_after(5):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
    raw = json.loads(out_file.read_text()) if out_file.exists() else []
    samples = [s for s in raw if s >= 0]
    out.update(
        {
            "probes": len(raw),
            "failed": len(raw) - len(samples),
            "p50_ms": measure.pct(samples, 0.5) * 1000,
            "p99_ms": measure.pct(samples, 0.99) * 1000,
            "worst_ms": max(samples, default=0.0) * 1000,
        }
    )


async def _storm_dials(uds: str, stop: trio.Event, out: dict[str, Any]) -> None:
    """A light dial load through the storm (4 clients, each one dial every
    200 ms at most: up to 20 dials/s, so the dials' own CPU does not weigh
    on the storm): dials reach the agents already back."""
    ok = failed = 0

    async def client() -> None:
        nonlocal ok, failed
        while not stop.is_set():
            started = trio.current_time()
            try:
                with trio.fail_after(5):
                    await _connect_client(uds)
                ok += 1
            except (OSError, ConnectionError, trio.TooSlowError, trio.BrokenResourceError):
                failed += 1
            with trio.move_on_after(max(0.0, 0.2 - (trio.current_time() - started))):
                await stop.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(client)
    out.update({"ok": ok, "failed": failed})


def simulator_cpu(fleet: FleetCounts) -> float:
    """CPU seconds of the simulator: this process and any shards."""
    return sum(measure.cpu_seconds(pid) for pid in (os.getpid(), *fleet.pids))


async def _held_idle(
    uds: str, pid: int, seconds: float, count: int, fleet: FleetCounts
) -> dict[str, Any]:
    """The broker's CPU use with ``count`` tunnels open through it (spread
    over the agents by its load-aware routing) and no byte moving on them:
    what open but quiet streams (``kubectl logs -f``, an unused
    port-forward) cost it per second."""
    opened = refused = 0
    ready = trio.Event()
    release = trio.Event()
    opening = trio.Semaphore(32)  # within the frontend's accept backlog

    async def hold() -> None:
        nonlocal opened, refused
        async with opening:
            stream = await trio.open_unix_socket(uds)
            try:
                await _connect_over(stream)
            except ConnectionError:
                # 503 once the broker's buffer budget has no stream left
                refused += 1
                await stream.aclose()
                if opened + refused == count:
                    ready.set()
                return
        async with stream:
            opened += 1
            if opened + refused == count:
                ready.set()
            await release.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(hold)
        with trio.fail_after(60):
            await ready.wait()
        await trio.sleep(2.0)  # let the last dials' tuning rounds end
        out = await _idle_cpu(pid, seconds, fleet)
        release.set()
    out["held_streams"] = opened
    out["held_refused"] = refused
    return out


async def _idle_cpu(pid: int, seconds: float, fleet: FleetCounts) -> dict[str, Any]:
    """The broker's CPU use while all agents are connected and idle."""
    n = fleet.count
    c0, w0 = measure.cpu_seconds(pid), time.monotonic()
    sim0 = simulator_cpu(fleet)
    await trio.sleep(seconds)
    wall = time.monotonic() - w0
    cpu = measure.cpu_seconds(pid) - c0
    return {
        "seconds": wall,
        "broker_cpu_pct": cpu / wall * 100,
        # CPU seconds per idle agent per hour
        "broker_cpu_s_per_agent_hour": cpu / wall * 3600 / max(1, n),
        "simulator_cpu_pct": (simulator_cpu(fleet) - sim0) / wall * 100,
    }


async def run(
    n: int,
    workdir: Path,
    dial_s: float,
    storm_cap_s: float,
    progress: Any = print,
    extra_args: tuple[str, ...] = (),
    ticket_key: bool = True,
    broker_source: Path | None = None,
    *,
    idle_s: float = 0.0,
    storm: bool = True,
    keepalive_s: float = KEEPALIVE.interval,
    held: int = 0,
    sim_procs: int = 1,
) -> dict[str, Any]:
    """``extra_args``: more broker flags (admission settings to compare);
    ``ticket_key``: give the broker a ticket key file (survives the crash);
    ``broker_source``: run the broker from this checkout (a before/after
    comparison with the same simulator); ``sim_procs``: simulate the
    agents in this many processes (:class:`ShardedFleet`)."""
    limit = raise_fd_limit(max(4 * n + 1024, 65536))
    pki = init_pki(workdir / "pki")
    token = secrets.token_urlsafe(32)
    token_file = workdir / "agent-tokens"
    digest = hashlib.sha256(token.encode()).hexdigest()
    token_file.write_text(f"sha256:{digest} {CLUSTER} sim-* max={n}\n")  # one token, n agents
    key_path = workdir / "ticket.key"
    key_path.write_bytes(secrets.token_bytes(80))
    key_path.chmod(0o600)
    broker = start_broker(
        workdir,
        pki,
        f"--agent-token-file={token_file}",
        f"--cluster-name={CLUSTER}",
        *([f"--agent-tls-ticket-key-file={key_path}"] if ticket_key else []),
        "--log-level=warning",
        *extra_args,
        tcp=False,
        prefix=("env", f"PYTHONPATH={broker_source}") if broker_source else (),
    )
    out: dict[str, Any] = {"agents": n, "fd_limit": limit, "simulator_processes": sim_procs}
    fleet: Fleet | ShardedFleet
    if sim_procs > 1:
        raw_token = workdir / "agent-token"
        raw_token.write_text(token)
        raw_token.chmod(0o600)
        fleet = ShardedFleet(n, sim_procs, broker.agent_port, raw_token, pki.ca_cert, keepalive_s)
    else:
        fleet = Fleet(n, broker.agent_port, token, pki.ca_cert, Keepalive(keepalive_s, 15))
    out["agent_keepalive_s"] = keepalive_s
    try:
        settle = 2.0 if n >= 100 else 0.3  # let allocations level off before reading RSS
        await broker.up()
        await trio.sleep(settle / 2)
        base = measure.memory_kib(broker.proc.pid)
        out["broker_idle_kib"] = base
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            await fleet.start(nursery)
            with trio.move_on_after(storm_cap_s):
                await fleet.wait_connected(n)
            out["initial_connect_s"] = trio.current_time() - t0
            out["initial_connected"] = fleet.count
            progress(
                f"    S9 {fleet.count}/{n} agents connected in {out['initial_connect_s']:.1f} s"
            )
            await trio.sleep(settle)
            full = measure.memory_kib(broker.proc.pid)
            out["broker_connected_kib"] = full
            out["per_agent_rss_kib"] = (full["rss"] - base["rss"]) / max(1, fleet.count)
            out["per_agent_uss_kib"] = (full["uss"] - base["uss"]) / max(1, fleet.count)
            progress(f"    S9 broker memory per agent: {out['per_agent_rss_kib']:.1f} KiB RSS")

            if idle_s > 0:
                out["idle"] = await _idle_cpu(broker.proc.pid, idle_s, fleet)
                progress(
                    f"    S9 idle: broker CPU {out['idle']['broker_cpu_pct']:.1f}% of a core "
                    f"over {idle_s:g} s (simulator {out['idle']['simulator_cpu_pct']:.0f}%)"
                )

            if idle_s > 0 and held > 0:
                out["held_idle"] = await _held_idle(
                    broker.uds, broker.proc.pid, idle_s, held, fleet
                )
                progress(
                    f"    S9 idle with {out['held_idle']['held_streams']} quiet tunnels open "
                    f"({out['held_idle']['held_refused']} refused): "
                    f"broker CPU {out['held_idle']['broker_cpu_pct']:.1f}% of a core "
                    f"(simulator {out['held_idle']['simulator_cpu_pct']:.0f}%)"
                )

            b0, s0, w0 = (
                measure.cpu_seconds(broker.proc.pid),
                simulator_cpu(fleet),
                time.monotonic(),
            )
            out["dial"] = await _dial_load(broker.uds, dial_s)
            wall = time.monotonic() - w0
            dial = out["dial"]
            broker_cpu = measure.cpu_seconds(broker.proc.pid) - b0
            sim_cpu = simulator_cpu(fleet) - s0
            dial["broker_cpu_pct"] = broker_cpu / wall * 100
            dial["simulator_cpu_pct"] = sim_cpu / wall * 100
            dial["broker_cpu_s_per_1000_dials"] = broker_cpu / max(1, dial["dials_ok"]) * 1000
            dial["simulator_cpu_s_per_1000_dials"] = sim_cpu / max(1, dial["dials_ok"]) * 1000
            progress(
                f"    S9 {dial['dials_per_s']:.0f} dials/s "
                f"(broker CPU {dial['broker_cpu_pct']:.0f}%, "
                f"{dial['broker_cpu_s_per_1000_dials']:.2f} s per 1,000 dials; "
                f"simulator {dial['simulator_cpu_pct']:.0f}%)"
            )
            if not storm:
                nursery.cancel_scope.cancel()
                return out

            # Reconnect storm after a crash-restart on the same port.
            before = (fleet.resumed, fleet.full_handshakes, fleet.shed)
            lost_before, connected_before = fleet.lost, fleet.count
            broker = broker.crash_and_restart(workdir / "broker-restarted.log")
            restarted = trio.current_time()
            sim_storm0 = simulator_cpu(fleet)
            await broker.up()
            out["storm_broker_listening_s"] = trio.current_time() - restarted
            # From the moment it listens, /healthz must keep answering.
            health: dict[str, Any] = {}
            storm_dials: dict[str, Any] = {}
            stop = trio.Event()
            nursery.start_soon(_health_probe, broker.health_port, stop, health, workdir)
            nursery.start_soon(_storm_dials, broker.uds, stop, storm_dials)
            with trio.move_on_after(storm_cap_s):
                # Every agent lost its connection to the killed broker (a
                # shard reports it within 0.1 s; the new broker may listen
                # sooner), then every one is back.
                await fleet.wait_lost(lost_before + connected_before)
                await fleet.wait_connected(n)
            out["storm_settle_s"] = trio.current_time() - restarted if fleet.count >= n else None
            out["storm_connected"] = fleet.count
            # Work, not time: the restarted broker's CPU from its start until all were back.
            out["storm_broker_cpu_s"] = measure.cpu_seconds(broker.proc.pid)
            # The simulator's share: whether the agents' side set the pace.
            storm_wall = trio.current_time() - restarted
            out["storm_simulator_cpu_pct"] = (simulator_cpu(fleet) - sim_storm0) / storm_wall * 100
            out["storm_broker_cpu_pct"] = out["storm_broker_cpu_s"] / storm_wall * 100
            stop.set()
            await trio.sleep(0.3)
            out["storm_healthz"] = health
            out["storm_dials"] = storm_dials
            out["handshake_failures"] = fleet.handshake_failures
            out["handshake_failure_kinds"] = fleet.failure_kinds
            if broker.admin_port:
                _, text = await http_get(broker.admin_port, "/metrics")
                out["broker_admission"] = [
                    line
                    for line in text.decode().splitlines()
                    if line.startswith(
                        ("tether_agent_admission_total", "tether_tls_handshakes_total")
                    )
                ]
            out["storm_tls"] = {
                "resumed": fleet.resumed - before[0],
                "full": fleet.full_handshakes - before[1],
                "shed_503": fleet.shed - before[2],
            }
            progress(
                f"    S9 reconnect storm: {fleet.count}/{n} back in "
                f"{out['storm_settle_s'] or float('nan'):.1f} s; /healthz p99 "
                f"{health.get('p99_ms', 0):.0f} ms worst {health.get('worst_ms', 0):.0f} ms, "
                f"{health.get('failed', 0)} failed; dials during it "
                f"{storm_dials.get('ok', 0)} ok {storm_dials.get('failed', 0)} failed; "
                f"CPU broker {out['storm_broker_cpu_pct']:.0f}%, "
                f"simulator {out['storm_simulator_cpu_pct']:.0f}%"
            )
            nursery.cancel_scope.cancel()
    finally:
        await fleet.stop()
        broker.proc.stop(timeout=10)
    return out


def run_blocking(
    n: int,
    workdir: Path,
    dial_s: float,
    storm_cap_s: float = 120,
    extra_args: tuple[str, ...] = (),
    ticket_key: bool = True,
    broker_source: Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    return trio.run(
        functools.partial(
            run,
            n,
            workdir,
            dial_s,
            storm_cap_s,
            print,
            extra_args,
            ticket_key,
            broker_source,
            **options,
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--dial-seconds", type=float, default=5.0)
    parser.add_argument("--storm-cap", type=float, default=120.0)
    parser.add_argument(
        "--idle-seconds", type=float, default=0.0, help="measure idle broker CPU this long"
    )
    parser.add_argument(
        "--keepalive",
        type=float,
        default=KEEPALIVE.interval,
        help="the simulated agents' keepalive interval, seconds (15: tether-agent's default)",
    )
    parser.add_argument(
        "--held-streams",
        type=int,
        default=0,
        help="with --idle-seconds, also measure idle CPU with this many quiet tunnels open",
    )
    parser.add_argument("--no-storm", action="store_true", help="skip the reconnect storm")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--no-ticket-key",
        action="store_true",
        help="no --agent-tls-ticket-key-file (a broker from before it)",
    )
    parser.add_argument(
        "--broker-flag", action="append", default=[], help="another broker flag (repeatable)"
    )
    parser.add_argument(
        "--broker-source", type=Path, help="run the broker from this checkout (PYTHONPATH)"
    )
    parser.add_argument(
        "--sim-procs",
        type=int,
        default=1,
        help="simulate the agents in this many processes (a slice each), so that one "
        "event loop does not set the pace of the whole fleet",
    )
    parser.add_argument("--shard", help=argparse.SUPPRESS)
    parser.add_argument("--shard-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shard-token-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shard-ca", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe-files", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe_loop(args.probe, *args.probe_files)
        return 0
    if args.shard:
        first, _, stop = args.shard.partition(":")
        raise_fd_limit(4 * (int(stop) - int(first)) + 1024)
        trio.run(
            run_shard,
            range(int(first), int(stop)),
            args.shard_port,
            args.shard_token_file.read_text(),
            args.shard_ca,
            args.keepalive,
        )
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="tether-s9-") as tmp:
        result = run_blocking(
            args.agents,
            Path(tmp),
            args.dial_seconds,
            args.storm_cap,
            tuple(args.broker_flag),
            not args.no_ticket_key,
            args.broker_source,
            idle_s=args.idle_seconds,
            storm=not args.no_storm,
            keepalive_s=args.keepalive,
            held=args.held_streams,
            sim_procs=args.sim_procs,
        )
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
