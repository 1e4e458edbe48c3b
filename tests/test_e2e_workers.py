"""``tether-broker --workers 2``: real supervisor and worker processes.

Each agent keeps one connection, to the worker that accepted it; dials
through the one frontend socket (CONNECT, gRPC) and the TLS TCP frontend (curl)
reach agents of either worker with checked data; a worker killed
with SIGKILL is restarted while the other worker's tunnels keep flowing;
SIGTERM drains every worker and the supervisor exits 0. Hostile: a local
process that is not a worker gets nothing from a worker channel and is
counted; a dial of another cluster is still refused.
"""

from __future__ import annotations

import array
import functools
import hashlib
import json
import os
import random
import re
import socket
import socketserver
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import grpc
import pytest
import trio
from grpc_client import data_pkt, open_call
from hostile import metric
from procs import BrokerHandle, Proc, connect_tunnel, http_get, wait_for
from test_e2e_connect import curl_tcp_frontend

from protocol import konnectivity_pb2 as pb
from protocol import workers as wp
from tether.tools.certs import PkiPaths, init_pki
from tether.tools.launch import start_agent, start_broker

pytestmark = [pytest.mark.e2e]

AGENTS = 8
BLOB = 200_000
WORKER_FLAGS = ("--workers=2", "--agent-identifiers-policy=any", "--proxy-strategies=destHost")


def address(i: int) -> str:
    return f"127.0.0.{40 + i}"


def blob(i: int) -> bytes:
    return random.Random(i).randbytes(BLOB)


class _Target(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Handler(socketserver.BaseRequestHandler):
    """An HTTP GET answers the address's blob; anything else is echoed."""

    def handle(self) -> None:
        conn: socket.socket = self.request
        first = conn.recv(65536)
        if first.startswith(b"GET "):
            while b"\r\n\r\n" not in first:
                more = conn.recv(65536)
                if not more:
                    return
                first += more
            body = blob(int(self.server.server_address[0].rsplit(".", 1)[1]) - 40)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                + body
            )
            return
        data = first
        while data:
            conn.sendall(data)
            data = conn.recv(65536)


@pytest.fixture(scope="module")
def targets() -> Iterator[dict[int, int]]:
    """A target on each agent's own address; its port by agent index."""
    servers = [_Target((address(i), 0), _Handler) for i in range(AGENTS)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield {i: s.server_address[1] for i, s in enumerate(servers)}
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture(scope="module")
def wpki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("wpki"), agents=tuple(f"w{i}" for i in range(AGENTS)))


#: The agents start_host started, by the host's socket path: agent id -> its
#: process, and how to start it again (owners() may move one to a new port).
_HOST_AGENTS: dict[str, dict[str, tuple[Proc, Callable[[], Proc]]]] = {}


def start_host(
    tmp: Path, pki: PkiPaths, procs: list[Proc], *extra: str, mode: str = "http-connect"
) -> BrokerHandle:
    broker = start_broker(tmp, pki, *WORKER_FLAGS, *extra, mode=mode)
    procs.append(broker.proc)
    agents: dict[str, tuple[Proc, Callable[[], Proc]]] = {}
    for i in range(AGENTS):

        def start(i: int = i) -> Proc:
            proc = start_agent(
                tmp, broker, f"--agent-identifiers=ipv4={address(i)}", agent_id=f"w{i}"
            )
            procs.append(proc)  # stopped at teardown, by its own PID
            return proc

        agents[f"w{i}"] = (start(), start)
    _HOST_AGENTS[broker.uds] = agents
    return broker


async def admin_json(broker: BrokerHandle, path: str) -> list[dict[str, object]]:
    code, body = await http_get(broker.admin_port, path)
    assert code == 200, (code, body)
    rows: list[dict[str, object]] = json.loads(body)
    return rows


