"""Limits on HTTP/2 frames that are cheap to send and cost the receiver work.

A peer can make an HTTP/2 server work, or answer, for free:

- HEADERS then RST_STREAM at once, over and over (CVE-2023-44487, "rapid
  reset"); likewise requests the server must refuse (unknown dial id,
  unknown path), each one a lookup, a log line and an RST_STREAM;
- PING and SETTINGS frames, each of which must be acknowledged
  (CVE-2019-9512, CVE-2019-9515);
- frames that make the server answer while the peer never reads the answers
  (CVE-2019-9514 and the above), so that they pile up in memory.

:class:`FloodGuard` keeps one token bucket per kind of frame and connection.
A legitimate peer never comes near the limits; a peer that empties a bucket
is told GOAWAY(ENHANCE_YOUR_CALM) and dropped, with a metric. The clock is
passed in, so this stays sans-IO and testable with any clock.
"""

from __future__ import annotations

import attrs

from protocol import messages
from protocol.errors import RemoteProtocolError


class FloodDetected(RemoteProtocolError):
    """The peer exceeded a frame budget; ``reason`` names which one."""

    reason = "flood"


@attrs.frozen
class Budget:
    """A token bucket: ``burst`` at once, refilled at ``rate`` per second."""

    rate: float
    burst: float


#: Entries (``key=value`` pairs) in one ``identifiers`` message. konnectivity
#: agents declare a node's identity with ``--agent-identifiers``: its host
#: name, its addresses, a CIDR or two and maybe ``default-route``, a handful
#: of entries. 64 leaves room for a node with many addresses and pod CIDRs,
#: and bounds one parse at about 0.35 ms (200 CIDRs took 1.2 ms each).
MAX_IDENTIFIER_ENTRIES = 64


@attrs.frozen
class ControlBudget:
    """One control message type: a token bucket and a size cap (encoded bytes)."""

    rate: float
    burst: float
    max_size: int


@attrs.frozen
class ControlLimits:
    """Budgets for the control messages an agent sends the broker.

    A legitimate agent sends its identifiers in the connect headers and an
    ``identifiers`` message only when they change; one ``drain`` when it shuts
    down; a ``dial_fail`` for each dial that failed. Answers to dials the
    broker sent (not yet answered, by a ``dial_fail`` or a data stream) are
    budgeted by the dials and cost no tokens; only unsolicited ``dial_fail``
    spend the ``dial_fail`` bucket. ``other`` is every type an agent may not
    send (``dial``, ``cancel``) and unknown types (ignored, so that the
    protocol can grow, but decoded all the same).
    """

    identifiers: ControlBudget = ControlBudget(rate=0.5, burst=5.0, max_size=4096 + 64)
    drain: ControlBudget = ControlBudget(rate=0.5, burst=5.0, max_size=64)
    #: ``msg`` is at most 4,096 characters of UTF-8.
    dial_fail: ControlBudget = ControlBudget(rate=10.0, burst=100.0, max_size=4 * 4096 + 256)
    #: Every message an agent may send today fits in 16 KiB (the largest is
    #: a ``dial_fail``); a new type that needs more comes with its own budget.
    other: ControlBudget = ControlBudget(rate=2.0, burst=20.0, max_size=16 * 1024)
    identifier_entries: int = MAX_IDENTIFIER_ENTRIES
    #: Dials remembered as owed an answer; past it the oldest is forgotten
    #: (its late answer then counts as unsolicited).
    remembered_dials: int = 4096


@attrs.frozen
class FloodLimits:
    #: Streams the peer reset, or that we refused (rapid reset, unknown ids).
    resets: Budget = Budget(rate=1000.0, burst=5000.0)
    #: PINGs we must acknowledge. Keepalive sends one per 15 s; gRPC clients
    #: probe bandwidth with a few per second at most while data flows.
    pings: Budget = Budget(rate=200.0, burst=1000.0)
    #: SETTINGS frames we must acknowledge; peers send one or two per connection.
    settings: Budget = Budget(rate=10.0, burst=100.0)
    #: Bytes of automatic replies (ACKs, RST_STREAMs) queued while the peer
    #: does not read what we already sent.
    max_unread_replies: int = 1024 * 1024
    #: Control messages from the agent, per type (the broker's side only).
    control: ControlLimits = ControlLimits()


