"""Measurement primitives shared by the scenarios: blocking clients over any
contender's :class:`Conn`, and process accounting from ``/proc``.

Clients are plain blocking sockets driven from threads rather than an async
loop: a 64-byte echo then costs one ``send`` and one ``recv`` system call and
no scheduler work, so the client adds as little as possible to the latency it
measures, and grpcio (a blocking API) fits the same shape.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

CLK_TCK = os.sysconf("SC_CLK_TCK")
ECHO_MSG = b"e" * 64
ENDLESS = (1 << 64) - 1
READ = 1 << 20


class Conn(Protocol):
    """One client connection to a target, through whichever contender."""

    def sendall(self, data: bytes) -> None: ...
    def recv(self, n: int) -> bytes: ...
    def close(self) -> None: ...


#: Opens a connection to the target port; raises on failure or timeout.
Opener = Callable[[int, float], Conn]


# ------------------------------------------------------------------ clients


def echo_once(conn: Conn, msg: bytes = ECHO_MSG) -> float:
    """One request/response round; seconds."""
    start = time.perf_counter()
    conn.sendall(msg)
    got = 0
    while got < len(msg):
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("echo stream ended")
        got += len(chunk)
    return time.perf_counter() - start


def echo_series(
    conn: Conn, *, rounds: int, max_s: float, stop: threading.Event | None = None
) -> list[float]:
    """Up to ``rounds`` echo rounds, but no longer than ``max_s`` (so a slow
    profile still finishes on time; the sample count is reported)."""
    samples: list[float] = []
    deadline = time.monotonic() + max_s
    while len(samples) < rounds and time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            break
        samples.append(echo_once(conn))
    return samples


def bulk_download(opener: Opener, port: int, size: int, timeout: float = 120) -> float:
    """Receive ``size`` bytes from the source target; returns bytes/s, timed
    from the request to the last byte."""
    conn = opener(port, timeout)
    try:
        start = time.perf_counter()
        conn.sendall(size.to_bytes(8, "big"))
        got = 0
        while got < size:
            chunk = conn.recv(READ)
            if not chunk:
                raise ConnectionError(f"stream ended at {got} of {size}")
            got += len(chunk)
        return size / (time.perf_counter() - start)
    finally:
        conn.close()


class Goodput:
    """A time-boxed download: bytes received per second between ``warmup_s``
    and ``warmup_s + measure_s`` after the request (slow start excluded), plus
    a coarse timeline for the record."""

    def __init__(self, bps: float, timeline: list[tuple[float, int]]) -> None:
        self.bps = bps
        self.timeline = timeline


def goodput(
    opener: Opener,
    port: int,
    *,
    warmup_s: float,
    measure_s: float,
    stop: threading.Event | None = None,
    on_running: Callable[[], None] | None = None,
) -> Goodput:
    conn = opener(port, 30)
    try:
        start = time.perf_counter()
        conn.sendall(ENDLESS.to_bytes(8, "big"))
        t0, t1 = start + warmup_s, start + warmup_s + measure_s
        got = 0
        mark0: tuple[float, int] | None = None
        timeline: list[tuple[float, int]] = []
        next_tick = start
        notified = False
        while True:
            chunk = conn.recv(READ)
            now = time.perf_counter()
            if not chunk:
                raise ConnectionError(f"source ended after {got} bytes")
            got += len(chunk)
            if now >= next_tick:
                timeline.append((round(now - start, 3), got))
                next_tick = now + 0.25
            if mark0 is None and now >= t0:
                mark0 = (now, got)
                if on_running is not None and not notified:
                    notified = True
                    on_running()
            if now >= t1 or (stop is not None and stop.is_set()):
                break
        assert mark0 is not None
        elapsed = now - mark0[0]
        bps = (got - mark0[1]) * 8 / elapsed if elapsed > 0 else 0.0
        return Goodput(bps, timeline)
    finally:
        conn.close()


def dial_time(opener: Opener, port: int, timeout: float = 30) -> float:
    """Seconds from the client's connect request to the first byte echoed by
    the target (the echo request is sent as soon as the tunnel is usable)."""
    start = time.perf_counter()
    conn = opener(port, timeout)
    try:
        conn.sendall(ECHO_MSG)
        if not conn.recv(65536):
            raise ConnectionError("no echo")
        return time.perf_counter() - start
    finally:
        conn.close()


# ------------------------------------------------------------------ /proc


@contextlib.contextmanager
def counting_syscalls(pids: list[int]) -> Iterator[list[int]]:
    """System calls made by each of ``pids`` (and their threads) inside the
    ``with`` block, counted by ``strace -c -f`` (-1 each without strace);
    the yielded list is filled in when the block ends. strace slows the
    processes: use the count, not the time."""
    totals: list[int] = []
    if not pids or shutil.which("strace") is None:
        yield totals
        totals.extend(-1 for _ in pids)
        return
    outs, procs = [], []
    for pid in pids:
        fd, name = tempfile.mkstemp(prefix="tether-strace-")
        os.close(fd)
        outs.append(name)
        procs.append(
            subprocess.Popen(
                ["strace", "-c", "-f", "-o", name, "-p", str(pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    time.sleep(0.5)  # attached
    try:
        yield totals
    finally:
        for p, name in zip(procs, outs, strict=True):
            p.send_signal(signal.SIGINT)
            p.wait(timeout=10)
            text = Path(name).read_text()
            os.unlink(name)
            m = re.search(r"^\s*100\.00\s+\S+\s+\S+\s+(\d+)", text, re.MULTILINE) or re.search(
                r"(\d+)\s+(?:\d+\s+)?total", text
            )
            totals.append(int(m.group(1)) if m else -1)


def syscalls_during(pids: list[int], work: Callable[[], object]) -> list[int]:
    """:func:`counting_syscalls` around ``work()``."""
    with counting_syscalls(pids) as totals:
        work()
    return totals


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def descendants(pid: int) -> list[int]:
    """``pid`` and every live descendant (sshd forks a process per session;
    autossh runs ssh as a child)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu(pids: Sequence[int]) -> float:
    return sum(cpu_seconds(p) for root in pids for p in descendants(root))