async def owners(
    broker: BrokerHandle, count: int = AGENTS, *, spread: bool = True
) -> dict[str, int]:
    """Agent id -> worker, once every agent shows on the host's /agents;
    ``spread``: both workers own some. Which worker takes a connection is
    the kernel's hash of its source port (8 agents all on one worker: 1 in
    128), not what these tests are about: when that happens, one agent of a
    start_host host is restarted, so it connects from a new port, up to 10
    times."""
    found: dict[str, int] = {}

    async def all_listed() -> bool:
        rows = await admin_json(broker, "/agents")
        found.clear()
        found.update({str(r["agent_id"]): int(str(r["worker"])) for r in rows})
        return len(found) == count

    agents = _HOST_AGENTS.get(broker.uds, {})
    for attempt in range(10):
        await broker.ready(agents=count, timeout=60)
        await wait_for(all_listed, 30, f"{count} agents on the host's /agents")
        if not spread or set(found.values()) == {0, 1} or not agents:
            break
        agent_id = sorted(agents)[attempt % len(agents)]
        proc, start = agents[agent_id]
        proc.stop(timeout=10)

        async def gone(agent_id: str = agent_id) -> bool:
            rows = await admin_json(broker, "/agents")
            return all(str(r["agent_id"]) != agent_id for r in rows)

        await wait_for(gone, 30, f"agent {agent_id} off the host's /agents")
        agents[agent_id] = (start(), start)
    if spread:
        assert set(found.values()) == {0, 1}, found
    return found


async def worker_pids(broker: BrokerHandle) -> dict[int, int]:
    return {int(str(r["worker"])): int(str(r["pid"])) for r in await admin_json(broker, "/workers")}


async def host_metric(broker: BrokerHandle, name: str, **labels: str) -> float:
    return metric(await broker.metrics(), name, **labels)


async def curl_tcp(broker: BrokerHandle, target: str) -> bytes:
    """GET through the TCP mTLS CONNECT frontend with real curl."""
    result = await curl_tcp_frontend(broker, f"http://{target}/")
    assert result.returncode == 0, result.stderr
    return bytes(result.stdout)


async def get_via_uds(broker: BrokerHandle, target: str) -> bytes:
    """GET through a CONNECT tunnel on the frontend Unix socket."""
    with trio.fail_after(30):
        tunnel = await connect_tunnel(broker, target, via="uds")
        try:
            assert tunnel.status == 200, (tunnel.status, tunnel.body)
            await tunnel.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            response = await tunnel.read_all()
        finally:
            await tunnel.aclose()
    return response.partition(b"\r\n\r\n")[2]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")


# ------------------------------------------------------------------ dials


@pytest.mark.timeout(240)
async def test_dials_reach_agents_of_either_worker_and_sigterm_drains(
    tmp_path: Path, wpki: PkiPaths, procs_started: list[Proc], targets: dict[int, int]
) -> None:
    broker = start_host(tmp_path, wpki, procs_started)
    owner = await owners(broker)
    for round_ in range(2):
        for i in range(AGENTS):
            target = f"{address(i)}:{targets[i]}"
            assert digest(await get_via_uds(broker, target)) == digest(blob(i)), (round_, i)
            assert digest(await curl_tcp(broker, target)) == digest(blob(i)), (round_, i)

    # The frontend socket's connections landed on both workers: some were
    # handed to the owner (SCM_RIGHTS) and some TLS dials relayed to it.
    await trio.sleep(1.5)  # the supervisor scrapes its workers each second
    name = "tether_broker_worker_handovers_total"
    sent = await host_metric(broker, name, kind="uds", result="sent")
    received = await host_metric(broker, name, kind="uds", result="received")
    assert sent >= 1 and received == sent, (sent, received)
    assert await host_metric(broker, name, kind="relay", result="received") >= 1
    # Each agent holds one connection to the host (to its owner).
    assert len(owner) == AGENTS
    assert "identity_in_use" not in broker.proc.log()

    pids = await worker_pids(broker)
    assert broker.proc.stop(timeout=30) == 0
    assert all(gone(pid) for pid in pids.values()), pids
    assert not Path(broker.uds).exists()
    assert broker.proc.log().count("broker stopped") == 2  # each worker drained


