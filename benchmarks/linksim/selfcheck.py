"""Self-check: does traffic through the emulated link see what the profile says?

Everything is measured through real sockets in the two namespaces (created from
this process with setns, so no helper processes), never read back from the
model:

* ``rtt``: ping (ICMP echo, answered by the edge namespace's kernel) at a low
  rate; mean RTT against the sum of the one-way delays plus the probes'
  serialization time.  With jitter configured, the spread of the RTTs is
  compared with what it implies.
* ``throughput``: one TCP bulk transfer per direction, measured for a few
  seconds after a warm-up of max(1.5 s, 10 RTT).  Goodput is TCP's own count of
  segments delivered (``tcpi_delivered``: each segment once, when first ACKed
  or SACKed) times the MSS, against ``rate x MSS / (MTU + 14)``, i.e. the share
  of each full Ethernet frame that is TCP payload (1448 / 1514 = 95.6% at MTU
  1500 with timestamps).  The bytes the receiving application read are shown
  too, but over a few seconds they are distorted by out-of-order hold-back
  around drops.  This phase turns random/bursty loss off: with loss a single
  loss-based TCP flow cannot fill the pipe (Mathis: rate ~ MSS / (RTT sqrt(p)))
  and the check would measure TCP, not the shaper.  The forwarder's own count
  of delivered frame bytes per second ("wire") is shown for information.
* ``loss``: one-way UDP probes in both directions at once; the lost fraction
  against the profile's long-run loss with a tolerance of ``loss_z`` standard
  deviations (binomial, widened by the correlation Gilbert-Elliott bursts
  bring), with enough probes that a loss-free link could not pass.  For bursty
  profiles also P(loss | previous probe lost).  Reordered probes must be zero
  unless the profile allows reordering.
* ``outage``: the profile's first scheduled outage (or a synthetic 2 s one if it
  has none), reached by moving the link clock; no probe may arrive during it and
  none sent during it may arrive at all.
* ``down``: the same for ``LinkSim.set_down``.

Receive times are the kernel's (SO_TIMESTAMPNS), so a busy measuring loop does
not blur the outage boundaries.
"""

from __future__ import annotations

import itertools
import math
import select
import socket
import statistics
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .model import DirectionParams, Outage
from .netns import DEFAULT_PREFIX
from .profiles import DIRECTIONS, Direction, LinkProfile
from .sim import LinkSim, Side

ALL_CHECKS = ("rtt", "throughput", "loss", "outage", "down")

# Linux values; Python's socket module does not export them.
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_SCM_TIMESTAMPNS = _SO_TIMESTAMPNS
_TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)

_PROBE = struct.Struct("!Id")  # sequence number, send time (monotonic)
_PROBE_PAYLOAD = 32
#: Ethernet + IPv4 + UDP (or ICMP echo) headers around a probe payload.
_UDP_FRAME_OVERHEAD = 14 + 20 + 8
_ICMP_ECHO = struct.Struct("!BBHHH")  # type, code, checksum, id, sequence


@dataclass(frozen=True)
class CheckSettings:
    """Durations and tolerances.  The defaults are for the CLI; tests shorten them."""

    rtt_probes: int = 50
    rtt_interval_s: float | None = None
    rtt_tolerance: float = 0.10
    throughput_s: float = 4.0
    #: Seconds of transfer ignored before measuring; None = max(1.5 s, 10 RTT).
    warmup_s: float | None = None
    throughput_directions: tuple[Direction, ...] = DIRECTIONS
    throughput_tolerance: float = 0.10
    #: TCP congestion control of the bulk sender; None = the namespace default.
    tcp_congestion_control: str | None = None
    #: Probes each way; more for bursty loss (see loss_probe_count), up to the max.
    loss_probes: int = 2000
    loss_probes_max: int = 12000
    loss_pps: float = 1000.0
    loss_z: float = 4.0
    outage_observe_s: float = 2.5
    down_s: float = 1.0
    probe_pps: float = 100.0


@dataclass
class CheckRow:
    check: str
    expected: str
    measured: str
    tolerance: str
    ok: bool | None  # None: informational
    note: str = ""