def memory_kib(pid: int) -> dict[str, int]:
    """RSS, PSS and USS (private clean + dirty) from smaps_rollup."""
    values: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {"rss": 0, "pss": 0, "uss": 0}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
            values[key] = int(rest.split()[0])
    return {
        "rss": values.get("Rss", 0),
        "pss": values.get("Pss", 0),
        "uss": values.get("Private_Clean", 0) + values.get("Private_Dirty", 0),
    }


class MemorySampler:
    """Peak RSS/USS of some processes while a block runs (sampled every
    ``interval`` s from a thread)."""

    def __init__(self, pids: dict[str, int], interval: float = 0.25) -> None:
        self.pids = pids
        self.interval = interval
        self.peak: dict[str, dict[str, int]] = {k: {"rss": 0, "uss": 0} for k in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                m = memory_kib(pid)
                peak = self.peak[name]
                peak["rss"] = max(peak["rss"], m["rss"])
                peak["uss"] = max(peak["uss"], m["uss"])
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------ statistics


def pct(samples: Sequence[float], q: float) -> float:
    """The q-quantile by nearest rank (no interpolation: with few samples
    p99 is the maximum, which is the honest reading)."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


def latency_summary(samples: Sequence[float]) -> dict[str, Any]:
    return {
        "n": len(samples),
        "p50_ms": pct(samples, 0.50) * 1000,
        "p99_ms": pct(samples, 0.99) * 1000,
        "samples_ms": [round(s * 1000, 4) for s in samples],
    }


# ------------------------------------------------------------------ TCP info

_SS_CONN = re.compile(r"^\d+\s+\d+\s+(\S+):(\d+)\s+(\S+):(\d+)")
_SS_CC = re.compile(r"^\s*(\w+)\s+wscale")


def tcp_connections(exec_prefix: Sequence[str]) -> list[dict[str, Any]]:
    """Established TCP connections in a namespace with their congestion
    control, from ``ss -tin`` (the sender's socket decides the algorithm,
    and the senders here are other processes)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [*exec_prefix, "ss", "-tinH", "state", "established"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        conns: list[dict[str, Any]] = []
        for line in out.splitlines():
            if m := _SS_CONN.match(line):
                conns.append(
                    {"local_port": int(m.group(2)), "peer_port": int(m.group(4)), "cc": None}
                )
            elif conns and (c := _SS_CC.match(line)):
                conns[-1]["cc"] = c.group(1)
        return conns
    return []