@pytest.mark.timeout(240)
def test_grpc_dials_reach_agents_of_either_worker(
    tmp_path: Path, wpki: PkiPaths, procs_started: list[Proc], targets: dict[int, int]
) -> None:
    broker = start_host(tmp_path, wpki, procs_started, mode="grpc")
    owner = trio.run(owners, broker)
    with grpc.insecure_channel(f"unix:{broker.uds}") as channel:
        for round_ in range(2):
            for i in range(AGENTS):
                with open_call(channel) as call:
                    rsp = call.dial(f"{address(i)}:{targets[i]}", random=i + 1)
                    assert rsp.connectID and not rsp.error, rsp
                    call.send(data_pkt(rsp.connectID, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"))
                    got = b""
                    while True:
                        pkt = call.recv(20)
                        if pkt is None or pkt.type != pb.DATA:
                            break
                        got += pkt.data.data
                        if len(got.partition(b"\r\n\r\n")[2]) >= BLOB:
                            break
                    assert digest(got.partition(b"\r\n\r\n")[2]) == digest(blob(i)), (round_, i)
    # One gRPC connection, on one worker: every dial to the other worker's
    # agents was relayed to their owner.
    time.sleep(1.5)  # the supervisor scrapes its workers each second
    relayed = trio.run(
        functools.partial(
            host_metric, broker, "tether_broker_worker_handovers_total", kind="relay", result="sent"
        )
    )
    assert relayed >= 2 * min(Counter(owner.values()).values()), (relayed, owner)
    assert broker.proc.stop(timeout=30) == 0


# ---------------------------------------------------------------- crashes


@pytest.mark.timeout(240)
async def test_killed_worker_restarts_while_the_other_keeps_flowing(
    tmp_path: Path, wpki: PkiPaths, procs_started: list[Proc], targets: dict[int, int]
) -> None:
    broker = start_host(tmp_path, wpki, procs_started)
    owner = await owners(broker)
    survivor_agent = min(int(a[1:]) for a, w in owner.items() if w == 0)
    tunnel = await connect_tunnel(
        broker, f"{address(survivor_agent)}:{targets[survivor_agent]}", via="uds"
    )
    assert tunnel.status == 200

    async def echo(n: int) -> None:
        payload = os.urandom(n)
        await tunnel.send_all(payload)
        got = b""
        with trio.fail_after(15):
            while len(got) < n:
                chunk = await tunnel.receive_some()
                assert chunk, "tunnel closed"
                got += chunk
        assert digest(got) == digest(payload)

    await echo(50_000)
    pids = await worker_pids(broker)
    restarts = await host_metric(broker, "tether_broker_worker_restarts_total")
    os.kill(pids[1], 9)
    # The other worker's tunnel keeps flowing during the restart.
    for _ in range(5):
        await echo(50_000)
        await trio.sleep(0.2)

    async def restarted() -> bool:
        now = await worker_pids(broker)
        return now[1] not in (0, pids[1]) and now[0] == pids[0]

    await wait_for(restarted, 30, "worker 1 restarted")
    assert await host_metric(broker, "tether_broker_worker_restarts_total") == restarts + 1
    assert "worker 1 exited" in broker.proc.log()
    # Every agent is back: the survivor took those that reconnected before
    # the restart (SO_REUSEPORT spreads only over listening workers).
    await owners(broker, spread=False)
    await echo(50_000)
    await tunnel.aclose()
    for i in range(AGENTS):
        target = f"{address(i)}:{targets[i]}"
        assert digest(await get_via_uds(broker, target)) == digest(blob(i)), i
    assert broker.proc.stop(timeout=30) == 0


# ---------------------------------------------------------------- hostile


@pytest.mark.timeout(180)
async def test_channel_refuses_a_local_process_that_is_not_a_worker(
    tmp_path: Path, wpki: PkiPaths, procs_started: list[Proc], targets: dict[int, int]
) -> None:
    broker = start_host(tmp_path, wpki, procs_started)
    await owners(broker)
    found = re.search(r"worker channels in (\S+)", broker.proc.log())
    assert found, "the supervisor logs its channel directory"
    channels = Path(found.group(1))
    assert stat.S_IMODE(channels.stat().st_mode) == 0o700
    assert stat.S_IMODE((channels / "worker-0.sock").stat().st_mode) == 0o600
    before = await host_metric(
        broker, "tether_bad_input_total", source="worker_channel", reason="peer_not_worker"
    )
    # Same uid, but not a child of the supervisor: a forged hand-over of a
    # socket whose other end we hold, asking for a dial to agent 0's target.
    for worker in (0, 1):
        mine, theirs = socket.socketpair()
        request = f"CONNECT {address(0)}:{targets[0]} HTTP/1.1\r\n\r\n".encode()
        forged = wp.encode(wp.Handover("default", "uds", request))
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(channels / f"worker-{worker}.sock"))
            fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno()]))]
            try:
                s.sendmsg([forged], fds)
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed before we could send: also nothing served
            theirs.close()
            s.settimeout(5)
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
        mine.settimeout(1.5)
        try:
            answer = mine.recv(100)
        except TimeoutError:
            answer = b"(nothing)"
        assert answer in (b"", b"(nothing)"), answer  # no dial was served
        mine.close()

    async def counted() -> bool:
        now = await host_metric(
            broker, "tether_bad_input_total", source="worker_channel", reason="peer_not_worker"
        )
        return now >= before + 2

    await wait_for(counted, 10, "the refused channel clients counted")
    assert "not a worker of this broker" in broker.proc.log()
    # Real traffic is unaffected.
    assert digest(await get_via_uds(broker, f"{address(0)}:{targets[0]}")) == digest(blob(0))


