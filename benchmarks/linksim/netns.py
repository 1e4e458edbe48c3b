"""Network namespace, TAP and cleanup plumbing for the link emulator.

Namespaces are named ``<prefix>-<side>-<owner pid>-<n>`` so that a later run can
tell leftovers of a dead process (remove them) from those of a live one (leave
them alone: another benchmark may be using them right now).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

NETNS_DIR = Path("/run/netns")
TUN_PATH = "/dev/net/tun"
DEFAULT_PREFIX = "tether"
FORWARDER_MODULE = "benchmarks.linksim.forwarder"

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_CLONE_NEWNET = 0x40000000


class LinkSimError(RuntimeError):
    """Setting up or driving the emulated link failed."""


class LinkSimUnavailable(LinkSimError):
    """This machine or user cannot run the emulator (not root, no TUN, no ``ip``).
    The harness catches this and runs only the loopback scenarios."""


def check_available(tun_path: str = TUN_PATH) -> None:
    """Raise :class:`LinkSimUnavailable` with the reason if namespaces + TAP
    cannot be used here."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise LinkSimUnavailable("link emulation needs root (network namespaces and TAP devices)")
    if not os.path.exists(tun_path):
        raise LinkSimUnavailable(f"{tun_path} does not exist (no TUN/TAP support)")
    try:
        fd = os.open(tun_path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise LinkSimUnavailable(f"cannot open {tun_path}: {e.strerror}") from None
    os.close(fd)
    if shutil.which("ip") is None:
        raise LinkSimUnavailable("the `ip` command (iproute2) is not installed")
    if not os.path.exists("/proc/self/ns/net"):
        raise LinkSimUnavailable("this kernel has no network namespaces")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip`` and turn a failure into a :class:`LinkSimError` with its stderr."""
    res = subprocess.run(["ip", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise LinkSimError(f"ip {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res


def create_tap(template: str = "tlsim%d") -> tuple[int, str]:
    """A non-persistent TAP (no packet-info header, no vnet header, so the
    kernel hands us plain MTU-sized Ethernet frames) and its kernel name.  The
    device lives exactly as long as the returned fd."""
    fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", template.encode(), _IFF_TAP | _IFF_NO_PI)
        res = fcntl.ioctl(fd, _TUNSETIFF, ifr)
    except OSError:
        os.close(fd)
        raise
    return fd, res[:16].rstrip(b"\0").decode()


# -- entering a namespace from this thread -------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


@contextlib.contextmanager
def entered_netns(name: str) -> Iterator[None]:
    """Run the body with *this thread* in namespace ``name``.  Sockets created
    inside keep living in that namespace afterwards, which lets one process
    measure between two namespaces without helper processes."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def socket_in_netns(
    name: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
) -> socket.socket:
    with entered_netns(name):
        return socket.socket(family, type, proto)


def write_sysctl_in_netns(name: str, values: dict[str, str]) -> None:
    """Write ``net.*`` sysctls of namespace ``name`` (``/proc/sys/net`` follows
    the namespace of the thread that opens it)."""
    with entered_netns(name):
        for key, value in values.items():
            Path("/proc/sys", *key.split(".")).write_text(value)


# -- naming and stale cleanup ----------------------------------------------------


def _name_re(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}-(cloud|edge)-(\d+)-(\d+)$")


def list_namespaces(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Namespaces created by link emulators with ``prefix`` (any owner)."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    pat = _name_re(prefix)
    return sorted(n for n in names if pat.match(n))


def namespace_owner(name: str, prefix: str = DEFAULT_PREFIX) -> int | None:
    m = _name_re(prefix).match(name)
    return int(m.group(2)) if m else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _terminate_pids(pids: list[int], grace_s: float = 2.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if pid_alive(p) and not _is_zombie(p)]
        if pids:
            time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def kill_namespace_processes(name: str) -> None:
    """Stop whatever still runs inside namespace ``name`` (it is ours)."""
    res = ip("netns", "pids", name, check=False)
    pids = [int(p) for p in res.stdout.split() if p.isdigit() and int(p) != os.getpid()]
    _terminate_pids(pids)


def delete_namespace(name: str) -> None:
    kill_namespace_processes(name)
    res = ip("netns", "del", name, check=False)
    if res.returncode != 0 and (NETNS_DIR / name).exists():
        raise LinkSimError(f"cannot delete namespace {name}: {res.stderr.strip()}")


def _stale_forwarders(prefix: str, include_live: bool) -> list[int]:
    """Forwarder processes whose tag matches ``prefix`` and whose owner is gone.
    They normally exit on their own when the owner's pipe closes; this only
    catches a wedged one."""
    pat = _name_re(prefix)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if FORWARDER_MODULE.encode() not in argv or b"--tag" not in argv:
            continue
        i = argv.index(b"--tag")
        tag = argv[i + 1].decode(errors="replace") if i + 1 < len(argv) else ""
        m = pat.match(tag)
        if m and (include_live or not pid_alive(int(m.group(2)))):
            found.append(int(entry.name))
    return found


def cleanup_stale(prefix: str = DEFAULT_PREFIX, include_live: bool = False) -> list[str]:
    """Remove namespaces (and their processes) left behind by dead owners; with
    ``include_live`` also those of running owners.  Returns what was removed."""
    removed = []
    for name in list_namespaces(prefix):
        owner = namespace_owner(name, prefix)
        if include_live or owner is None or not pid_alive(owner):
            try:
                delete_namespace(name)
            except LinkSimError:
                continue
            removed.append(name)
    fwd = _stale_forwarders(prefix, include_live)
    _terminate_pids([p for p in fwd if p != os.getpid()])
    removed.extend(f"forwarder pid {p}" for p in fwd)
    return removed
