"""Sans-IO model of one direction of an emulated link.

The forwarder process feeds every frame it reads from a TAP device to a
:class:`LinkModel` as ``offer(now, frame_len)`` and gets back the time at which
the frame must be written to the other TAP, or ``None`` if the frame is lost.
Keeping the model free of sockets, clocks and threads means the scheduling rules
can be tested exactly (same seed, same verdicts) and the I/O loop stays small.

Order of the stages a frame goes through, and why:

1. forced down / scheduled outage at arrival: a dead link accepts nothing;
2. drop-tail queue, byte limited, in front of a serializer running at
   ``rate_bps`` (a frame leaves the queue when its last bit is on the wire);
3. random loss and Gilbert-Elliott loss *after* serialization: radio loss
   happens on the air, so a lost frame still used its airtime;
4. one-way propagation delay plus jitter; unless ``reorder`` is set the
   delivery time is clamped to the previous delivery so jitter never reorders
   (a real FIFO path delays a packet behind its predecessor instead);
5. scheduled outage in flight: a frame whose ``[arrival, delivery]`` interval
   touches an outage window is lost, so nothing ever comes out of an outage.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any


class DropReason(enum.StrEnum):
    """Why a frame never reached the other side (the stats key)."""

    DOWN = "down"
    OUTAGE = "outage"
    QUEUE = "queue"
    LOSS = "loss"


@dataclass(frozen=True)
class Outage:
    """A window ``[start_s, start_s + duration_s)`` of link time with no connectivity."""

    start_s: float
    duration_s: float

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s


@dataclass(frozen=True)
class GilbertElliott:
    """Two-state Markov loss: the chain steps once per frame, then the frame is
    lost with the loss probability of the state it is in.  Bursts in the bad
    state last ``1 / p_bad_to_good`` frames on average."""

    p_good_to_bad: float
    p_bad_to_good: float
    loss_in_bad: float = 1.0
    loss_in_good: float = 0.0

    def validate(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"gilbert_elliott.{f.name} must be in [0, 1], got {v}")

    @property
    def stationary_bad(self) -> float:
        s = self.p_good_to_bad + self.p_bad_to_good
        return self.p_good_to_bad / s if s > 0 else 0.0

    @property
    def mean_loss(self) -> float:
        b = self.stationary_bad
        return b * self.loss_in_bad + (1.0 - b) * self.loss_in_good

    @property
    def correlation(self) -> float:
        """Second eigenvalue of the state chain: how strongly consecutive frames'
        states are correlated (0 = independent).  Used to widen loss tolerances."""
        return max(0.0, 1.0 - self.p_good_to_bad - self.p_bad_to_good)


@dataclass(frozen=True)
class DirectionParams:
    """Everything that shapes one direction.  ``rate_bps=None`` means no
    serialization limit (and then no queue); ``queue_bytes=None`` an unbounded
    queue.  Rate and queue count Ethernet frame bytes as read from the TAP
    (14-byte header + IP packet; no preamble, FCS or inter-frame gap)."""

    rate_bps: float | None = None
    queue_bytes: int | None = None
    delay_s: float = 0.0
    jitter_s: float = 0.0
    reorder: bool = False
    loss: float = 0.0
    gilbert_elliott: GilbertElliott | None = None
    outages: tuple[Outage, ...] = ()
    outage_every_s: float | None = None
    outage_duration_s: float = 0.0
    outage_offset_s: float | None = None

    def __post_init__(self) -> None:
        if self.rate_bps is not None and self.rate_bps <= 0:
            raise ValueError(f"rate_bps must be positive, got {self.rate_bps}")
        if self.queue_bytes is not None and self.queue_bytes <= 0:
            raise ValueError(f"queue_bytes must be positive, got {self.queue_bytes}")
        if self.delay_s < 0 or self.jitter_s < 0:
            raise ValueError("delay and jitter must not be negative")
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss must be in [0, 1], got {self.loss}")
        if self.gilbert_elliott is not None:
            self.gilbert_elliott.validate()
        for o in self.outages:
            if o.duration_s <= 0 or o.start_s < 0:
                raise ValueError(f"bad outage {o}: start must be >= 0 and duration > 0")
        if self.outage_every_s is not None:
            if self.outage_every_s <= 0:
                raise ValueError("outage_every_s must be positive")
            if not 0 < self.outage_duration_s <= self.outage_every_s:
                raise ValueError("outage_duration_s must be in (0, outage_every_s]")
            if self.outage_offset_s is not None and self.outage_offset_s < 0:
                raise ValueError("outage_offset_s must not be negative")

    # -- derived figures used by the self-check and the docs -----------------

    @property
    def expected_loss(self) -> float:
        """Long-run fraction of frames lost on the wire (outages and queue excluded)."""
        ge = self.gilbert_elliott.mean_loss if self.gilbert_elliott else 0.0
        return 1.0 - (1.0 - self.loss) * (1.0 - ge)

    @property
    def loss_after_loss(self) -> float:
        """P(a frame is lost | the previous frame was lost): equals
        ``expected_loss`` for independent loss, higher for bursty loss."""
        p = self.expected_loss
        if p == 0.0:
            return 0.0
        ge, keep = self.gilbert_elliott, 1.0 - self.loss
        if ge is None:
            return p
        # P(neither of two consecutive frames lost by the chain); the chain steps
        # before each frame, so the second frame's state follows the first's.
        pi_b = ge.stationary_bad
        pi = {"g": 1.0 - pi_b, "b": pi_b}
        ok = {"g": 1.0 - ge.loss_in_good, "b": 1.0 - ge.loss_in_bad}
        step = {
            ("g", "g"): 1.0 - ge.p_good_to_bad,
            ("g", "b"): ge.p_good_to_bad,
            ("b", "g"): ge.p_bad_to_good,
            ("b", "b"): 1.0 - ge.p_bad_to_good,
        }
        both_ok = sum(pi[a] * ok[a] * step[a, b] * ok[b] for a, b in step)
        both_lost = 1.0 - 2.0 * (1.0 - p) + keep * keep * both_ok
        return both_lost / p

    @property
    def loss_variance(self) -> float:
        """Asymptotic per-frame variance of the loss indicator, including the
        correlation between frames that Gilbert-Elliott bursts bring: the lost
        fraction of n frames has variance ``loss_variance / n``."""
        p = self.expected_loss
        var = p * (1.0 - p)
        ge = self.gilbert_elliott
        if ge is not None and ge.correlation > 0.0:
            lam = ge.correlation
            if lam >= 1.0:
                return math.inf
            spread = (ge.loss_in_bad - ge.loss_in_good) ** 2
            pi_b = ge.stationary_bad
            keep = 1.0 - self.loss
            # Cov(X0, Xk) = keep^2 spread pi_b pi_g lam^k, summed over k >= 1, twice.
            var += 2.0 * keep * keep * spread * pi_b * (1.0 - pi_b) * lam / (1.0 - lam)
        return var

    @property
    def has_outages(self) -> bool:
        return bool(self.outages) or self.outage_every_s is not None

    def serialization_s(self, frame_len: int) -> float:
        return frame_len * 8.0 / self.rate_bps if self.rate_bps else 0.0

    # -- outage schedule -------------------------------------------------------

    @property
    def _period_offset(self) -> float:
        if self.outage_offset_s is not None:
            return self.outage_offset_s
        return self.outage_every_s or 0.0

    def outage_windows(self, start: float = 0.0) -> Iterator[Outage]:
        """Outage windows that end after ``start``, in order (infinite if periodic)."""
        explicit = sorted((o for o in self.outages if o.end_s > start), key=lambda o: o.start_s)
        periodic: Iterator[Outage] = iter(())
        if self.outage_every_s is not None:
            every, off, dur = self.outage_every_s, self._period_offset, self.outage_duration_s
            k0 = max(0, math.floor((start - off) / every)) if start > off else 0
            periodic = (Outage(off + k * every, dur) for k in _count_from(k0))
            periodic = (o for o in periodic if o.end_s > start)
        # merge the two sorted streams
        pending_p = next(periodic, None)
        i = 0
        while i < len(explicit) or pending_p is not None:
            if pending_p is None or (
                i < len(explicit) and explicit[i].start_s <= pending_p.start_s
            ):
                yield explicit[i]
                i += 1
            else:
                yield pending_p
                pending_p = next(periodic, None)

    def in_outage(self, t: float) -> bool:
        return self.outage_overlaps(t, t)

    def outage_overlaps(self, a: float, b: float) -> bool:
        """True if an outage window intersects the closed interval ``[a, b]``."""
        for o in self.outages:
            if o.start_s <= b and a < o.end_s:
                return True
        every = self.outage_every_s
        if every is not None:
            off = self._period_offset
            if a < off:
                return off <= b
            k = math.floor((a - off) / every)
            start = off + k * every
            if a < start + self.outage_duration_s:
                return True
            return start + every <= b
        return False

    # -- transport to the forwarder process -----------------------------------

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        d["outages"] = [[o.start_s, o.duration_s] for o in self.outages]
        ge = self.gilbert_elliott
        d["gilbert_elliott"] = (
            None if ge is None else {f.name: getattr(ge, f.name) for f in fields(ge)}
        )
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DirectionParams:
        kw = dict(d)
        kw["outages"] = tuple(Outage(float(s), float(u)) for s, u in kw.get("outages", ()))
        ge = kw.get("gilbert_elliott")
        kw["gilbert_elliott"] = None if ge is None else GilbertElliott(**ge)
        return cls(**kw)


def _count_from(k: int) -> Iterator[int]:
    while True:
        yield k
        k += 1


@dataclass
class DirectionStats:
    """Counters kept by the model; the forwarder adds what it actually wrote."""

    offered: int = 0
    offered_bytes: int = 0
    scheduled: int = 0
    scheduled_bytes: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {r.value: 0 for r in DropReason})

    def to_json(self) -> dict[str, Any]:
        return {
            "offered": self.offered,
            "offered_bytes": self.offered_bytes,
            "scheduled": self.scheduled,
            "scheduled_bytes": self.scheduled_bytes,
            "dropped": dict(self.dropped),
        }


_NEG_INF = float("-inf")


class LinkModel:
    """One direction of the link.  Deterministic for a given seed and input.

    Times are seconds of *link time* (any monotonic origin; outage schedules are
    relative to link time 0).  ``offer`` must be called with non-decreasing
    ``now``.
    """

    __slots__ = (
        "_busy_until",
        "_delay",
        "_ge",
        "_ge_bad",
        "_jitter",
        "_last_delivery",
        "_loss",
        "_queue_limit",
        "_reorder",
        "_s_per_byte",
        "down",
        "last_drop",
        "params",
        "rng",
        "stats",
    )

    def __init__(self, params: DirectionParams, seed: int = 0) -> None:
        self.params = params
        self.rng = random.Random(seed)
        self.stats = DirectionStats()
        self.down = False
        self.last_drop: DropReason | None = None
        self._s_per_byte = 8.0 / params.rate_bps if params.rate_bps else 0.0
        self._queue_limit = params.queue_bytes if params.rate_bps else None
        self._delay = params.delay_s
        self._jitter = params.jitter_s
        self._reorder = params.reorder
        self._loss = params.loss
        self._ge = params.gilbert_elliott
        self._ge_bad = False
        self._busy_until = _NEG_INF
        self._last_delivery = _NEG_INF

    def backlog_bytes(self, now: float) -> float:
        """Bytes still waiting for (or in) the serializer at ``now``."""
        if not self._s_per_byte or self._busy_until <= now:
            return 0.0
        return (self._busy_until - now) / self._s_per_byte

    def set_down(self, down: bool) -> None:
        """Force the link down or up.  Going down empties the queue and the wire:
        the I/O loop must discard the frames it still holds for this direction
        (see :meth:`count_flushed`), and a later frame must not wait behind them."""
        self.down = down
        if down:
            self._busy_until = _NEG_INF
            self._last_delivery = _NEG_INF

    def count_flushed(self, frames: int, nbytes: int) -> None:
        self.stats.scheduled -= frames
        self.stats.scheduled_bytes -= nbytes
        self.stats.dropped[DropReason.DOWN.value] += frames

    def _drop(self, reason: DropReason) -> None:
        self.last_drop = reason
        self.stats.dropped[reason.value] += 1

    def offer(self, now: float, size: int) -> float | None:
        """Decide the fate of a ``size``-byte frame arriving at ``now``: its
        delivery time, or ``None`` (the reason is then in ``last_drop``)."""
        st = self.stats
        st.offered += 1
        st.offered_bytes += size
        self.last_drop = None
        if self.down:
            self._drop(DropReason.DOWN)
            return None
        p = self.params
        has_outages = p.outages or p.outage_every_s is not None
        if has_outages and p.outage_overlaps(now, now):
            self._drop(DropReason.OUTAGE)
            return None

        spb = self._s_per_byte
        if spb:
            busy = self._busy_until
            if busy > now:
                limit = self._queue_limit
                if limit is not None and (busy - now) / spb + size > limit:
                    self._drop(DropReason.QUEUE)
                    return None
                finish = busy + size * spb
            else:
                finish = now + size * spb
            self._busy_until = finish
        else:
            finish = now

        rng = self.rng
        lost = self._loss > 0.0 and rng.random() < self._loss
        ge = self._ge
        if ge is not None:
            # Step the chain for every frame that reached the air, lost or not,
            # so burst lengths are counted in frames as the model promises.
            if self._ge_bad:
                if rng.random() < ge.p_bad_to_good:
                    self._ge_bad = False
            elif rng.random() < ge.p_good_to_bad:
                self._ge_bad = True
            p_state = ge.loss_in_bad if self._ge_bad else ge.loss_in_good
            if p_state > 0.0 and rng.random() < p_state:
                lost = True
        if lost:
            self._drop(DropReason.LOSS)
            return None

        deliver = finish + self._delay
        if self._jitter:
            deliver += rng.uniform(-self._jitter, self._jitter)
            if deliver < finish:
                deliver = finish
        if not self._reorder and deliver < self._last_delivery:
            deliver = self._last_delivery
        if has_outages and p.outage_overlaps(now, deliver):
            self._drop(DropReason.OUTAGE)
            return None
        self._last_delivery = deliver
        st.scheduled += 1
        st.scheduled_bytes += size
        return deliver
