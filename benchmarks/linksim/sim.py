"""``LinkSim``: two namespaces joined by the emulated link, as a context manager.

Everything created is recorded before it is created and torn down in reverse
order by ``close()``, which runs on normal exit, on exceptions (including
KeyboardInterrupt), at interpreter exit, and on SIGTERM/SIGHUP when nobody else
handles them.  A process killed with SIGKILL leaves namespaces behind; the next
``LinkSim`` (or ``python -m benchmarks.linksim cleanup``) removes those whose
owner pid is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from .netns import (
    DEFAULT_PREFIX,
    FORWARDER_MODULE,
    LinkSimError,
    LinkSimUnavailable,
    check_available,
    cleanup_stale,
    create_tap,
    delete_namespace,
    ip,
    socket_in_netns,
    write_sysctl_in_netns,
)
from .profiles import DIRECTIONS, LinkProfile, load_profile

Side = Literal["cloud", "edge"]
DirectionOrBoth = Literal["both", "cloud_to_edge", "edge_to_cloud"]

#: Addresses inside the namespaces (RFC 2544 benchmarking range 198.18.0.0/15).
CLOUD_ADDR = "198.18.0.1"
EDGE_ADDR = "198.18.0.2"
#: Where the edge moves to in the mobility scenario (S10): another /30.
MOVED_EDGE_ADDR = "198.18.0.6"
MOVED_SUBNET = "198.18.0.4/30"
PREFIX_LEN = 30
CLOUD_MAC = "02:00:c6:12:00:01"
EDGE_MAC = "02:00:c6:12:00:02"
#: Name of the emulated interface inside each namespace.
IFACE = "link0"
LOOPBACK_ADDR = "127.0.0.1"

_REPO_ROOT = Path(__file__).resolve().parents[2]
_counter = itertools.count()
_live: list[LinkSim] = []
_live_lock = threading.Lock()
_prev_handlers: dict[int, Any] = {}


def _close_all_live() -> None:
    for sim in list(_live):
        with contextlib.suppress(Exception):
            sim.close()


atexit.register(_close_all_live)


def _on_terminate(signum: int, frame: types.FrameType | None) -> None:
    # Unwind through the `with` blocks so every LinkSim cleans up in order.
    raise SystemExit(128 + signum)


def _register(sim: LinkSim) -> None:
    with _live_lock:
        _live.append(sim)
        if len(_live) == 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(sig) is signal.SIG_DFL:
                    _prev_handlers[sig] = signal.signal(sig, _on_terminate)


def _unregister(sim: LinkSim) -> None:
    with _live_lock:
        if sim in _live:
            _live.remove(sim)
        if not _live and threading.current_thread() is threading.main_thread():
            for sig, prev in list(_prev_handlers.items()):
                if signal.getsignal(sig) is _on_terminate:
                    signal.signal(sig, prev)
                del _prev_handlers[sig]


class LinkSim:
    """Namespaces ``cloud_ns`` and ``edge_ns`` (addresses ``cloud_addr`` and
    ``edge_addr``) joined by a forwarder process that applies ``profile``.

    With a non-emulated profile (``loopback``) nothing is created: both sides
    are 127.0.0.1 in the current namespace, ``run_in`` runs commands directly,
    and link controls raise :class:`LinkSimUnavailable`.
    """

    def __init__(
        self,
        profile: LinkProfile | str,
        seed: int = 0,
        *,
        prefix: str = DEFAULT_PREFIX,
        link_time: float = 0.0,
        forwarder_nice: int | None = None,
        startup_timeout_s: float = 10.0,
    ) -> None:
        self.profile = load_profile(profile) if isinstance(profile, str) else profile
        self.seed = seed
        self.prefix = prefix
        self.emulated = self.profile.emulate
        self._initial_link_time = link_time
        self._nice = forwarder_nice
        self._startup_timeout_s = startup_timeout_s
        n = next(_counter)
        pid = os.getpid()
        self.cloud_ns: str | None = f"{prefix}-cloud-{pid}-{n}" if self.emulated else None
        self.edge_ns: str | None = f"{prefix}-edge-{pid}-{n}" if self.emulated else None
        self.cloud_addr = CLOUD_ADDR if self.emulated else LOOPBACK_ADDR
        self.edge_addr = EDGE_ADDR if self.emulated else LOOPBACK_ADDR
        self.forwarder_pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._children: list[subprocess.Popen[Any]] = []
        self._created_ns: list[str] = []
        self._rbuf = b""
        self._ctl_lock = threading.Lock()
        self._started = False
        self._closed = False
        self._base_mono = time.monotonic()
        self._base_link = link_time

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "new"
        return f"<LinkSim {self.profile.name} {self.cloud_ns}<->{self.edge_ns} {state}>"

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> LinkSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> LinkSim:
        if self._started or self._closed:
            raise LinkSimError("a LinkSim can be started once")
        self._started = True
        if not self.emulated:
            return self
        check_available()
        cleanup_stale(self.prefix)
        _register(self)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def _setup(self) -> None:
        assert self.cloud_ns is not None and self.edge_ns is not None
        mtu = self.profile.mtu
        sides = (
            (self.cloud_ns, CLOUD_ADDR, CLOUD_MAC, EDGE_ADDR, EDGE_MAC),
            (self.edge_ns, EDGE_ADDR, EDGE_MAC, CLOUD_ADDR, CLOUD_MAC),
        )
        fds: list[int] = []
        try:
            for ns, addr, mac, peer_addr, peer_mac in sides:
                self._created_ns.append(ns)
                ip("netns", "add", ns)
                # No IPv6: no DAD/RS/MLD chatter crossing the emulated link.
                # Ping sockets for any group, as most distributions configure.
                write_sysctl_in_netns(
                    ns,
                    {
                        "net.ipv6.conf.all.disable_ipv6": "1",
                        "net.ipv6.conf.default.disable_ipv6": "1",
                        "net.ipv4.ping_group_range": "0 2147483647",
                    },
                )
                ip("-n", ns, "link", "set", "dev", "lo", "up")
                fd, tap = create_tap()
                fds.append(fd)
                ip("link", "set", "dev", tap, "netns", ns)
                ip("-n", ns, "link", "set", "dev", tap, "name", IFACE)
                ip("-n", ns, "link", "set", "dev", IFACE, "address", mac, "mtu", str(mtu))
                ip("-n", ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", IFACE)
                ip("-n", ns, "link", "set", "dev", IFACE, "up")
                # Static neighbour: no ARP, so loss never delays resolution.
                ip(
                    *("-n", ns, "neigh", "replace", peer_addr, "lladdr", peer_mac),
                    *("dev", IFACE, "nud", "permanent"),
                )
            self._spawn_forwarder(fds[0], fds[1])
        finally:
            for fd in fds:
                os.close(fd)

    def _spawn_forwarder(self, cloud_fd: int, edge_fd: int) -> None:
        cfg = {
            "profile": self.profile.to_json(),
            "seed": self.seed,
            "link_time": self._initial_link_time,
            "nice": self._nice,
        }
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        assert self.cloud_ns is not None
        argv = [
            sys.executable,
            "-m",
            FORWARDER_MODULE,
            "--tag",
            self.cloud_ns,
            "--owner",
            str(os.getpid()),
            "--cloud-fd",
            str(cloud_fd),
            "--edge-fd",
            str(edge_fd),
            "--config",
            json.dumps(cfg),
        ]
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(cloud_fd, edge_fd),
            env=env,
        )
        self.forwarder_pid = self._proc.pid
        ready = self._read_reply(self._startup_timeout_s)
        if not ready.get("ready"):
            raise LinkSimError(f"forwarder did not start: {ready}")
        self._set_base(ready)

    def close(self) -> None:
        """Stop children, the forwarder and delete the namespaces.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for p in self._children:
            _stop_process(p)
        if self._proc is not None:
            proc = self._proc
            with contextlib.suppress(OSError):
                if proc.stdin:
                    proc.stdin.close()  # EOF: the forwarder exits, its TAPs vanish
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        for ns in reversed(self._created_ns):
            try:
                delete_namespace(ns)
            except Exception as e:
                errors.append(str(e))
        _unregister(self)
        if errors:
            raise LinkSimError("; ".join(errors))

    # -- running things on either side ---------------------------------------------

    def namespace(self, side: Side) -> str | None:
        if side not in ("cloud", "edge"):
            raise ValueError(f"side must be 'cloud' or 'edge', not {side!r}")
        return self.cloud_ns if side == "cloud" else self.edge_ns

    def addr(self, side: Side) -> str:
        self.namespace(side)
        return self.cloud_addr if side == "cloud" else self.edge_addr

    def exec_prefix(self, side: Side) -> list[str]:
        """argv prefix that runs a command on ``side`` (empty for loopback)."""
        ns = self.namespace(side)
        return [] if ns is None else ["ip", "netns", "exec", ns]

    def run_in(self, side: Side, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in the namespace of ``side``.  The process is stopped
        (SIGTERM, then SIGKILL) by ``close()`` if it is still running."""
        self._require_running()
        proc: subprocess.Popen[Any] = subprocess.Popen(
            [*self.exec_prefix(side), *argv], **popen_kwargs
        )
        self._children = [p for p in self._children if p.poll() is None]
        self._children.append(proc)
        return proc

    def socket(
        self,
        side: Side,
        family: int = socket.AF_INET,
        type: int = socket.SOCK_STREAM,
        proto: int = 0,
    ) -> socket.socket:
        """A socket living in ``side``'s namespace, created from this process."""
        self._require_running()
        ns = self.namespace(side)
        if ns is None:
            return socket.socket(family, type, proto)
        return socket_in_netns(ns, family, type, proto)

    # -- link control -------------------------------------------------------------------

    def set_down(self, down: bool = True, direction: DirectionOrBoth = "both") -> None:
        """Force the link (or one direction) down or back up.  While down every
        frame is dropped, including those already queued or in flight.  Returns
        once the forwarder has applied it."""
        if direction != "both" and direction not in DIRECTIONS:
            raise ValueError(f"bad direction {direction!r}")
        self._request({"cmd": "down", "down": down, "direction": direction})

    def move_edge(self) -> float:
        """Mobility (S10): the edge's address changes, as when a device
        changes networks. The old address is removed, the other one of
        ``EDGE_ADDR`` and ``MOVED_EDGE_ADDR`` (each its own /30) added and
        the edge's default route moved to it; the cloud routes both. Returns
        ``time.monotonic()`` once the new address and route are up."""
        assert self.cloud_ns is not None and self.edge_ns is not None, "needs emulation"
        old = self.edge_addr
        new = MOVED_EDGE_ADDR if old == EDGE_ADDR else EDGE_ADDR
        cloud, edge = self.cloud_ns, self.edge_ns
        # The cloud reaches both subnets over the link, with no ARP (static).
        ip("-n", cloud, "route", "replace", MOVED_SUBNET, "dev", IFACE)
        ip(
            *("-n", cloud, "neigh", "replace", MOVED_EDGE_ADDR, "lladdr", EDGE_MAC),
            *("dev", IFACE, "nud", "permanent"),
        )
        ip("-n", edge, "addr", "del", f"{old}/{PREFIX_LEN}", "dev", IFACE)
        ip("-n", edge, "addr", "add", f"{new}/{PREFIX_LEN}", "dev", IFACE)
        ip("-n", edge, "route", "replace", "default", "dev", IFACE, "src", new)
        self.edge_addr = new
        return time.monotonic()

    def reconfigure(
        self,
        profile: LinkProfile | None = None,
        *,
        link_time: float | None = None,
        seed: int | None = None,
    ) -> None:
        """Switch to another profile mid-run (queues and loss state start fresh;
        counters and a forced-down state carry over) and/or set the link clock
        that outage schedules follow, e.g. to reach a scheduled outage now."""
        msg: dict[str, Any] = {"cmd": "configure", "link_time": link_time, "seed": seed}
        if profile is not None:
            if not profile.emulate:
                raise ValueError("cannot switch a running link to a non-emulated profile")
            if profile.mtu != self.profile.mtu:
                raise ValueError("the MTU cannot change on a running link")
            msg["directions"] = {d: profile.direction(d).to_json() for d in DIRECTIONS}
        reply = self._request(msg)
        if profile is not None:
            self.profile = profile
        self._set_base(reply)

    def stats(self) -> dict[str, Any]:
        """Forwarder counters: per direction offered/scheduled/dropped (by
        reason) from the model, and written frames/bytes actually delivered."""
        return self._request({"cmd": "stats"})

    def link_time(self) -> float:
        """Current link time (what outage schedules are measured in)."""
        return self.to_link_time(time.monotonic())

    def to_link_time(self, mono: float) -> float:
        return mono - self._base_mono + self._base_link

    def to_monotonic(self, link_time: float) -> float:
        return link_time - self._base_link + self._base_mono

    # -- plumbing ---------------------------------------------------------------------

    def _require_running(self) -> None:
        if not self._started or self._closed:
            raise LinkSimError(f"{self!r} is not running")

    def _set_base(self, reply: dict[str, Any]) -> None:
        self._base_mono = float(reply["mono"])
        self._base_link = float(reply["link_time"])

    def _request(self, msg: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        if not self.emulated:
            raise LinkSimUnavailable(f"profile {self.profile.name!r} has no emulated link")
        self._require_running()
        assert self._proc is not None and self._proc.stdin is not None
        with self._ctl_lock:
            try:
                self._proc.stdin.write((json.dumps(msg) + "\n").encode())
                self._proc.stdin.flush()
            except BrokenPipeError:
                raise LinkSimError("the forwarder process is gone") from None
            reply = self._read_reply(timeout)
        if not reply.get("ok"):
            raise LinkSimError(f"forwarder refused {msg.get('cmd')}: {reply.get('error')}")
        return reply

    def _read_reply(self, timeout: float) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._rbuf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LinkSimError("the forwarder did not answer in time")
            poller = select.poll()  # not select(): fds may be numbered above 1024
            poller.register(fd, select.POLLIN)
            if not poller.poll(left * 1000):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                code = self._proc.poll()
                raise LinkSimError(f"the forwarder process exited (status {code})")
            self._rbuf += chunk
        line, self._rbuf = self._rbuf.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        return reply


def _stop_process(p: subprocess.Popen[Any], grace_s: float = 2.0) -> None:
    if p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        p.terminate()
    try:
        p.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        p.wait()


__all__ = [
    "CLOUD_ADDR",
    "EDGE_ADDR",
    "IFACE",
    "DirectionOrBoth",
    "LinkSim",
    "LinkSimError",
    "LinkSimUnavailable",
    "Side",
]