@pytest.mark.timeout(240)
async def test_dial_of_another_cluster_is_refused_with_workers(
    tmp_path: Path, targets: dict[int, int], procs_started: list[Proc]
) -> None:
    pki_a = init_pki(tmp_path / "a", cluster="tenant-a", agents=("a0",))
    pki_b = init_pki(
        tmp_path / "b", cluster="tenant-b", agents=tuple(f"w{i}" for i in range(AGENTS))
    )
    config = tmp_path / "clusters.toml"
    config.write_text(
        f"""
[[clusters]]
name = "tenant-a"
agent_ca = "{pki_a.ca_cert}"
frontend_uds = "{tmp_path / "a.sock"}"
agent_identifiers = "any"

[[clusters]]
name = "tenant-b"
agent_ca = "{pki_b.ca_cert}"
frontend_uds = "{tmp_path / "b.sock"}"
agent_identifiers = "any"
"""
    )
    broker = start_broker(
        tmp_path,
        pki_a,
        *WORKER_FLAGS,
        f"--config={config}",
        "--cluster-ca-cert=",
        "--uds-name=",
        "--server-port=0",
    )
    procs_started.append(broker.proc)
    for i in range(AGENTS):
        procs_started.append(
            start_agent(
                tmp_path,
                broker,
                f"--agent-identifiers=ipv4={address(i)}",
                agent_id=f"w{i}",
                pki=pki_b,
            )
        )
    await owners(broker)
    for i in range(AGENTS):
        target = f"{address(i)}:{targets[i]}"
        b_side = attrs.evolve(broker, uds=str(tmp_path / "b.sock"))
        assert digest(await get_via_uds(b_side, target)) == digest(blob(i)), i
        a_side = attrs.evolve(broker, uds=str(tmp_path / "a.sock"))
        tunnel = await connect_tunnel(a_side, target, via="uds")
        await tunnel.aclose()
        assert tunnel.status == 503, (tunnel.status, tunnel.body)
        assert b"no agent" in tunnel.body, tunnel.body
    await trio.sleep(1.5)  # the supervisor scrapes its workers each second
    refused = await host_metric(
        broker, "konnectivity_network_proxy_server_dial_failure_count_total", reason="no_agent"
    )
    assert refused >= AGENTS
    assert broker.proc.stop(timeout=30) == 0