@dataclass
class CheckReport:
    profile: LinkProfile
    seed: int
    rows: list[CheckRow] = field(default_factory=list)
    #: Raw figures by check name, for tests and the README.
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(r.ok is not False for r in self.rows)

    def failures(self) -> list[CheckRow]:
        return [r for r in self.rows if r.ok is False]

    def table(self) -> str:
        head = ("check", "expected", "measured", "tolerance", "result")
        body = [
            (
                r.check,
                r.expected,
                r.measured,
                r.tolerance,
                _verdict(r.ok) + (f"  {r.note}" if r.note else ""),
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in (head, *body)) for i in range(4)]
        lines = [f"{self.profile.summary()}  (seed {self.seed})"]
        for row in (head, *body):
            cells = [c.ljust(w) for c, w in zip(row[:4], widths, strict=True)]
            lines.append("  " + "  ".join(cells) + "  " + row[4])
        return "\n".join(lines)


def _verdict(ok: bool | None) -> str:
    return "info" if ok is None else "ok" if ok else "FAIL"


# -- probe plumbing -------------------------------------------------------------------


def _udp(link: LinkSim, side: Side) -> socket.socket:
    s = link.socket(side, socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    s.bind((link.addr(side), 0))
    s.setblocking(False)
    return s


def _wait(
    readers: Sequence[socket.socket], writers: Sequence[socket.socket], timeout: float
) -> tuple[set[int], set[int]]:
    """poll() rather than select(): the caller may hold more than 1024 fds."""
    p = select.poll()
    for s in readers:
        p.register(s, select.POLLIN)
    for s in writers:
        p.register(s, select.POLLOUT | (select.POLLIN if s in readers else 0))
    r, w = set(), set()
    for fd, ev in p.poll(max(0.0, timeout) * 1000):
        if ev & (select.POLLIN | select.POLLERR | select.POLLHUP):
            r.add(fd)
        if ev & select.POLLOUT:
            w.add(fd)
    return r, w


def _mono_minus_real() -> float:
    """Offset turning CLOCK_REALTIME kernel timestamps into monotonic time."""
    best = None
    for _ in range(5):
        a = time.monotonic()
        r = time.time()
        b = time.monotonic()
        if best is None or b - a < best[0]:
            best = (b - a, (a + b) / 2 - r)
    assert best is not None
    return best[1]


def _recv_all(s: socket.socket, offset: float) -> list[tuple[bytes, tuple[str, int], float]]:
    """Drain a nonblocking UDP socket: (data, source, kernel receive time as monotonic)."""
    out: list[tuple[bytes, tuple[str, int], float]] = []
    while True:
        try:
            data, anc, _flags, addr = s.recvmsg(2048, socket.CMSG_SPACE(16))
        except BlockingIOError:
            return out
        t = None
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == _SCM_TIMESTAMPNS and len(cdata) >= 16:
                sec, nsec = struct.unpack("qq", cdata[:16])
                t = sec + nsec * 1e-9 + offset
        out.append((data, addr, time.monotonic() if t is None else t))


def _probe(seq: int) -> bytes:
    return _PROBE.pack(seq, time.monotonic()).ljust(_PROBE_PAYLOAD, b"\0")


@dataclass
class ProbeLog:
    """One direction of a one-way probe stream."""

    sent: list[float] = field(default_factory=list)  # send time by seq
    received: dict[int, float] = field(default_factory=dict)  # seq -> receive time
    order: list[int] = field(default_factory=list)  # seqs in arrival order
    duplicates: int = 0

    @property
    def reordered(self) -> int:
        """Probes that arrived after a probe sent later than them."""
        count, highest = 0, -1
        for seq in self.order:
            if seq < highest:
                count += 1
            highest = max(highest, seq)
        return count


def run_probe_streams(
    link: LinkSim,
    count: int,
    pps: float,
    tail_s: float,
    actions: Sequence[tuple[float, Callable[[], None]]] = (),
) -> dict[Direction, ProbeLog]:
    """Send ``count`` one-way probes each way at ``pps``, keep receiving for
    ``tail_s`` after the last one, and run ``actions`` (offset from the start,
    callable) on the way.  One thread, so the clock readings are comparable."""
    offset = _mono_minus_real()
    socks: dict[Side, socket.socket] = {"cloud": _udp(link, "cloud"), "edge": _udp(link, "edge")}
    dests = {"cloud": socks["edge"].getsockname(), "edge": socks["cloud"].getsockname()}
    logs: dict[Direction, ProbeLog] = {d: ProbeLog() for d in DIRECTIONS}
    rx_dir: dict[Side, Direction] = {"edge": "cloud_to_edge", "cloud": "edge_to_cloud"}
    tx_dir: dict[Side, Direction] = {"cloud": "cloud_to_edge", "edge": "edge_to_cloud"}
    pending = sorted(actions, key=lambda a: a[0])
    try:
        start = time.monotonic()
        interval = 1.0 / pps
        end = start + (count - 1) * interval + tail_s
        seq = 0
        fds: dict[int, Side] = {s.fileno(): side for side, s in socks.items()}
        readers = list(socks.values())
        while True:
            now = time.monotonic()
            while pending and now >= start + pending[0][0]:
                pending.pop(0)[1]()
                now = time.monotonic()
            while seq < count and now >= start + seq * interval:
                for side in ("cloud", "edge"):
                    pkt = _probe(seq)
                    logs[tx_dir[side]].sent.append(_PROBE.unpack_from(pkt)[1])
                    socks[side].sendto(pkt, dests[side])
                seq += 1
                now = time.monotonic()
            if now >= end and not pending:
                break
            wake = [end]
            if seq < count:
                wake.append(start + seq * interval)
            if pending:
                wake.append(start + pending[0][0])
            ready, _ = _wait(readers, [], min(wake) - now)
            for fd in ready:
                side = fds[fd]
                log = logs[rx_dir[side]]
                for data, _addr, t in _recv_all(socks[side], offset):
                    (rseq, _sent) = _PROBE.unpack_from(data)
                    if rseq in log.received:
                        log.duplicates += 1
                        continue
                    log.received[rseq] = t
                    log.order.append(rseq)
    finally:
        for s in socks.values():
            s.close()
    return logs


# -- RTT --------------------------------------------------------------------------------


@dataclass
class RttResult:
    sent: int
    rtts_s: list[float]

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.rtts_s) if self.rtts_s else math.nan

    @property
    def stdev_s(self) -> float:
        return statistics.stdev(self.rtts_s) if len(self.rtts_s) > 1 else math.nan