class FloodGuard:
    """Per-connection budgets; :meth:`spend` says when one is exhausted."""

    KINDS = ("resets", "pings", "settings")

    def __init__(self, limits: FloodLimits, now: float) -> None:
        self.limits = limits
        self._budgets: dict[str, Budget | ControlBudget] = {
            kind: getattr(limits, kind) for kind in self.KINDS
        }
        for kind in ControlGuard.TYPES:
            self._budgets[f"control_{kind}"] = getattr(limits.control, kind)
        self._tokens = {kind: budget.burst for kind, budget in self._budgets.items()}
        self._stamp = dict.fromkeys(self._budgets, now)
        #: The first budget exhausted, if any (a FloodDetected ``reason``).
        self.exhausted: str | None = None

    def _budget(self, kind: str) -> Budget | ControlBudget:
        return self._budgets[kind]

    def exhaust(self, reason: str) -> bool:
        """Record a budget broken at once (a size cap); always False."""
        self.exhausted = self.exhausted or reason
        return False

    def spend(self, kind: str, now: float, n: int = 1) -> bool:
        """Take ``n`` tokens of ``kind``; False (and remembered) once empty."""
        budget = self._budget(kind)
        elapsed = max(0.0, now - self._stamp[kind])
        self._stamp[kind] = now
        tokens = min(budget.burst, self._tokens[kind] + elapsed * budget.rate) - n
        self._tokens[kind] = tokens
        if tokens < 0:
            self.exhausted = self.exhausted or f"flood_{kind}"
            return False
        return True

    def check(self) -> None:
        """Raise :class:`FloodDetected` if any budget ran out."""
        if self.exhausted is not None:
            raise FloodDetected(
                f"peer exceeded its {self.exhausted[6:]} budget", reason=self.exhausted
            )


class ControlGuard:
    """Budgets for the control messages an agent sends (the broker's side).

    :meth:`admit` each decoded message (``None`` for an unknown type) with
    its encoded size before acting on it; False means a budget ran out and
    the connection must end with GOAWAY(ENHANCE_YOUR_CALM) (the reason is in
    the :class:`FloodGuard`, ``flood_control_<type>`` for a rate,
    ``flood_control_<type>_size`` for a size and
    ``flood_control_identifiers_entries`` for the entry cap). Tell it of
    every dial sent and every data stream that answers one, so that answers
    to our own dials never count as a flood.
    """

    TYPES = ("identifiers", "drain", "dial_fail", "other")

    def __init__(self, flood: FloodGuard) -> None:
        self.flood = flood
        self.limits = flood.limits.control
        self._owed: dict[int, None] = {}  # dial ids sent, not answered yet (in order)

    @property
    def open_dials(self) -> int:
        return len(self._owed)

    def dial_sent(self, dial_id: int) -> None:
        self._owed[dial_id] = None
        if len(self._owed) > self.limits.remembered_dials:
            del self._owed[next(iter(self._owed))]

    def dial_answered(self, dial_id: int) -> bool:
        """The dial got its answer; False if none was owed."""
        return self._owed.pop(dial_id, False) is None

    def admit(self, msg: messages.Message | None, size: int, now: float) -> bool:
        if isinstance(msg, messages.Identifiers):
            kind = "identifiers"
        elif isinstance(msg, messages.Drain):
            kind = "drain"
        elif isinstance(msg, messages.DialFail):
            kind = "dial_fail"
        else:
            kind = "other"
        budget: ControlBudget = getattr(self.limits, kind)
        if size > budget.max_size:
            return self.flood.exhaust(f"flood_control_{kind}_size")
        # Entries are counted before anyone parses them: "&" separates them.
        entries = msg.value.count("&") + 1 if isinstance(msg, messages.Identifiers) else 0
        if entries > self.limits.identifier_entries:
            return self.flood.exhaust("flood_control_identifiers_entries")
        if isinstance(msg, messages.DialFail) and self.dial_answered(msg.id):
            return True  # the answer to a dial we sent: budgeted by the dial
        return self.flood.spend(f"control_{kind}", now)


