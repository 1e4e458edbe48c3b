"""Unix sockets per tenant and konnectivity's safe defaults (issue 11, rows
10 to 12), against real broker and agent processes.

- row 10: each cluster's frontend socket has its own owner, group and mode,
  so a process allowed into one tenant's socket is refused (EACCES) on
  another's; the clients run as other users (``setpriv``), because root
  ignores file modes.
- row 11: a live socket is never unlinked: a second broker with the same
  ``--uds-name`` refuses to start, and the first keeps its socket; only a
  stale one (left by ``kill -9``) is replaced, and a broker removes at exit
  only the socket that is still its own.
- row 12: ``/metrics`` is on the admin port (127.0.0.1 by default), not on
  the health port; with ``--uds-name`` the TCP CONNECT frontend only listens
  when ``--server-port`` is given. Listening addresses are read from
  ``/proc`` for the broker's own PID.
"""

from __future__ import annotations

import functools
import grp
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from hostile import metric, tunnel_roundtrip, wait_log
from procs import serve_echo

from tether.tools.certs import PkiPaths, init_pki
from tether.tools.launch import (
    BIN,
    BrokerHandle,
    Proc,
    free_port,
    http_get,
    start_broker,
    status_of,
    wait_for,
)

pytestmark = [pytest.mark.e2e]

#: Ids no account on the test machine has: a tenant's uid and gids.
TENANT_A_GID = 40111
TENANT_B_UID = 40112
STRANGER = 40199
SYSTEM_PYTHON = "/usr/bin/python3"


# ------------------------------------------------------------------ helpers


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A directory other users may traverse (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="tether-uds-", dir="/tmp"))
    try:
        path.chmod(0o711)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


#: A CONNECT client in plain stdlib Python, run as another user: prints the
#: errno name if connect() fails, else the status code and the answer.
CLIENT = r"""
import errno, socket, sys
path, target = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
try:
    s.connect(path)
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
    sys.exit(0)
s.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target)).encode())
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
head, _, body = data.partition(b"\r\n\r\n")
print(head.split()[1].decode(), body.decode())
"""


async def connect_as(uid: int, gid: int, path: Path, target: str) -> str:
    """Open ``path`` and CONNECT to ``target`` as ``uid``/``gid`` (no other groups)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        raise AssertionError(f"{SYSTEM_PYTHON} is needed to run a client as another user")
    with trio.fail_after(20):
        done = await trio.run_process(
            [
                "setpriv",
                f"--reuid={uid}",
                f"--regid={gid}",
                "--clear-groups",
                SYSTEM_PYTHON,
                "-c",
                CLIENT,
                str(path),
                target,
            ],
            capture_stdout=True,
            capture_stderr=True,
            cwd="/",
        )
    return bytes(done.stdout).decode().strip()


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: TCP_LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            raw = bytes.fromhex(addr_hex)
            # /proc prints the address as 32-bit words in host byte order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((socket.inet_ntop(family, raw), int(port_hex, 16)))
    return found


async def whoami_port(nursery: trio.Nursery) -> int:
    async def handler(stream: trio.SocketStream) -> None:
        try:
            await stream.send_all(b"target")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


def some_group() -> grp.struct_group:
    """An existing group other than root's, to name a group by name."""
    return next(g for g in grp.getgrall() if g.gr_gid not in (0, TENANT_A_GID))


async def exited(proc: Proc, timeout: float = 20) -> int:
    with trio.fail_after(timeout):
        while proc.alive():
            await trio.sleep(0.05)
    code = proc.popen.returncode
    assert code is not None
    return code


# ------------------------------------------------------------------ row 10