def measure_rtt(link: LinkSim, count: int, interval_s: float) -> RttResult:
    """Ping: ICMP echo requests from the cloud side, answered by the edge
    namespace's kernel, so a busy measuring process cannot delay the echo.  The
    reply's receive time is the kernel's; the send time is read just before
    ``sendto``."""
    ping = link.socket("cloud", socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    ping.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    ping.setblocking(False)
    dest = (link.addr("edge"), 0)
    rtts: list[float] = []
    offset = _mono_minus_real()
    tail = 2 * link.profile.rtt_s + 0.5
    try:
        start = time.monotonic()
        end = start + (count - 1) * interval_s + tail
        seq = 0
        seen: set[int] = set()
        while True:
            now = time.monotonic()
            while seq < count and now >= start + seq * interval_s:
                # type 8 (echo request); the kernel fills in id and checksum
                ping.sendto(_ICMP_ECHO.pack(8, 0, 0, 0, seq) + _probe(seq), dest)
                seq += 1
            if now >= end or len(seen) == count:
                break
            nxt = start + seq * interval_s if seq < count else end
            ready, _ = _wait([ping], [], min(nxt, end) - now)
            if ready:
                for data, _addr, t in _recv_all(ping, offset):
                    typ, *_ = _ICMP_ECHO.unpack_from(data)
                    if typ != 0 or len(data) < _ICMP_ECHO.size + _PROBE.size:
                        continue
                    rseq, sent = _PROBE.unpack_from(data, _ICMP_ECHO.size)
                    if rseq not in seen:
                        seen.add(rseq)
                        rtts.append(t - sent)
    finally:
        ping.close()
    return RttResult(sent=count, rtts_s=rtts)


def _check_rtt(link: LinkSim, profile: LinkProfile, s: CheckSettings, report: CheckReport) -> None:
    c2e, e2c = profile.cloud_to_edge, profile.edge_to_cloud
    frame = _UDP_FRAME_OVERHEAD + _PROBE_PAYLOAD
    expected = c2e.delay_s + e2c.delay_s + c2e.serialization_s(frame) + e2c.serialization_s(frame)
    # Far enough apart that FIFO-preserving jitter never holds one probe behind another.
    interval = s.rtt_interval_s or max(0.02, 2.5 * (c2e.jitter_s + e2c.jitter_s))
    link.reconfigure(profile.without_outages())
    res = measure_rtt(link, s.rtt_probes, interval)
    report.data["rtt"] = res
    mean = res.mean_s
    mean_ok = (
        len(res.rtts_s) >= max(3, res.sent // 2)
        and abs(mean - expected) <= s.rtt_tolerance * expected
    )
    report.rows.append(
        CheckRow(
            f"rtt (mean of {len(res.rtts_s)}/{res.sent})",
            f"{expected * 1e3:.2f} ms",
            f"{mean * 1e3:.2f} ms",
            f"±{s.rtt_tolerance:.0%}",
            mean_ok,
        )
    )
    # Each leg's jitter is uniform on ±J: variance J²/3.  Samples the model
    # cannot produce (beyond ±(J1 + J2) + 2 ms) are scheduling hiccups of a
    # loaded host; they are counted, and left out of the spread.
    # With no jitter configured the spread is only host noise: shown, not judged.
    exp_sd = math.sqrt((c2e.jitter_s**2 + e2c.jitter_s**2) / 3)
    reach = c2e.jitter_s + e2c.jitter_s + 0.002
    inliers = [r for r in res.rtts_s if abs(r - expected) <= reach]
    outliers = len(res.rtts_s) - len(inliers)
    sd = statistics.stdev(inliers) if len(inliers) > 1 else math.nan
    ok: bool | None = None
    if exp_sd > 0:
        ok = outliers <= 0.2 * len(res.rtts_s) and abs(sd - exp_sd) <= 0.3 * exp_sd + 0.0005
    report.rows.append(
        CheckRow(
            "rtt stdev (jitter)",
            f"{exp_sd * 1e3:.2f} ms",
            f"{sd * 1e3:.2f} ms",
            "±30% +0.5 ms" if ok is not None else "-",
            ok,
            f"{outliers} outside ±{reach * 1e3:g} ms" if outliers else "",
        )
    )


# -- throughput ------------------------------------------------------------------------


@dataclass
class ThroughputResult:
    direction: Direction
    seconds: float
    #: Unique data delivered to the receiver: tcp_info.tcpi_delivered x MSS.
    goodput_bps: float
    #: Bytes the receiving application read in the same window.
    app_goodput_bps: float
    #: Frame bytes the forwarder delivered in that direction.
    wire_bps: float
    mss: int
    congestion_control: str
    retransmits: int


# struct tcp_info offsets (linux/tcp.h): tcpi_total_retrans at 100, tcpi_delivered at 192.
_TCPI_TOTAL_RETRANS = 100
_TCPI_DELIVERED = 192


def _tcp_delivered(s: socket.socket) -> tuple[int, int]:
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    if len(info) < _TCPI_DELIVERED + 4:
        raise RuntimeError("kernel too old: tcp_info has no tcpi_delivered (needs 4.18+)")
    (retrans,) = struct.unpack_from("I", info, _TCPI_TOTAL_RETRANS)
    (delivered,) = struct.unpack_from("I", info, _TCPI_DELIVERED)
    return delivered, retrans


def measure_throughput(
    link: LinkSim,
    direction: Direction,
    seconds: float,
    warmup_s: float,
    congestion_control: str | None = None,
) -> ThroughputResult:
    """One TCP bulk transfer, measured over ``seconds`` after ``warmup_s``.

    The goodput is the sender's count of segments delivered (each counted once,
    when first ACKed or SACKed) times the MSS.  The receiving application's byte
    count is reported too but is a poor gauge over a few seconds: after a drop
    the receiver holds everything behind the hole until the retransmission
    arrives, then releases it at once; at 600 ms RTT that hold-back is about
    a megabyte, i.e. +-25% over a 4 s window."""
    tx_side: Side = "cloud" if direction == "cloud_to_edge" else "edge"
    rx_side: Side = "edge" if tx_side == "cloud" else "cloud"
    lst = link.socket(rx_side, socket.AF_INET, socket.SOCK_STREAM)
    tx = link.socket(tx_side, socket.AF_INET, socket.SOCK_STREAM)
    conn: socket.socket | None = None
    try:
        lst.bind((link.addr(rx_side), 0))
        lst.listen(1)
        if congestion_control:
            tx.setsockopt(socket.IPPROTO_TCP, _TCP_CONGESTION, congestion_control.encode())
        tx.settimeout(10)
        tx.connect(lst.getsockname())
        conn, _ = lst.accept()
        tx.setblocking(False)
        conn.setblocking(False)
        mss = tx.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        cc = tx.getsockopt(socket.IPPROTO_TCP, _TCP_CONGESTION, 16).rstrip(b"\0").decode()
        chunk = b"\0" * (256 * 1024)
        buf = bytearray(1 << 20)
        received = 0
        start = time.monotonic()
        t_mark = start + warmup_s
        t_end = t_mark + seconds
        mark: tuple[float, int, int, int, int] | None = None
        while True:
            ready_r, ready_w = _wait([conn], [tx], 0.02)
            if ready_w:
                try:
                    tx.send(chunk)
                except BlockingIOError:
                    pass
            if ready_r:
                while True:
                    try:
                        n = conn.recv_into(buf)
                    except BlockingIOError:
                        break
                    if n == 0:
                        raise ConnectionError("sender closed early")
                    received += n
            now = time.monotonic()
            if mark is None and now >= t_mark:
                mark = (now, received, *_tcp_delivered(tx), _wire_bytes(link, direction))
            elif mark is not None and now >= t_end:
                delivered, retrans = _tcp_delivered(tx)
                wire = _wire_bytes(link, direction)
                dt = now - mark[0]
                return ThroughputResult(
                    direction=direction,
                    seconds=dt,
                    goodput_bps=(delivered - mark[2]) * mss * 8 / dt,
                    app_goodput_bps=(received - mark[1]) * 8 / dt,
                    wire_bps=(wire - mark[4]) * 8 / dt,
                    mss=mss,
                    congestion_control=cc,
                    retransmits=retrans - mark[3],
                )
    finally:
        for s in (conn, tx, lst):
            if s is not None:
                s.close()


def _wire_bytes(link: LinkSim, direction: Direction) -> int:
    return int(link.stats()["directions"][direction]["written_bytes"])


def _check_throughput(
    link: LinkSim, profile: LinkProfile, s: CheckSettings, report: CheckReport
) -> None:
    shaped = profile.without_outages().with_directions(loss=0.0, gilbert_elliott=None)
    link.reconfigure(shaped)
    warmup = s.warmup_s if s.warmup_s is not None else max(1.5, 10 * profile.rtt_s)
    results = report.data.setdefault("throughput", {})
    for d in s.throughput_directions:
        p = profile.direction(d)
        name = f"tcp goodput {_arrow(d)}"
        if not p.rate_bps:
            report.rows.append(CheckRow(name, "unlimited", "-", "-", None, "no rate limit"))
            continue
        res = measure_throughput(
            link, d, s.throughput_s, warmup, congestion_control=s.tcp_congestion_control
        )
        results[d] = res
        frame = profile.mtu + 14
        expected = p.rate_bps * res.mss / frame
        ok = abs(res.goodput_bps - expected) <= s.throughput_tolerance * expected
        report.rows.append(
            CheckRow(
                name,
                f"{expected / 1e6:.2f} Mbit/s",
                f"{res.goodput_bps / 1e6:.2f} Mbit/s",
                f"±{s.throughput_tolerance:.0%}",
                ok,
                f"rate x {res.mss}/{frame}; {res.congestion_control}, {res.seconds:.1f} s"
                f" after {warmup:.1f} s, {res.retransmits} retransmits",
            )
        )
        report.rows.append(
            CheckRow(
                f"  app bytes read {_arrow(d)}",
                "",
                f"{res.app_goodput_bps / 1e6:.2f} Mbit/s",
                "-",
                None,
                "what the receiver read in the window",
            )
        )
        report.rows.append(
            CheckRow(
                f"  wire rate {_arrow(d)}",
                f"{p.rate_bps / 1e6:.2f} Mbit/s",
                f"{res.wire_bps / 1e6:.2f} Mbit/s",
                "-",
                None,
                "frame bytes delivered, counted by the forwarder",
            )
        )


def _arrow(d: Direction) -> str:
    return "cloud->edge" if d == "cloud_to_edge" else "edge->cloud"


# -- loss ------------------------------------------------------------------------------


def loss_tolerance(params: DirectionParams, n: int, z: float) -> float:
    """``z`` standard deviations of the lost fraction of ``n`` consecutive
    frames (using the burst-aware variance of the loss model), plus one frame
    for discreteness."""
    return z * math.sqrt(params.loss_variance / n) + 1.0 / n


def loss_probe_count(params: DirectionParams, minimum: int, z: float, cap: int) -> int:
    """Enough probes that the tolerance is at most half the expected loss, so
    that a link losing nothing could not pass; bursty loss needs many more."""
    p = params.expected_loss
    if p <= 0.0:
        return minimum
    needed = math.ceil(z * z * params.loss_variance / (p / 2) ** 2)
    return max(minimum, min(needed, cap))


def _check_loss(link: LinkSim, profile: LinkProfile, s: CheckSettings, report: CheckReport) -> None:
    link.reconfigure(profile.without_outages())
    frame_bits = (_UDP_FRAME_OVERHEAD + _PROBE_PAYLOAD) * 8
    rates = [profile.direction(d).rate_bps for d in DIRECTIONS]
    # Keep probes well under the rate so the queue never drops any.
    pps = min([s.loss_pps] + [0.25 * r / frame_bits for r in rates if r])
    tail = max(profile.direction(d).delay_s + profile.direction(d).jitter_s for d in DIRECTIONS)
    count = max(
        loss_probe_count(profile.direction(d), s.loss_probes, s.loss_z, s.loss_probes_max)
        for d in DIRECTIONS
    )
    logs = run_probe_streams(link, count, pps, tail + 0.3)
    report.data["loss"] = logs
    for d in DIRECTIONS:
        p = profile.direction(d)
        log = logs[d]
        n = len(log.sent)
        lost = n - len(log.received)
        exp = p.expected_loss
        tol = loss_tolerance(p, n, s.loss_z)
        report.rows.append(
            CheckRow(
                f"loss {_arrow(d)}",
                f"{exp:.2%}",
                f"{lost / n:.2%} ({lost}/{n})",
                f"±{tol:.2%}",
                abs(lost / n - exp) <= tol,
                f"{pps:.0f} probes/s",
            )
        )
        if p.gilbert_elliott is not None:
            # Burstiness: how often a loss follows a loss, against the model's figure.
            lost_flags = [i not in log.received for i in range(n)]
            pairs = [b for a, b in itertools.pairwise(lost_flags) if a]
            exp_ll = p.loss_after_loss
            got = sum(pairs) / len(pairs) if pairs else math.nan
            tol_ll = s.loss_z * math.sqrt(exp_ll * (1 - exp_ll) / max(1, len(pairs))) + 0.1
            report.rows.append(
                CheckRow(
                    f"P(loss | loss) {_arrow(d)}",
                    f"{exp_ll:.0%}",
                    f"{got:.0%} ({sum(pairs)}/{len(pairs)})",
                    f"±{tol_ll:.0%}",
                    abs(got - exp_ll) <= tol_ll,
                    "bursts: independent loss would give the loss rate itself",
                )
            )
        if not p.reorder:
            report.rows.append(
                CheckRow(
                    f"reordered {_arrow(d)}",
                    "0",
                    str(log.reordered),
                    "=0",
                    log.reordered == 0 and log.duplicates == 0,
                    f"jitter ±{p.jitter_s * 1e3:g} ms",
                )
            )


# -- outages ---------------------------------------------------------------------------


@dataclass
class WindowCounts:
    """Probe counts around a no-connectivity window ``[lo, hi]`` (monotonic)."""

    delivered_before: int
    received_inside: int
    sent_inside_delivered: int
    sent_inside: int
    delivered_after: int


def count_window(log: ProbeLog, lo: float, hi: float, eps: float = 0.005) -> WindowCounts:
    recv_times = list(log.received.values())
    inside_sent = [i for i, t in enumerate(log.sent) if lo + eps <= t <= hi - eps]
    return WindowCounts(
        delivered_before=sum(1 for i, t in log.received.items() if t < lo and log.sent[i] < lo),
        received_inside=sum(1 for t in recv_times if lo + eps <= t <= hi - eps),
        sent_inside_delivered=sum(1 for i in inside_sent if i in log.received),
        sent_inside=len(inside_sent),
        delivered_after=sum(1 for i, _ in log.received.items() if log.sent[i] > hi + eps),
    )


def _window_row(name: str, c: WindowCounts, need_before: bool, need_after: bool) -> CheckRow:
    ok = c.received_inside == 0 and c.sent_inside_delivered == 0 and c.sent_inside > 0
    ok = ok and (c.delivered_before > 0 or not need_before)
    ok = ok and (c.delivered_after > 0 or not need_after)
    after = str(c.delivered_after) if need_after else "n/a"
    return CheckRow(
        name,
        "0 through",
        f"{c.received_inside} rx, {c.sent_inside_delivered}/{c.sent_inside} tx through",
        "=0",
        ok,
        f"(flowing before: {c.delivered_before}, after: {after})",
    )


def _check_outage(
    link: LinkSim, profile: LinkProfile, s: CheckSettings, report: CheckReport
) -> None:
    base = profile
    window: Outage | None = None
    for d in DIRECTIONS:
        w = next(profile.direction(d).outage_windows(), None)
        if w is not None and (window is None or w.start_s < window.start_s):
            window = w
    synthetic = window is None
    if window is None:
        window = Outage(1000.0, 2.0)
        base = profile.with_directions(outages=(window,))
    affected = [d for d in DIRECTIONS if base.direction(d).in_outage(window.start_s + 1e-3)]
    lead, tail = 0.8, 0.6 + max(base.direction(d).delay_s for d in DIRECTIONS)
    span = window.duration_s
    # (link time to jump to, seconds to observe, expect flow before, expect flow after)
    segments: list[tuple[float, float, bool, bool]] = []
    if span <= s.outage_observe_s:
        segments.append((window.start_s - lead, lead + span + tail, True, True))
    else:
        segments.append((window.start_s - lead, lead + s.outage_observe_s, True, False))
        segments.append((window.end_s - 1.0, 1.0 + tail, False, True))
    label = "synthetic 2 s" if synthetic else f"{window.start_s:g}+{window.duration_s:g} s"
    for i, (t_link, observe, need_before, need_after) in enumerate(segments):
        link.reconfigure(base, link_time=t_link)
        lo, hi = link.to_monotonic(window.start_s), link.to_monotonic(window.end_s)
        count = max(2, int(observe * s.probe_pps))
        logs = run_probe_streams(link, count, s.probe_pps, tail)
        report.data.setdefault("outage", []).append(logs)
        part = ["start", "end"][i] if len(segments) > 1 else "whole"
        for d in affected:
            c = count_window(logs[d], lo, hi)
            report.rows.append(
                _window_row(f"outage {label} ({part}) {_arrow(d)}", c, need_before, need_after)
            )


def _check_down(link: LinkSim, profile: LinkProfile, s: CheckSettings, report: CheckReport) -> None:
    link.reconfigure(profile.without_outages())
    marks: dict[str, float] = {}

    def down() -> None:
        link.set_down(True)
        marks["down"] = time.monotonic()

    def up() -> None:
        marks["up"] = time.monotonic()
        link.set_down(False)

    lead = 0.6
    tail = 0.6 + max(profile.direction(d).delay_s for d in DIRECTIONS)
    count = int((lead + s.down_s + tail) * s.probe_pps)
    logs = run_probe_streams(
        link, count, s.probe_pps, tail, actions=[(lead, down), (lead + s.down_s, up)]
    )
    report.data["down"] = logs
    for d in DIRECTIONS:
        c = count_window(logs[d], marks["down"], marks["up"], eps=0.001)
        report.rows.append(_window_row(f"set_down {s.down_s:g} s {_arrow(d)}", c, True, True))


# -- entry point -----------------------------------------------------------------------

_CHECKS: dict[str, Callable[[LinkSim, LinkProfile, CheckSettings, CheckReport], None]] = {
    "rtt": _check_rtt,
    "throughput": _check_throughput,
    "loss": _check_loss,
    "outage": _check_outage,
    "down": _check_down,
}


def run_self_check(
    profile: LinkProfile,
    *,
    seed: int = 1,
    checks: Iterable[str] = ALL_CHECKS,
    settings: CheckSettings | None = None,
    prefix: str = DEFAULT_PREFIX,
) -> CheckReport:
    """Run ``checks`` against ``profile`` in fresh namespaces and report.  Each
    check runs on the profile with only the parts it does not measure disabled
    (see the module docstring)."""
    s = settings or CheckSettings()
    report = CheckReport(profile, seed)
    todo = list(checks)
    unknown = set(todo) - set(_CHECKS)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; have {list(_CHECKS)}")
    if not profile.emulate:
        report.rows.append(CheckRow("emulation", "-", "-", "-", None, "loopback: nothing to check"))
        return report
    with LinkSim(profile, seed=seed, prefix=prefix) as link:
        for name in todo:
            _CHECKS[name](link, profile, s, report)
    return report