class FrameSizeGuard:
    """Rejects an oversized HTTP/2 frame as soon as its 9-byte header arrives.

    h2 checks a frame's length only once the whole frame is buffered, so a
    header claiming 16 MiB makes it buffer up to 16 MiB first. This watches
    the byte stream ahead of h2 and raises at the header instead.
    """

    def __init__(self, max_frame_size: int, *, preface: int = 0) -> None:
        self.max_frame_size = max_frame_size
        self._skip = preface  # bytes before the next frame header
        self._header = bytearray()
        self._in_goaway = False  # the bytes being skipped are a GOAWAY's payload
        #: After :meth:`check`: the offset in its ``data`` just past the
        #: first GOAWAY frame that ended there (None: no GOAWAY ended).
        self.goaway_end: int | None = None

    @property
    def between_frames(self) -> bool:
        return not self._skip and not self._header

    def check(self, data: bytes) -> list[int]:
        """Raise :class:`FrameTooLarge` if ``data`` starts an oversized frame.

        Returns the offsets in ``data`` just past each HEADERS frame header
        (where a new stream may open), so a burst can be fed to h2 in parts;
        sets :attr:`goaway_end`.
        """
        view = memoryview(data)
        headers: list[int] = []
        self.goaway_end = None
        while view:
            if self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                view = view[n:]
                if not self._skip:
                    self._goaway_done(len(data) - len(view))
                continue
            need = 9 - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) == 9:
                length = int.from_bytes(self._header[:3], "big")
                if length > self.max_frame_size:
                    raise FrameTooLarge(
                        f"Received overlong frame: length {length}, max {self.max_frame_size}"
                    )
                kind = self._header[3]
                if kind == 0x1:  # HEADERS
                    headers.append(len(data) - len(view))
                self._skip = length
                self._header.clear()
                if kind == 0x7:  # GOAWAY
                    self._in_goaway = True
                    if not length:
                        self._goaway_done(len(data) - len(view))
        return headers

    def _goaway_done(self, offset: int) -> None:
        if self._in_goaway:
            self._in_goaway = False
            if self.goaway_end is None:
                self.goaway_end = offset


class FrameTooLarge(RemoteProtocolError):
    """A frame header announced more than our MAX_FRAME_SIZE."""

    reason = "h2"


@attrs.define
class _Record:
    strikes: list[float]
    until: float = 0.0
    penalty: float = 0.0


class FloodPenalties:
    """Source addresses whose connections keep ending in a flood.

    The per-connection budgets end a flood within its burst, but an agent
    that reconnects the moment it is told GOAWAY(ENHANCE_YOUR_CALM) spends a
    burst per connection plus a TLS handshake, dozens of times a second: a
    core of broker time, taken from every other tenant. So the budgets count
    strikes per source address: ``free`` floods within ``window`` seconds are
    forgiven (a buggy agent, a test), the next one closes the address's new
    connections at accept, before any TLS, for ``first`` seconds, doubling
    with every further flood up to ``cap``. Connections already open are
    untouched, and an address that stays calm for ``window`` seconds starts
    afresh. At most ``max_sources`` addresses are remembered (the oldest are
    forgotten first), so a spoofing flood cannot grow memory. ``free`` 0
    turns the penalty off.
    """

    def __init__(
        self,
        *,
        free: int = 3,
        window: float = 60.0,
        first: float = 1.0,
        cap: float = 60.0,
        max_sources: int = 4096,
    ) -> None:
        self.free, self.window, self.first, self.cap = free, window, first, cap
        self.max_sources = max_sources
        self._sources: dict[str, _Record] = {}

    def refused(self, source: str, now: float) -> bool:
        """Whether a new connection from ``source`` is closed at accept."""
        record = self._sources.get(source)
        return record is not None and now < record.until

    def record_flood(self, source: str, now: float) -> float:
        """Count a flood from ``source``; the penalty it starts now (0: forgiven)."""
        if self.free <= 0:  # turned off
            return 0.0
        record = self._sources.pop(source, None) or _Record([])
        recent = [t for t in record.strikes if now - t < self.window]
        if not recent:  # calm for a whole window: start afresh
            record.penalty = 0.0
        record.strikes = [*recent, now][-(self.free + 1) :]
        if len(record.strikes) <= self.free:
            record.penalty = 0.0
        else:
            record.penalty = min(self.cap, record.penalty * 2 if record.penalty else self.first)
            record.until = now + record.penalty
        self._sources[source] = record  # most recent last
        while len(self._sources) > self.max_sources:
            del self._sources[next(iter(self._sources))]
        return record.penalty

    def __len__(self) -> int:
        return len(self._sources)
