"""The forwarder process: moves Ethernet frames between the two TAP devices
through one :class:`LinkModel` per direction.

It runs as its own process (``python -m benchmarks.linksim.forwarder``) so it
never competes for a GIL with the benchmark that drives traffic through it.
One thread, ``select()`` on both TAP fds plus the control pipe, and a single
heap of frames waiting for their delivery time.  ``select()`` rather than
``epoll``: it takes a microsecond timeout where ``epoll_wait`` rounds to whole
milliseconds, which would add up to 1 ms to every delayed frame; with three fds
its cost is the same.

Control: one JSON object per line on stdin, one JSON reply per line on stdout.
EOF on stdin (the owner closed the pipe or died) ends the process, and the TAP
devices vanish with its fds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import heapq
import json
import os
import select
import signal
import sys
import time
from typing import Any

from .model import DirectionParams, LinkModel
from .profiles import DIRECTIONS

#: Frames read from one TAP before looking at the other and at due deliveries.
READ_BATCH = 64
#: Deliver frames due within this much of now in the same wake-up.
DELIVERY_SLACK_S = 50e-6
#: Upper bound of the learned wake-up latency we compensate for.
MAX_WAKE_EARLY_S = 500e-6
#: How often to check that the owner process still exists.
OWNER_CHECK_S = 1.0

_PR_SET_TIMERSLACK = 29


class Forwarder:
    """State of a running forwarder.  ``run()`` returns when stdin closes."""

    def __init__(
        self,
        cloud_fd: int,
        edge_fd: int,
        directions: list[DirectionParams],
        seed: int,
        mtu: int,
        owner: int,
        link_time: float = 0.0,
    ) -> None:
        self.in_fds = (cloud_fd, edge_fd)
        self.out_fds = (edge_fd, cloud_fd)
        self.seed = seed
        self.models = [LinkModel(p, _direction_seed(seed, i)) for i, p in enumerate(directions)]
        self.bufsize = mtu + 64
        self.owner = owner
        self.base_mono = time.monotonic()
        self.base_link = link_time
        self.heap: list[tuple[float, int, int, bytes]] = []
        self.seq = 0
        self.written = [0, 0]
        self.written_bytes = [0, 0]
        self.write_errors = [0, 0]
        self.read_errors = [0, 0]
        self.max_frame = [0, 0]
        # How late frames left compared with their scheduled time (wake-up and
        # loop latency): the emulator's own timing error.
        self.late_sum = [0.0, 0.0]
        self.late_max = [0.0, 0.0]
        self._ctl_buf = b""

    # -- control ----------------------------------------------------------------

    def link_time(self, mono: float | None = None) -> float:
        return (time.monotonic() if mono is None else mono) - self.base_mono + self.base_link

    def _reply(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj) + "\n").encode()
        while data:
            n = os.write(1, data)
            data = data[n:]

    def _directions(self, which: str) -> list[int]:
        if which == "both":
            return [0, 1]
        if which not in DIRECTIONS:
            raise ValueError(f"bad direction {which!r}")
        return [0 if which == DIRECTIONS[0] else 1 if which == DIRECTIONS[1] else -1]

    def _flush(self, d: int) -> None:
        gone = [e for e in self.heap if e[2] == d]
        # In place: the loop holds a reference to this list.
        self.heap[:] = [e for e in self.heap if e[2] != d]
        heapq.heapify(self.heap)
        self.models[d].count_flushed(len(gone), sum(len(e[3]) for e in gone))

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        out: dict[str, Any] = {"mono": now, "link_time": self.link_time(now), "directions": {}}
        for d, name in enumerate(DIRECTIONS):
            m = self.models[d]
            s = m.stats.to_json()
            s.update(
                written=self.written[d],
                written_bytes=self.written_bytes[d],
                write_errors=self.write_errors[d],
                read_errors=self.read_errors[d],
                max_frame=self.max_frame[d],
                late_mean_us=1e6 * self.late_sum[d] / max(1, self.written[d]),
                late_max_us=1e6 * self.late_max[d],
                in_flight=sum(1 for e in self.heap if e[2] == d),
                backlog_bytes=m.backlog_bytes(self.link_time(now)),
                down=m.down,
            )
            out["directions"][name] = s
        return out

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        cmd = msg.get("cmd")
        if cmd == "ping":
            return {"ok": True}
        if cmd == "stats":
            return {"ok": True, **self.stats()}
        if cmd == "down":
            down = bool(msg.get("down", True))
            for d in self._directions(msg.get("direction", "both")):
                self.models[d].set_down(down)
                if down:
                    self._flush(d)
            return {"ok": True, "mono": time.monotonic()}
        if cmd == "configure":
            now = time.monotonic()
            if msg.get("link_time") is not None:
                self.base_mono, self.base_link = now, float(msg["link_time"])
            if msg.get("seed") is not None:
                self.seed = int(msg["seed"])
            dirs = msg.get("directions")
            if dirs is not None:
                for d, name in enumerate(DIRECTIONS):
                    old = self.models[d]
                    new = LinkModel(
                        DirectionParams.from_json(dirs[name]), _direction_seed(self.seed, d)
                    )
                    new.stats = old.stats
                    new.set_down(old.down)
                    self.models[d] = new
            return {"ok": True, "mono": now, "link_time": self.link_time(now)}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _control_readable(self) -> bool:
        """Process complete control lines; False once stdin is closed."""
        try:
            chunk = os.read(0, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        self._ctl_buf += chunk
        while b"\n" in self._ctl_buf:
            line, self._ctl_buf = self._ctl_buf.split(b"\n", 1)
            if not line.strip():
                continue
            try:
                reply = self.handle(json.loads(line))
            except Exception as e:  # a bad command must not kill the link
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            self._reply(reply)
        return True

    # -- the loop -----------------------------------------------------------------

    def run(self) -> None:
        for fd in self.in_fds:
            os.set_blocking(fd, False)
        os.set_blocking(0, False)
        self._reply({"ready": True, "pid": os.getpid(), **self.stats()})

        heap = self.heap
        heappush, heappop = heapq.heappush, heapq.heappop
        mono = time.monotonic
        read, write = os.read, os.write
        cloud_fd, edge_fd = self.in_fds
        out_fds = self.out_fds
        rlist = [0, cloud_fd, edge_fd]
        bufsize = self.bufsize
        next_owner_check = mono() + OWNER_CHECK_S
        early = 0.0

        while True:
            before = mono()
            if heap:
                # Wake up early by the latency select() has been showing, so
                # that on average frames leave on time rather than ~0.1 ms late.
                timeout = heap[0][0] - before - early
                if timeout < 0.0:
                    timeout = 0.0
                elif timeout > OWNER_CHECK_S:
                    timeout = OWNER_CHECK_S
            else:
                timeout = OWNER_CHECK_S
            ready = select.select(rlist, [], [], timeout)[0]
            now = mono()
            if not ready and timeout > 0.0 and heap:
                overshoot = now - before - timeout
                early += 0.1 * (overshoot - early)
                if early < 0.0:
                    early = 0.0
                elif early > MAX_WAKE_EARLY_S:
                    early = MAX_WAKE_EARLY_S
            for fd in ready:
                if fd == 0:
                    if not self._control_readable():
                        return
                    continue
                d = 0 if fd == cloud_fd else 1
                offer = self.models[d].offer
                shift = self.base_mono - self.base_link
                link_now = now - shift
                seq = self.seq
                biggest = self.max_frame[d]
                for _ in range(READ_BATCH):
                    try:
                        frame = read(fd, bufsize)
                    except BlockingIOError:
                        break
                    except OSError:  # e.g. someone set the interface down
                        self.read_errors[d] += 1
                        time.sleep(0.001)  # the fd stays "readable": do not spin
                        break
                    n = len(frame)
                    if n > biggest:
                        biggest = n
                    t = offer(link_now, n)
                    if t is not None:
                        heappush(heap, (t + shift, seq, d, frame))
                        seq += 1
                self.seq = seq
                self.max_frame[d] = biggest
            if heap and heap[0][0] <= now + early + DELIVERY_SLACK_S:
                t_write = mono()
                limit = t_write + early + DELIVERY_SLACK_S
                written, written_bytes = self.written, self.written_bytes
                late_sum, late_max = self.late_sum, self.late_max
                while heap and heap[0][0] <= limit:
                    due, _, d, frame = heappop(heap)
                    try:
                        write(out_fds[d], frame)
                    except OSError:
                        self.write_errors[d] += 1
                    else:
                        written[d] += 1
                        written_bytes[d] += len(frame)
                        late = t_write - due
                        late_sum[d] += late
                        if late > late_max[d]:
                            late_max[d] = late
            if now >= next_owner_check:
                next_owner_check = now + OWNER_CHECK_S
                if not _alive(self.owner):
                    return


def _direction_seed(seed: int, d: int) -> int:
    return seed * 2 + d


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tag", required=True, help="cloud namespace name, for stale cleanup")
    ap.add_argument("--owner", type=int, required=True)
    ap.add_argument("--cloud-fd", type=int, required=True)
    ap.add_argument("--edge-fd", type=int, required=True)
    ap.add_argument("--config", required=True, help="JSON: profile, seed, link_time")
    args = ap.parse_args(argv)
    # Ctrl-C goes to the whole process group; the owner decides when the link
    # ends (by closing our stdin), so it can still clean up in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 10_000, 0, 0, 0)  # 10 us wake-up slack
    cfg = json.loads(args.config)
    prof = cfg["profile"]
    # pass_fds keeps the owner's fd numbers, which select() cannot take above
    # 1024; duplicates get the lowest free numbers here.
    cloud_fd, edge_fd = os.dup(args.cloud_fd), os.dup(args.edge_fd)
    os.close(args.cloud_fd)
    os.close(args.edge_fd)
    fwd = Forwarder(
        cloud_fd,
        edge_fd,
        [DirectionParams.from_json(prof[d]) for d in DIRECTIONS],
        seed=int(cfg.get("seed", 0)),
        mtu=int(prof.get("mtu", 1500)),
        owner=args.owner,
        link_time=float(cfg.get("link_time", 0.0)),
    )
    nice = cfg.get("nice")
    if nice:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, int(nice))
    try:
        fwd.run()
    except BrokenPipeError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