# ------------------------------------------------------------ start-up


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["0", "65", "many"])
def test_bad_workers_value_is_a_one_line_error(tmp_path: Path, pki: PkiPaths, value: str) -> None:
    broker = start_broker(tmp_path, pki, f"--workers={value}")
    assert broker.proc.popen.wait(30) == 2
    assert "--workers" in broker.proc.log()
    broker.proc.stop()


@pytest.mark.timeout(90)
async def test_agent_port_taken_stops_the_host_with_exit_2(tmp_path: Path, pki: PkiPaths) -> None:
    """A worker's start-up error is not retried forever: the supervisor
    stops every worker, removes the socket and exits 2."""
    with socket.socket() as squatter:  # no SO_REUSEPORT: the port is not shareable
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = start_broker(tmp_path, pki, "--workers=2", f"--agent-port={port}")
        try:
            code = await trio.to_thread.run_sync(broker.proc.popen.wait, 60)
        finally:
            broker.proc.stop()
    log = broker.proc.log()
    assert code == 2, log[-2000:]
    assert "cannot listen on the agent port" in log
    assert "could not start" in log
    assert not Path(broker.uds).exists()
    children = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    for p in children:
        try:
            ppid = int(p.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        assert ppid != broker.proc.pid, "a worker outlived its supervisor"


@pytest.mark.timeout(120)
async def test_same_id_with_another_credential_on_another_worker_loses(
    tmp_path: Path, pki: PkiPaths, procs_started: list[Proc]
) -> None:
    """The host's registry view: an agent id live on one worker cannot be
    taken by another credential through the other worker either."""

    def token_line(token: str) -> str:
        return f"sha256:{hashlib.sha256(token.encode()).hexdigest()} default dup\n"

    tokens = tmp_path / "tokens"
    tokens.write_text(token_line("token-one") + token_line("token-two"))
    broker = start_broker(tmp_path, pki, "--workers=2", f"--agent-token-file={tokens}")
    procs_started.append(broker.proc)
    (tmp_path / "one").write_text("token-one\n")
    (tmp_path / "two").write_text("token-two\n")
    first = start_agent(
        tmp_path,
        broker,
        f"--service-account-token-path={tmp_path / 'one'}",
        agent_id="dup",
        client_cert=False,
    )
    procs_started.append(first)
    await owners(broker, 1, spread=False)
    (live,) = await admin_json(broker, "/agents")
    second = start_agent(
        tmp_path,
        broker,
        f"--service-account-token-path={tmp_path / 'two'}",
        "--sync-interval=0.2",
        "--sync-interval-cap=0.5",
        agent_id="dup",
        client_cert=False,
    )
    procs_started.append(second)

    async def evicted_on_the_other_worker() -> bool:
        # Each retry comes from a new source port: SO_REUSEPORT sends one
        # to the other worker soon (ten retries on one worker: 1 in 1024).
        return "identity_in_use on another worker" in broker.proc.log()

    await wait_for(evicted_on_the_other_worker, 60, "the newcomer evicted by the other worker")
    await trio.sleep(1.5)  # a scrape
    rows = await admin_json(broker, "/agents")
    assert [(r["agent_id"], r["remote"], r["worker"]) for r in rows] == [
        ("dup", live["remote"], live["worker"])
    ], rows
    assert "replaced" not in first.log()
    rejected = await host_metric(
        broker, "tether_agent_connections_rejected_total", reason="identity_in_use"
    )
    assert rejected >= 1
