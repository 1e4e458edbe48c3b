"""Windows that follow the link: a sans-IO bandwidth-delay estimator and
per-stream window tuner, in the spirit of gRPC's BDP estimator and QUIC's
receive-window auto-tuning.

No clock, socket or randomness here: the caller passes ``now`` (seconds, any
epoch) and what it observed.

- :class:`LinkEstimate` (one per tunnel connection) keeps the round-trip time
  (keepalive PING answers, the kernel's ``TCP_INFO``) and the delivery rate
  (payload bytes the connection delivered per round trip, or the kernel's
  own delivery-rate estimate), and from them the bandwidth-delay product
  (:attr:`LinkEstimate.bdp`) and the ``TCP_NOTSENT_LOWAT`` that keeps the
  socket's unsent queue to a few milliseconds of the link
  (:meth:`LinkEstimate.notsent_lowat`).
- :class:`StreamTuner` (one per receiving stream) counts the bytes that land
  in each round (one round-trip time) and how much we held unread. A round
  that brought most of a window (:attr:`TunerConfig.full_round`, gRPC's 2/3)
  while our buffer drained at some point of it means the window, not the reader, held the
  sender back: the window doubles, up to :attr:`TunerConfig.headroom`
  bandwidth-delay products and :attr:`TunerConfig.ceiling`. A slow reader
  (our buffer never drained, few bytes per round) never grows it. Rounds in which the window sat far above
  what the link carries bring it back down, and so does memory pressure
  (the process's :class:`protocol.budget.BufferBudget` past its high-water
  mark), to the window the stream was opened with.

The owner applies the advice through the budget (``may_grow``/``grow``,
``shrink``), so windows x tunnels never pass the per-process budget.
"""

from __future__ import annotations

import collections

import attrs

#: The kernel's unsent queue is kept to this many seconds of the link: long
#: enough that the writer is woken before the socket runs dry, short enough
#: that an interactive byte queued behind bulk waits only that long.
LOWAT_SECONDS = 0.010
LOWAT_MIN = 16 * 1024
LOWAT_MAX = 1024 * 1024
#: Delivery-rate samples are kept this long (a windowed maximum, as in BBR).
RATE_HORIZON = 10.0
#: Shortest round, so a tiny RTT (loopback) does not tune on every frame.
MIN_ROUND = 0.010


@attrs.frozen
class TunerConfig:
    #: Window a stream is never shrunk below (it was opened with at least this).
    floor: int = 64 * 1024
    #: Largest window a stream may grow to.
    ceiling: int = 16 * 1024 * 1024
    #: Growth per round while the window is the bottleneck.
    gain: int = 2
    #: A window is capped at this many bandwidth-delay products: what lets a
    #: sender keep going through a loss (the retransmission takes another
    #: round trip during which the reader gets nothing) without letting a
    #: window run away.
    headroom: int = 4
    #: A round that lands this share of the window used all of it.
    full_round: float = 2 / 3
    #: Our buffer never below this share of the window in a round: the
    #: reader, not the window, is what holds the sender back.
    reader_behind: float = 1 / 4
    #: Quiet rounds (not short of credit) before an oversized window shrinks.
    quiet_rounds: int = 8

    def __attrs_post_init__(self) -> None:
        if not 0 < self.floor <= self.ceiling <= 2**31 - 1:
            raise ValueError("need 0 < floor <= ceiling < 2 GiB")
        if self.gain < 2 or self.headroom < 1:
            raise ValueError("gain must be >= 2 and headroom >= 1")