@pytest.mark.timeout(120)
async def test_each_tenant_socket_has_its_own_owner_group_and_mode(
    tmp_path: Path,
    sock_dir: Path,
    agent_factory: Callable[..., Proc],
    procs_started: list[Proc],
    nursery: trio.Nursery,
) -> None:
    pki_a = init_pki(tmp_path / "a", cluster="a", agents=("agent-1",))
    pki_b = init_pki(tmp_path / "b", cluster="b", agents=("agent-2",))
    named = some_group()
    a_sock, b_sock = sock_dir / "a.sock", sock_dir / "b.sock"
    config = tmp_path / "clusters.toml"
    config.write_text(
        f"""
[[clusters]]
name = "a"
agent_ca = "{pki_a.ca_cert}"
frontend_uds = "{a_sock}"
frontend_uds_group = {TENANT_A_GID}
frontend_uds_mode = "0660"

[[clusters]]
name = "b"
agent_ca = "{pki_b.ca_cert}"
frontend_uds = "{b_sock}"
frontend_uds_owner = "{TENANT_B_UID}"
frontend_uds_group = "{named.gr_name}"
frontend_uds_mode = 0o600
"""
    )
    broker = start_broker(
        tmp_path,
        pki_a,
        f"--config={config}",
        "--uds-name=",
        "--cluster-ca-cert=",
        "--server-port=0",
    )
    procs_started.append(broker.proc)
    await broker.up()
    agent_factory(broker, pki=pki_a, agent_id="agent-1")
    agent_factory(broker, pki=pki_b, agent_id="agent-2")
    await broker.ready(agents=2)
    target = f"127.0.0.1:{await whoami_port(nursery)}"

    # Each socket carries its own cluster's owner, group and mode.
    sa, sb = os.stat(a_sock), os.stat(b_sock)
    assert stat.S_ISSOCK(sa.st_mode) and stat.S_ISSOCK(sb.st_mode)
    assert (sa.st_uid, sa.st_gid, stat.S_IMODE(sa.st_mode)) == (os.getuid(), TENANT_A_GID, 0o660)
    assert (sb.st_uid, sb.st_gid, stat.S_IMODE(sb.st_mode)) == (TENANT_B_UID, named.gr_gid, 0o600)

    # Tenant A's group opens A's socket and is refused on B's, and the
    # reverse for tenant B's user.
    assert await connect_as(STRANGER, TENANT_A_GID, a_sock, target) == "200 target"
    assert await connect_as(STRANGER, TENANT_A_GID, b_sock, target) == "EACCES"
    assert await connect_as(TENANT_B_UID, STRANGER, b_sock, target) == "200 target"
    assert await connect_as(TENANT_B_UID, STRANGER, a_sock, target) == "EACCES"
    assert await connect_as(STRANGER, STRANGER, a_sock, target) == "EACCES"

    # Logged and exported at start-up, per socket.
    assert await wait_log(
        broker, f"frontend socket {a_sock} owner {os.getuid()} group {TENANT_A_GID} mode 0660"
    )
    assert await wait_log(
        broker, f"frontend socket {b_sock} owner {TENANT_B_UID} group {named.gr_gid} mode 0600"
    )
    text = await broker.metrics()
    for cluster, path, owner, group, mode in (
        ("a", a_sock, os.getuid(), TENANT_A_GID, "0660"),
        ("b", b_sock, TENANT_B_UID, named.gr_gid, "0600"),
    ):
        labels = {"path": str(path), "owner": str(owner), "group": str(group), "mode": mode}
        assert metric(text, "tether_frontend_socket_info", cluster=cluster, **labels) == 1
        assert metric(text, "tether_frontend_socket_owned", cluster=cluster) == 1
    assert metric(text, "tether_frontend_requests_total", frontend="uds", status="200") == 2

    # The broker keeps serving both tenants.
    for sock in (a_sock, b_sock):
        broker.uds = str(sock)
        echo = await serve_echo(nursery)
        await tunnel_roundtrip(broker, echo)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("frontend_uds_owner", '"no-such-user-t11"', "no such user 'no-such-user-t11'"),
        ("frontend_uds_group", '"no-such-group-t11"', "no such group 'no-such-group-t11'"),
        ("frontend_uds_mode", '"0999"', "an octal mode"),
        ("frontend_uds_mode", "0o1777", "0 to 0777"),
    ],
)
async def test_bad_socket_owner_group_or_mode_is_a_one_line_error(
    tmp_path: Path, pki: PkiPaths, key: str, value: str, error: str
) -> None:
    config = tmp_path / "clusters.toml"
    config.write_text(
        f'[[clusters]]\nname = "a"\nagent_ca = "{pki.ca_cert}"\n'
        f'frontend_uds = "{tmp_path / "a.sock"}"\n{key} = {value}\n'
    )
    broker = start_broker(tmp_path, pki, f"--config={config}", "--server-port=0")
    try:
        assert await exited(broker.proc) == 2
    finally:
        broker.proc.stop(timeout=5)
    log = broker.proc.log()
    (line,) = [ln for ln in log.splitlines() if error in ln]
    assert f"clusters[0].{key}" in line, log
    assert "Traceback" not in log and not (tmp_path / "a.sock").exists()


