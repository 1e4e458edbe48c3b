"""sd_notify without libsystemd, against real AF_UNIX datagram sockets: the
module on its own, and the real ``tether-agent`` process as systemd would
run it (``Type=notify`` with a watchdog)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from procs import BrokerHandle, Proc

from edge_agent import sdnotify


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="sdn-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def receiver(short_dir: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket and its ``$NOTIFY_SOCKET`` value (a path)."""
    path = str(short_dir / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram queued right now, without waiting."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2)
    return out


# ------------------------------------------------------------------ messages


@pytest.mark.timeout(10)
def test_each_message_arrives_as_one_datagram(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    n = sdnotify.Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready()
    assert n.status("connected to all brokers (1/1): b1")
    assert n.watchdog()
    assert n.stopping()
    got = [sock.recv(4096) for _ in range(4)]
    assert got == [
        b"READY=1",
        b"STATUS=connected to all brokers (1/1): b1",
        b"WATCHDOG=1",
        b"STOPPING=1",
    ]


@pytest.mark.timeout(10)
def test_abstract_namespace_socket() -> None:
    name = f"tether-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        n = sdnotify.Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        assert n.enabled
        assert n.ready()
        assert n.status("hello")
        assert sock.recv(4096) == b"READY=1"
        assert sock.recv(4096) == b"STATUS=hello"


@pytest.mark.timeout(10)
def test_status_stays_on_one_line(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    sdnotify.Notifier(path).status("two\nlines\tand  tabs")
    assert sock.recv(4096) == b"STATUS=two lines and tabs"


@pytest.mark.timeout(10)
def test_without_systemd_everything_is_a_no_op(short_dir: Path) -> None:
    n = sdnotify.Notifier.from_environment({})
    assert not n.enabled
    assert not n.ready() and not n.status("x") and not n.stopping() and not n.watchdog()
    # Garbage is ignored rather than trusted.
    for bad in ("relative/path", "@", "vsock:2:1234"):
        assert not sdnotify.Notifier(bad).enabled
    # A socket that went away loses the message; the caller never sees an error.
    gone = sdnotify.Notifier(str(short_dir / "nobody-listens"))
    assert gone.enabled and not gone.ready()


@pytest.mark.timeout(10)
def test_a_full_receiver_never_blocks_the_sender(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    n = sdnotify.Notifier(path)
    started = time.monotonic()
    results = [n.watchdog() for _ in range(5000)]
    assert time.monotonic() - started < 5
    assert results[0] and not all(results), "the queue should have overflowed"
    assert drain(sock)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_timeout_from_environment(env: dict[str, str], expected: float | None) -> None:
    assert sdnotify.watchdog_timeout(env) == expected


# ------------------------------------------------------------------ watchdog


@pytest.mark.timeout(10)
async def test_watchdog_pings_stop_while_the_loop_is_wedged(
    receiver: tuple[str, socket.socket],
) -> None:
    path, sock = receiver
    n = sdnotify.Notifier(path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sdnotify.run_watchdog, n, {"WATCHDOG_USEC": "100000"})
        await trio.sleep(0.5)
        healthy = drain(sock)
        assert 5 <= len(healthy) <= 15 and set(healthy) == {b"WATCHDOG=1"}
        # A blocking call inside the loop: nothing may ping for the whole time
        # (a helper thread would, and keep a wedged agent alive).
        time.sleep(0.6)  # wedging the loop is the point
        assert drain(sock) == []
        await trio.sleep(0.3)
        assert len(drain(sock)) >= 2, "pings resume once the loop runs again"
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(10)
async def test_watchdog_is_off_unless_asked_for_this_process(
    receiver: tuple[str, socket.socket],
) -> None:
    path, sock = receiver
    n = sdnotify.Notifier(path)
    with trio.fail_after(1):  # returns at once instead of looping
        await sdnotify.run_watchdog(n, {})
        await sdnotify.run_watchdog(n, {"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"})
        await sdnotify.run_watchdog(sdnotify.Notifier(None), {"WATCHDOG_USEC": "100000"})
    assert drain(sock) == []


# ------------------------------------------------------------- the real agent


class Inbox:
    """The service manager's end: every line the agent sent, in order."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.lines: list[str] = []
        self.procs: list[Proc] = []  # whose logs explain a failure

    async def collect(self, seconds: float) -> list[str]:
        new: list[str] = []
        with trio.move_on_after(seconds):
            while True:
                new += (await self.sock.recv(4096)).decode().splitlines()
        self.lines += new
        return new

    async def wait_for(self, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
        with trio.move_on_after(timeout):
            while True:
                for line in (await self.sock.recv(4096)).decode().splitlines():
                    self.lines.append(line)
                    if predicate(line):
                        return line
        logs = "".join(f"\n--- {p.name}\n{p.log()[-4000:]}" for p in self.procs)
        raise AssertionError(f"no {what} within {timeout}s; got {self.lines[-20:]}{logs}")


@pytest.mark.e2e
@pytest.mark.timeout(60)
async def test_agent_under_a_notify_socket(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    short_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = broker_factory()
    await broker.up()
    path = str(short_dir / "notify")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(path)
    inbox = Inbox(sock)
    # The agent inherits these, as it would from systemd (WatchdogSec=0.4).
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    stopped: list[Proc] = []
    try:
        # A frozen broker accepts TCP but never finishes the handshake, so
        # the agent runs for a while without a connection: no READY yet.
        broker.proc.signal(signal.SIGSTOP)
        stopped.append(broker.proc)
        agent = agent_factory(broker)
        inbox.procs += [agent, broker.proc]
        await inbox.wait_for(lambda s: s == "WATCHDOG=1", 15, "first watchdog ping")
        early = await inbox.collect(1.0)
        assert "READY=1" not in inbox.lines, agent.log()
        assert "STATUS=not connected to a broker (0/1)" in inbox.lines
        assert early.count("WATCHDOG=1") >= 2, "pings (every 0.2s) while not connected"

        broker.proc.signal(signal.SIGCONT)
        stopped.remove(broker.proc)
        await inbox.wait_for(lambda s: s == "READY=1", 20, "READY=1 after connecting")
        status = await inbox.wait_for(lambda s: s.startswith("STATUS=connected"), 5, "status")
        assert status.startswith("STATUS=connected to all brokers (1/1): ")

        # A frozen agent stops pinging: systemd's watchdog would fire.
        agent.signal(signal.SIGSTOP)
        stopped.append(agent)
        await inbox.collect(0.2)  # whatever was already under way
        assert await inbox.collect(1.0) == []
        agent.signal(signal.SIGCONT)
        stopped.remove(agent)
        await inbox.wait_for(lambda s: s == "WATCHDOG=1", 2, "pings after SIGCONT")

        agent.signal(signal.SIGTERM)
        await inbox.wait_for(lambda s: s == "STOPPING=1", 10, "STOPPING=1 on SIGTERM")
        assert "STATUS=draining" in await inbox.collect(0.3) + inbox.lines
        with trio.fail_after(15):
            while agent.alive():
                await trio.sleep(0.05)
        assert agent.popen.returncode == 0, agent.log()
        assert inbox.lines.count("READY=1") == 1
    finally:
        for proc in stopped:
            proc.signal(signal.SIGCONT)
        sock.close()