@attrs.define
class LinkEstimate:
    """Round-trip time and delivery rate of one tunnel connection."""

    #: Smoothed RTT (seconds; None until the first sample).
    srtt: float | None = None
    min_rtt: float | None = None
    #: Delivery-rate samples (time, bytes per second), for a windowed maximum.
    _rates: collections.deque[tuple[float, float]] = attrs.field(
        factory=collections.deque, repr=False
    )
    _round_start: float | None = None
    _round_bytes: int = 0

    def rtt_sample(self, rtt: float, min_rtt: float = 0.0) -> None:
        """One round-trip time: a PING's answer, or the kernel's ``tcpi_rtt``
        (with its ``tcpi_min_rtt``, when known)."""
        if not rtt > 0:
            return
        self.srtt = rtt if self.srtt is None else 0.875 * self.srtt + 0.125 * rtt
        least = min(rtt, min_rtt) if min_rtt > 0 else rtt
        self.min_rtt = least if self.min_rtt is None else min(self.min_rtt, least)

    def rate_sample(self, bytes_per_s: float, now: float) -> None:
        """One delivery-rate sample (say, the kernel's ``tcpi_delivery_rate``)."""
        if not bytes_per_s > 0:
            return
        rates = self._rates
        while rates and rates[-1][1] <= bytes_per_s:
            rates.pop()  # dominated: older and no faster
        rates.append((now, bytes_per_s))
        while rates[0][0] < now - RATE_HORIZON:
            rates.popleft()

    def delivered(self, n: int, now: float) -> None:
        """``n`` payload bytes arrived for the connection's streams; a round
        trip's worth of them makes one rate sample."""
        if self._round_start is None:
            # These bytes were on their way before the round began.
            self._round_start, self._round_bytes = now, 0
            return
        self._round_bytes += n
        elapsed = now - self._round_start
        if elapsed >= self.round_length:
            self.rate_sample(self._round_bytes / elapsed, now)
            self._round_start, self._round_bytes = now, 0

    @property
    def round_length(self) -> float:
        return max(MIN_ROUND, self.srtt or 0.0)

    def rate(self, now: float) -> float:
        """The highest recent delivery rate, bytes per second (0: unknown)."""
        rates = self._rates
        while rates and rates[0][0] < now - RATE_HORIZON:
            rates.popleft()
        return rates[0][1] if rates else 0.0

    def bdp(self, now: float) -> int:
        """Bandwidth-delay product in bytes (0 until both are known)."""
        if self.srtt is None:
            return 0

        return int(self.rate(now) * self.srtt)

    def notsent_lowat(self, now: float) -> int:
        """``TCP_NOTSENT_LOWAT`` for the connection's socket: the unsent queue
        holds :data:`LOWAT_SECONDS` of the link, within bounds, and never
        more than one bandwidth-delay product."""
        rate = self.rate(now)
        want = int(rate * LOWAT_SECONDS)
        bdp = self.bdp(now)
        if bdp:
            want = min(want, bdp)
        return max(LOWAT_MIN, min(LOWAT_MAX, want))


@attrs.define
class StreamTuner:
    """When one receiving stream's window should grow or shrink."""

    config: TunerConfig
    #: The window now (the owner reports changes with :meth:`resized`).
    window: int
    #: The window the stream was opened with: memory pressure and quiet
    #: rounds shrink it back to this, never below.
    initial: int = 0
    _round_start: float | None = None
    _round_bytes: int = 0
    #: The least we held unread at any point of the round (a burst that
    #: lands at once is no sign of a slow reader; a buffer that never
    #: drains is).
    _least_buffered: int = 2**62
    _quiet: int = 0
    #: Growth steps taken and shrink steps taken (for metrics and tests).
    grown: int = 0
    shrunk: int = 0

    def __attrs_post_init__(self) -> None:
        if self.initial <= 0:
            self.initial = self.window
        self.initial = max(self.config.floor, self.initial)

    def landed(self, n: int) -> None:
        """``n`` payload bytes landed."""
        self._round_bytes += n

    def resized(self, window: int) -> None:
        self.window = window

    def advise(self, link: LinkEstimate, now: float, pressure: bool, buffered: int = 0) -> int:
        """Bytes the window should change by now: > 0 grow, < 0 shrink, 0 keep.

        Called each time the reader took bytes, with what it still has to
        take (``buffered``); decides at most once per round. ``pressure``:
        the process's buffer budget is past its high-water mark.
        """
        cfg, w = self.config, self.window
        self._least_buffered = min(self._least_buffered, buffered)
        if pressure:
            self._new_round(now)
            if w > self.initial:
                self.shrunk += 1
            return min(0, self.initial - w)
        if self._round_start is None or link.srtt is None:
            # No round trip measured yet: nothing to size a window by.
            self._new_round(now)
            return 0
        elapsed = now - self._round_start
        if elapsed < link.round_length:
            return 0
        per_round = self._round_bytes * link.round_length / elapsed
        behind = self._least_buffered > w * cfg.reader_behind
        short = per_round >= w * cfg.full_round and not behind
        self._new_round(now)
        bdp = link.bdp(now)
        cap = min(cfg.ceiling, max(self.initial, cfg.headroom * bdp if bdp else cfg.ceiling))
        if short:
            self._quiet = 0
            grow = max(0, min(w * cfg.gain, cap) - w)
            self.grown += grow > 0
            return grow
        self._quiet += 1
        if self._quiet >= cfg.quiet_rounds and bdp and w > cap + cap // 2:
            self._quiet = 0
            self.shrunk += 1
            return max(self.initial, cap) - w
        return 0

    def _new_round(self, now: float) -> None:
        self._round_start, self._round_bytes, self._least_buffered = now, 0, 2**62