@pytest.mark.timeout(60)
async def test_flags_set_the_single_cluster_socket(
    tmp_path: Path, sock_dir: Path, pki: PkiPaths, procs_started: list[Proc]
) -> None:
    sock = sock_dir / "one.sock"
    broker = start_broker(
        tmp_path,
        pki,
        f"--uds-name={sock}",
        f"--uds-owner={TENANT_B_UID}",
        f"--uds-group={TENANT_A_GID}",
        "--uds-mode=0620",
    )
    procs_started.append(broker.proc)
    await broker.up()
    st = os.stat(sock)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (TENANT_B_UID, TENANT_A_GID, 0o620)
    bad = start_broker(tmp_path, pki, "--uds-group=no-such-group-t11")
    try:
        assert await exited(bad.proc) == 2
    finally:
        bad.proc.stop(timeout=5)
    assert "--uds-group: no such group 'no-such-group-t11'" in bad.proc.log()


# ------------------------------------------------------------------ row 11


@pytest.mark.timeout(120)
async def test_second_broker_never_takes_a_live_socket(
    tmp_path: Path,
    pki: PkiPaths,
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    first = broker_factory()
    agent_factory(first)
    await first.ready(agents=1)
    inode = os.stat(first.uds).st_ino
    echo = await serve_echo(nursery)

    second = start_broker(tmp_path, pki, f"--uds-name={first.uds}")
    try:
        code = await exited(second.proc)
    finally:
        second.proc.stop(timeout=5)
    assert code == 2
    log = second.proc.log()
    errors = [ln for ln in log.splitlines() if "ERROR" in ln or "error" in ln.lower()]
    assert [ln for ln in errors if f"socket {first.uds} in use by another process" in ln], log
    assert len(errors) == 1 and "Traceback" not in log, log

    # The first broker's socket is untouched, still its own, still served.
    st = os.stat(first.uds)
    assert stat.S_ISSOCK(st.st_mode) and st.st_ino == inode
    await tunnel_roundtrip(first, echo)
    code, body = await http_get(first.health_port, "/readyz")
    assert code == 200, body
    text = await first.metrics()
    assert metric(text, "tether_frontend_socket_owned", cluster="default") == 1
    assert metric(text, "tether_frontend_requests_total", frontend="uds", status="200") >= 1


@pytest.mark.timeout(120)
async def test_stale_socket_is_replaced_and_a_file_is_refused(
    tmp_path: Path,
    pki: PkiPaths,
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    dead = broker_factory()
    await dead.up()
    dead.proc.kill9()  # leaves its socket behind, nobody listening
    assert stat.S_ISSOCK(os.stat(dead.uds).st_mode)

    broker = broker_factory(f"--uds-name={dead.uds}")
    broker.uds = dead.uds
    agent_factory(broker)
    await broker.ready(agents=1)
    assert await wait_log(broker, f"replacing stale socket {dead.uds}")
    await tunnel_roundtrip(broker, await serve_echo(nursery))
    assert metric(await broker.metrics(), "tether_frontend_socket_owned", cluster="default") == 1

    # A file that is not a socket is never replaced.
    plain = tmp_path / "not-a-socket"
    plain.write_text("keep me")
    refused = start_broker(tmp_path, pki, f"--uds-name={plain}")
    try:
        assert await exited(refused.proc) == 2
    finally:
        refused.proc.stop(timeout=5)
    assert f"{plain} exists and is not a socket" in refused.proc.log()
    assert "Traceback" not in refused.proc.log()
    assert plain.read_text() == "keep me"


@pytest.mark.timeout(120)
async def test_broker_removes_only_its_own_socket_and_is_unready_without_it(
    tmp_path: Path,
    pki: PkiPaths,
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    first = broker_factory()
    agent_factory(first)
    await first.ready(agents=1)
    os.unlink(first.uds)  # an operator (or another program) removed it

    # Not ready without its frontend, and says so.
    async def unready() -> bool:
        return await status_of(first.health_port, "/readyz") == 503

    await wait_for(unready, 10, "first broker unready without its socket")
    assert await wait_log(first, f"frontend socket {first.uds} of cluster default is gone")
    text = await first.metrics()
    assert metric(text, "tether_frontend_socket_owned", cluster="default") == 0

    second = broker_factory(f"--uds-name={first.uds}")
    second.uds = first.uds
    agent_factory(second, agent_id="agent-2")
    await second.ready(agents=1)
    inode = os.stat(first.uds).st_ino

    # The first broker's exit leaves the second one's socket alone.
    assert first.proc.stop(timeout=15) == 0
    st = os.stat(first.uds)
    assert stat.S_ISSOCK(st.st_mode) and st.st_ino == inode
    await tunnel_roundtrip(second, await serve_echo(nursery))

    # And its own exit removes its own socket.
    assert second.proc.stop(timeout=15) == 0
    assert not os.path.exists(first.uds)


# ------------------------------------------------------------------ row 12


@pytest.mark.timeout(60)
async def test_metrics_only_on_the_loopback_admin_port(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    # start_broker gives --admin-port but no --admin-bind-address: the default.
    broker = broker_factory("--health-bind-address=")
    agent_factory(broker)
    await broker.ready(agents=1)
    code, _ = await http_get(broker.health_port, "/metrics")
    assert code == 404
    assert await status_of(broker.health_port, "/healthz") == 200
    assert await status_of(broker.health_port, "/readyz") == 200
    code, body = await http_get(broker.admin_port, "/metrics")
    assert code == 200
    assert metric(body.decode(), "konnectivity_network_proxy_server_ready_backend_connections") == 1
    ports = listening(broker.proc.pid)
    assert {a for a, p in ports if p == broker.admin_port} == {"127.0.0.1"}, ports
    assert {a for a, p in ports if p == broker.health_port} <= {"0.0.0.0", "::"}, ports
    assert await wait_log(broker, f"admin port 127.0.0.1:{broker.admin_port}")
    await tunnel_roundtrip(broker, await serve_echo(nursery))


@pytest.mark.timeout(60)
async def test_uds_alone_opens_no_tcp_frontend(
    tmp_path: Path, pki: PkiPaths, procs_started: list[Proc], nursery: trio.Nursery
) -> None:
    """A deployment that names a socket (and still has server certificates
    around) gets no TCP CONNECT frontend unless ``--server-port`` is given."""
    agent_port, health_port, admin_port = free_port(), free_port(), free_port()
    uds = tmp_path / "only.sock"
    argv = [
        str(BIN / "tether-broker"),
        f"--uds-name={uds}",
        "--agent-bind-address=127.0.0.1",
        f"--agent-port={agent_port}",
        "--health-bind-address=127.0.0.1",
        f"--health-port={health_port}",
        f"--admin-port={admin_port}",
        f"--cluster-cert={pki.broker_cert}",
        f"--cluster-key={pki.broker_key}",
        f"--cluster-ca-cert={pki.ca_cert}",
        f"--server-cert={pki.broker_cert}",
        f"--server-key={pki.broker_key}",
        f"--server-ca-cert={pki.ca_cert}",
    ]
    proc = Proc("broker", argv, tmp_path / "broker.log")
    procs_started.append(proc)
    broker = BrokerHandle(proc, agent_port, 0, health_port, str(uds), pki, admin_port)
    await broker.up()
    from tether.tools.launch import start_agent

    procs_started.append(start_agent(tmp_path, broker))
    await broker.ready(agents=1)
    ports = {p for _, p in listening(proc.pid)}
    assert ports == {agent_port, health_port, admin_port}, ports
    assert await wait_log(broker, "TCP CONNECT frontend off")
    text = await broker.metrics()
    assert metric(text, "tether_frontend_socket_owned", cluster="default") == 1
    await tunnel_roundtrip(broker, await serve_echo(nursery))


@pytest.mark.timeout(60)
async def test_agent_metrics_on_its_loopback_admin_port(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
) -> None:
    broker = broker_factory()
    health, admin = free_port(), free_port()
    agent = agent_factory(
        broker,
        "--metrics",
        "--health-server-bind-address=",
        f"--health-server-port={health}",
        f"--admin-server-port={admin}",
    )
    await broker.ready(agents=1)

    async def up() -> bool:
        return await status_of(admin, "/metrics") == 200

    await wait_for(up, 20, "agent admin port")
    assert await status_of(health, "/healthz") == 200
    assert await status_of(health, "/metrics") == 404
    code, body = await http_get(admin, "/metrics")
    assert code == 200
    assert metric(body.decode(), "konnectivity_network_proxy_agent_open_server_connections") == 1
    ports = listening(agent.pid)
    assert {a for a, p in ports if p == admin} == {"127.0.0.1"}, ports


@pytest.mark.timeout(30)
def test_tcp_frontend_default_follows_uds_name(tmp_path: Path, pki: PkiPaths) -> None:
    from broker.config import from_args

    creds = [
        f"--cluster-cert={pki.broker_cert}",
        f"--cluster-key={pki.broker_key}",
        f"--cluster-ca-cert={pki.ca_cert}",
        f"--server-cert={pki.broker_cert}",
        f"--server-key={pki.broker_key}",
        f"--server-ca-cert={pki.ca_cert}",
    ]
    uds = f"--uds-name={tmp_path / 'x.sock'}"
    assert from_args([*creds, uds], {}).server_port == 0
    assert from_args([*creds, uds, "--server-port=8090"], {}).server_port == 8090
    assert from_args([*creds, uds], {"TETHER_BROKER_SERVER_PORT": "9443"}).server_port == 9443
    cfg = from_args(creds, {})
    assert (cfg.server_port, cfg.server_bind_address) == (8090, "")
    assert (cfg.admin_port, cfg.admin_bind_address) == (8095, "127.0.0.1")
    assert (cfg.health_port, cfg.health_bind_address, cfg.agent_bind_address) == (8092, "", "")
    # A socket-only broker needs no TCP frontend certificates at all.
    assert from_args([*creds[:3], uds], {}).server_port == 0


@pytest.mark.timeout(60)
def test_brokers_starting_together_never_take_each_others_socket(tmp_path: Path) -> None:
    """Many binds at once on one stale path: exactly one wins, every other
    one is refused as "in use", and the winner's socket is still its own."""
    from concurrent.futures import ThreadPoolExecutor

    from tether.netio.listeners import UnixSocketError, UnixSocketSpec, bind_unix_socket

    path = str(tmp_path / "race.sock")
    for _ in range(300):  # without the directory lock, a double win shows within 300
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()  # a stale socket file: nobody listens

        def attempt(_: int) -> object:
            try:
                return bind_unix_socket(UnixSocketSpec(path))
            except UnixSocketError as exc:
                return str(exc)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(attempt, range(8)))
        won = [r for r in results if not isinstance(r, str)]
        assert len(won) == 1, results
        assert all(
            r == f"socket {path} in use by another process" for r in results if isinstance(r, str)
        )
        (winner,) = won
        assert winner.owned()  # type: ignore[attr-defined]
        assert winner.remove_if_owned()  # type: ignore[attr-defined]
        winner.sock.close()  # type: ignore[attr-defined]
