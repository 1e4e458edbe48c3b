"""The tunnel over a trio stream: :class:`TunnelConnection` and its streams.

Both the broker and the agent run one :class:`TunnelConnection` per
agent-to-broker connection: a :class:`protocol.session.TunnelSession` run by
the shared :class:`tether.netio.h2driver.H2Driver` (one reader, one writer),
plus the keepalive that detects dead links (one timer for the whole
process, :mod:`tether.netio.keepalive`). Data-stream events are routed
to :class:`TunnelStream` objects; everything else goes to the owner's
:class:`ConnectionHandler`. Payload waits in each stream's small outbox; the
writer's scheduler (:mod:`tether.netio.scheduler`) moves it into HTTP/2.

Windows follow the link (:mod:`protocol.tuner`): each connection keeps a
:class:`protocol.tuner.LinkEstimate` (RTT from keepalive PINGs and
``TCP_INFO``, delivery rate from the payload its streams receive and the
kernel's estimate), each receiving stream with a budget grant a
:class:`protocol.tuner.StreamTuner`, whose advice goes through the
process's :class:`protocol.budget.BufferBudget`. The same estimate sets the
socket's ``TCP_NOTSENT_LOWAT`` unless it was configured.
"""

from __future__ import annotations

import collections
import logging
import math
import os
from collections.abc import Callable
from typing import Protocol

import attrs
import h2.errors
import trio

from protocol import budget as budgets
from protocol import events, flow, messages, session, tuner
from protocol.codes import CloseCode
from protocol.errors import ProtocolError
from protocol.keepalive import Action, LinkKeepalive, Mode
from protocol.outcomes import CloseReason
from tether.netio import scheduler
from tether.netio.h2driver import H2Driver
from tether.netio.keepalive import timers
from tether.netio.scheduler import RoundRobin
from tether.netio.sockopts import set_notsent_lowat, tcp_info

log = logging.getLogger(__name__)

#: Payload a stream may queue for the scheduler before its writer waits (at
#: full window; a stream with a smaller window queues less, see
#: :func:`protocol.budget.outbox_limit`).
OUTBOX_LIMIT = budgets.OUTBOX_LIMIT
#: Bounds of the tuning task's period (it follows the link's RTT).
TUNE_MIN_S = 0.05
TUNE_MAX_S = 1.0
#: A tuning round that moved fewer bytes (both ways) is quiet: keepalive
#: PINGs and their ACKs, a keystroke. The tuner then sleeps until the next
#: read or write instead of polling every round.
TUNE_QUIET_BYTES = 512
#: TCP_NOTSENT_LOWAT is set again when the estimate moved by more than this share.
LOWAT_CHANGE = 0.25


class TunnelClosed(Exception):
    """The tunnel connection is gone; no more streams or messages."""


class StreamAborted(Exception):
    """The peer reset the stream, or closed it with an error reason."""

    def __init__(self, reason: str, close: messages.Close | None = None) -> None:
        super().__init__(reason)
        self.close = close


@attrs.frozen
class Keepalive:
    interval: float = 15.0
    timeout: float = 15.0


class ConnectionHandler(Protocol):
    """What the owner of a connection reacts to (called from the reader)."""

    def on_control_requested(self, ev: events.ControlRequested) -> None: ...
    def on_control_accepted(self, ev: events.ControlAccepted) -> None: ...
    def on_message(self, msg: messages.Message) -> None: ...
    def on_data_stream_requested(self, ev: events.DataStreamRequested) -> None: ...


class Tunnel(Protocol):
    """One tunneled TCP connection as the frontends and the relay use it:
    a :class:`TunnelStream` of a Tether agent, or a connection of a
    konnectivity agent's multiplexed stream (:mod:`broker.konnectivity_agent`)."""

    stream_id: int

    @property
    def buffered(self) -> int: ...

    @property
    def aborted(self) -> bool: ...

    async def receive(self) -> events.StreamData | None: ...

    def acknowledge(self, flow_len: int) -> None: ...

    async def wait_writable(self) -> int: ...

    async def send_all(self, data: bytes | memoryview) -> None: ...

    def send_eof(self) -> None: ...

    def send_close(self, code: CloseCode, msg: str) -> None: ...

    def reset(self, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None: ...

    def forget(self) -> None:
        """The owner is done with it (see :meth:`TunnelConnection.forget`)."""


class ReceiveQueue:
    """The receiving half every kind of tunnel shares: payload pieces the
    connection's reader delivered and the frontend has not taken yet, then
    the end (``None`` from :meth:`receive`) or an abort (raised)."""

    def __init__(self) -> None:
        self._chunks: collections.deque[events.StreamData] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._abort: StreamAborted | None = None
        self._readable = trio.Event()

    def _deliver(self, ev: events.StreamData) -> None:
        self._chunks.append(ev)
        self._buffered += len(ev.data)
        self._readable.set()

    def _ended(self) -> None:
        self._eof = True
        self._readable.set()

    def _record_abort(self, exc: StreamAborted) -> None:
        """Keep the first abort; wake a waiting :meth:`receive` to raise it."""
        if self._abort is None:
            self._abort = exc
        self._readable.set()

    @property
    def buffered(self) -> int:
        """Payload bytes received but not yet taken by :meth:`receive`."""
        return self._buffered

    @property
    def aborted(self) -> bool:
        return self._abort is not None

    @property
    def at_eof(self) -> bool:
        """The peer ended the stream cleanly."""
        return self._eof

    async def receive(self) -> events.StreamData | None:
        """Next payload piece; ``None`` at the end. Raises StreamAborted.

        Call ``acknowledge`` with the piece's ``flow_len`` once its bytes
        have been written to the destination: that, and only that, lets the
        peer send more on this tunnel.
        """
        while not self._chunks:
            if self._abort is not None:
                raise self._abort
            if self._eof:
                return None
            self._readable = trio.Event()
            await self._readable.wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk.data)
        return chunk


class TunnelStream(ReceiveQueue):
    """One tunneled TCP connection: an HTTP/2 stream carrying msgpack bins."""

    def __init__(
        self,
        conn: TunnelConnection,
        stream_id: int,
        dial_id: int,
        grant: budgets.Grant | None = None,
    ) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.dial_id = dial_id
        #: This stream's share of the process's buffer budget, returned once
        #: when the stream is over (see :meth:`_release`).
        self.grant = grant
        self._outbox_limit = budgets.outbox_limit(grant.window) if grant else OUTBOX_LIMIT
        #: Grows and shrinks our receive window with the link; only a stream
        #: with a budget grant is tuned (the budget bounds every change).
        self.tuner = (
            tuner.StreamTuner(conn.tuner_config, grant.window)
            if grant is not None and conn.budget is not None
            else None
        )
        self._forgotten = False
        ReceiveQueue.__init__(self)
        self._writable = trio.Event()
        self._accepted_event = trio.Event()
        # Outgoing payload waiting for the connection's scheduler, and what
        # to do once it has drained: END_STREAM, or a close map then END.
        self._outbox = bytearray()
        self._out_eof = False
        self._out_close: messages.Close | None = None
        self.queued = False  # in the scheduler's round-robin line
        self._recent_start = -math.inf
        self._recent_bytes = 0

    # -------------------------------------------------- fed by the reader

    def _aborted(self, exc: StreamAborted) -> None:
        self._record_abort(exc)
        # Nothing queued is sent after an abort (the scheduler drops us).
        self._outbox.clear()
        self._out_eof = False
        self._out_close = None
        self._writable.set()
        self._accepted_event.set()
        self._release()

    def _release(self) -> None:
        """Return the stream's budget share, exactly once."""
        grant, self.grant = self.grant, None
        if grant is not None and self.conn.budget is not None:
            self.conn.budget.release(grant)

    def _window_opened(self) -> None:
        self._writable.set()
        if self._outbox or self._out_eof or self._out_close:
            self.conn.schedule(self)

    def take(self, limit: int) -> int:
        """Scheduler: move up to ``limit`` queued bytes into h2; report how
        many. Finishes the stream (END_STREAM or close) once drained."""
        sess = self.conn.session
        sent = 0
        if self._outbox:
            n = min(limit, len(self._outbox), sess.send_capacity(self.stream_id))
            if n > 0:
                with memoryview(self._outbox) as view:  # released before the del
                    more = n < len(self._outbox)
                    sent = sess.send_data(self.stream_id, view[:n], more=more)
                del self._outbox[:sent]
                self._writable.set()
        if not self._outbox:
            if self._out_close is not None:
                close, self._out_close, self._out_eof = self._out_close, None, False
                if not sess.send_close(self.stream_id, close):
                    self.reset()
            elif self._out_eof:
                self._out_eof = False
                sess.end_stream(self.stream_id)
            if self._forgotten:
                # The owner left before the last bytes went: now it is over.
                self.conn.streams.pop(self.stream_id, None)
                self._release()
        return sent

    @property
    def has_output(self) -> bool:
        return bool(self._outbox) or self._out_eof or self._out_close is not None

    @property
    def small(self) -> bool:
        return (
            len(self._outbox) <= scheduler.SMALL_MESSAGE
            and self._recent_bytes <= scheduler.SMALL_RATE
        )

    def _count_queued(self, n: int) -> None:
        """How much this stream queued lately (for :attr:`small`)."""
        now = trio.current_time()
        if now - self._recent_start > scheduler.SMALL_WINDOW_S:
            self._recent_start, self._recent_bytes = now, 0
        self._recent_bytes += n

    def _accept(self) -> None:
        self._accepted_event.set()

    # ---------------------------------------------------------- public

    async def wait_accepted(self) -> None:
        """Agent: wait for the broker to pair this stream with its dial."""
        await self._accepted_event.wait()
        if self._abort is not None:
            raise self._abort

    def grow_window(self, n: int) -> bool:
        """Raise our receive window by ``n`` bytes if the process's buffer
        budget allows it (for windows that grow toward a link's
        bandwidth-delay product); say whether it grew."""
        budget, grant = self.conn.budget, self.grant
        if budget is None or grant is None or not budget.may_grow(grant, n):
            if budget is not None and grant is not None:
                budget.growth_refused_total += 1
            return False
        if self.conn.session.withheld(self.stream_id):
            return False  # still shrinking: the budget has not caught up
        if not self.conn.session.grow_window(self.stream_id, n):
            return False
        budget.grow(grant, n)
        self._resized(grant)
        self.conn.wake_writer()
        return True

    def shrink_window(self, n: int) -> int:
        """Lower our receive window by up to ``n`` bytes; return by how much.
        The budget share follows as the reader takes the bytes already
        credited (see :meth:`protocol.session.TunnelSession.shrink_window`),
        so what the stream may hold never exceeds what it reserved."""
        if self.grant is None:
            return 0
        return self.conn.session.shrink_window(self.stream_id, n)

    def _resized(self, grant: budgets.Grant) -> None:
        self._outbox_limit = budgets.outbox_limit(grant.window)
        if self.tuner is not None:
            self.tuner.resized(self.conn.session.stream_window(self.stream_id))

    def _landed(self, n: int) -> None:
        """Reader: ``n`` payload bytes for this stream arrived (the tuner
        counts them per round)."""
        if self.tuner is not None:
            self.tuner.landed(n)

    def acknowledge(self, flow_len: int) -> None:
        sess, sid = self.conn.session, self.stream_id
        before = sess.withheld(sid)
        if sess.acknowledge(sid, flow_len):
            self.conn.wake_writer()  # a WINDOW_UPDATE to send
        grant, budget = self.grant, self.conn.budget
        if grant is None or budget is None or self.tuner is None:
            return
        if before:
            # Credit kept back after a shrink: the bytes it covered have
            # left, so their share of the budget goes back now.
            absorbed = before - sess.withheld(sid)
            if absorbed > 0:
                budget.shrink(grant, absorbed)
                self._resized(grant)
            return
        change = self.tuner.advise(
            self.conn.link,
            trio.current_time(),
            budget.reserved > budget.high_water,
            self.buffered,
        )
        if change > 0:
            self.grow_window(change)
        elif change < 0 and self.shrink_window(-change):
            self.tuner.resized(sess.stream_window(sid))

    async def wait_writable(self) -> int:
        """Wait for send credit; return how many payload bytes may go now.

        Bounded by the peer's window (minus what is already queued here) and
        by the stream's outbox, so a pump never reads more from its socket
        than can be sent.
        """
        stalled = False
        while True:
            if self._abort is not None:
                raise self._abort
            self.conn.check_open()
            room = flow.writable(
                self.conn.session.send_capacity(self.stream_id),
                len(self._outbox),
                self._outbox_limit,
            )
            if room.cap > 0:
                return room.cap
            if room.stalled and not stalled:
                # Counted once per wait, and only here, off the fast path.
                stalled = True
                if self.conn._on_stall is not None:
                    self.conn._on_stall()
            # Only our own outbox full (not a stall), or no window: wait.
            self._writable = trio.Event()
            await self._writable.wait()

    async def send_all(self, data: bytes | memoryview) -> None:
        """Queue ``data`` for the scheduler, waiting for window and outbox room.

        Bytes reach h2 in round-robin quanta across streams (see
        :meth:`TunnelConnection.schedule`), so one bulk stream cannot queue
        megabytes ahead of an interactive one. When nothing else is queued
        or being written, this task writes them through to the socket
        itself (:meth:`tether.netio.h2driver.H2Driver.write_through`).
        """
        view = memoryview(data)
        while view:
            cap = await self.wait_writable()
            self._outbox += view[:cap]
            self._count_queued(min(cap, len(view)))
            view = view[cap:]
            self.conn.schedule(self, wake=False)
            await self.conn.write_through()

    def send_eof(self) -> None:
        """Half-close our direction once everything queued has been sent."""
        self._out_eof = True
        self.conn.schedule(self)

    def send_close(self, code: CloseCode, msg: str) -> None:
        """Error close after the queued data: the reason, then END_STREAM (a
        reset if the window cannot take the reason)."""
        self._out_close = messages.Close(code, msg[:1024])
        self.conn.schedule(self)

    def forget(self) -> None:
        self.conn.forget(self.stream_id)

    def reset(self, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        self._outbox.clear()
        self._out_eof = False
        self._out_close = None
        self.conn.session.reset_stream(self.stream_id, error_code)
        self.conn.forget(self.stream_id)
        self._aborted(StreamAborted("reset locally"))
        self.conn.wake_writer()


class TunnelConnection:
    """Drives a session over a trio stream until either side closes it.

    The reader, the writer, the final flush and the linger are the shared
    :class:`tether.netio.h2driver.H2Driver`; the streams' payload reaches it
    through the round-robin :class:`tether.netio.scheduler.RoundRobin`. This
    class adds the tunnel: data-stream events routed to
    :class:`TunnelStream` objects, the rest to the owner's
    :class:`ConnectionHandler`, and the keepalive.
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        sess: session.TunnelSession,
        handler: ConnectionHandler,
        *,
        keepalive: Keepalive | None = None,
        name: str = "tunnel",
        budget: budgets.BufferBudget | None = None,
        initial: bytes = b"",
        tuning: tuner.TunerConfig | None = None,
        auto_lowat: bool = True,
        park_when_idle: bool = False,
    ) -> None:
        self.transport = transport
        #: The link as this connection measures it, and how its streams'
        #: windows follow it.
        self.link = tuner.LinkEstimate()
        self.tuner_config = tuning or tuner.TunerConfig(
            floor=sess.config.min_stream_window,
            ceiling=min(tuner.TunerConfig().ceiling, sess.config.connection_window),
        )
        #: Set TCP_NOTSENT_LOWAT from :attr:`link` (False: configured, or off).
        self.auto_lowat = auto_lowat
        self.notsent_lowat = 0
        self._streams_added = trio.Event()
        self._bdp_ping: tuple[bytes, float] | None = None
        #: The process's buffer budget, shared by all its connections: each
        #: stream's grant comes from it and goes back to it.
        self.budget = budget
        self.session = sess
        self.handler = handler
        self.keepalive = keepalive or Keepalive()
        self.name = name
        self.streams: dict[int, TunnelStream] = {}
        #: Agent: how the broker refused the control stream, if it did.
        self.rejection: events.ControlRejected | None = None
        self._scheduler = RoundRobin()
        self._driver: H2Driver[events.Event] = H2Driver(
            transport,
            sess,
            self._dispatch,
            scheduler=self._scheduler,
            initial=initial,
            park_when_idle=park_when_idle,
        )
        self._ka = LinkKeepalive.drive(self.keepalive.interval, self.keepalive.timeout)
        self._probes: dict[bytes, trio.Event] = {}
        #: Hedging probes in flight (at most one per silence), by payload: when sent.
        self._probe_pings: dict[bytes, float] = {}
        self._on_rtt: Callable[[float], None] | None = None
        self._on_stall: Callable[[], None] | None = None
        self._on_bad_stream: Callable[[int, str], None] | None = None

    # ------------------------------------------------------------- outcome

    @property
    def close_reason(self) -> CloseReason | None:
        """Why the connection ended (None while it runs)."""
        return self._driver.close_reason

    @property
    def close_detail(self) -> str:
        """The same for people: free text, never parsed."""
        return self._driver.close_detail

    @property
    def closed_reason(self) -> str | None:
        """:attr:`close_detail` once closed, else None (the text the owner
        logs)."""
        return self._driver.close_detail if self._driver.closed else None

    @property
    def protocol_error(self) -> ProtocolError | None:
        """Set when the peer broke the protocol at connection level."""
        return self._driver.protocol_error

    # --------------------------------------------------------------- run

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until the connection ends; always closes the transport."""
        timers().schedule(self, self._ka.due(self._driver.last_rx))
        await self._driver.run(self._tune, on_closed=self._shutdown, task_status=task_status)

    def answer_keepalive(self, interval: float) -> None:
        """The peer drives keepalive with ``interval`` (it announced it): send
        no PINGs of our own, only drop the link after a few silent intervals
        (:class:`protocol.keepalive.LinkKeepalive`)."""
        self._ka = LinkKeepalive.answer(interval)
        if not self._driver.closed:
            timers().schedule(self, self._ka.due(self._driver.last_rx))

    @property
    def keepalive_mode(self) -> Mode:
        return self._ka.mode

    def abort(self, reason: CloseReason, detail: str = "") -> None:
        """Tear the connection down now (from any task)."""
        self._driver.abort(reason, detail)

    def goaway(self, reason: str = "shutdown") -> None:
        """Send a graceful GOAWAY: no new streams; the peer may finish what
        it sent. Draining happens before, with ``drain`` messages."""
        self.session.close(0, reason)
        self.wake_writer()

    def check_open(self) -> None:
        if self._driver.closed:
            raise TunnelClosed(self._driver.close_detail)

    async def flush(self, timeout: float = 1.0) -> None:
        """Wait (bounded) until everything queued so far reached the socket."""
        await self._driver.flush(timeout)

    def wake_writer(self) -> None:
        self._driver.wake_writer()

    def schedule(self, ts: TunnelStream, *, wake: bool = True) -> None:
        """Queue ``ts`` for the writer's round robin (once); ``wake=False``:
        the caller writes through (or wakes the writer) itself."""
        self._scheduler.schedule(ts)
        if wake:
            self._driver.wake_writer()

    async def write_through(self) -> bool:
        """Write what is queued from the caller's task when nothing contends
        (see :meth:`tether.netio.h2driver.H2Driver.write_through`)."""
        return await self._driver.write_through()

    def forget(self, stream_id: int) -> None:
        """The owner is done with the stream. It stays tracked (and keeps its
        budget share) until what it queued has been sent."""
        ts = self.streams.get(stream_id)
        if ts is None:
            return
        ts._forgotten = True
        if ts.aborted or not ts.has_output:
            del self.streams[stream_id]
            ts._release()

    def send_message(self, msg: messages.Message) -> None:
        self.check_open()
        try:
            self.session.send_message(msg)
        except ProtocolError as exc:
            # Control messages cannot wait for credit: a peer that does not
            # read its control stream, or closed it, loses the connection.
            self.abort(CloseReason.CONTROL_UNUSABLE, f"control stream unusable: {exc}")
            raise TunnelClosed(str(exc)) from None
        self.wake_writer()

    def add_stream(
        self, stream_id: int, dial_id: int, grant: budgets.Grant | None = None
    ) -> TunnelStream:
        """Track a data stream; ``grant`` (from :attr:`budget`) is released
        when the stream is over."""
        ts = TunnelStream(self, stream_id, dial_id, grant)
        self.streams[stream_id] = ts
        self._streams_added.set()
        return ts

    def set_rtt_observer(self, fn: Callable[[float], None]) -> None:
        self._on_rtt = fn

    def set_bad_stream_observer(self, fn: Callable[[int, str], None]) -> None:
        """``fn(stream_id, reason)`` runs for each stream reset because the
        peer sent a malformed body (the connection itself carries on)."""
        self._on_bad_stream = fn

    def set_stall_observer(self, fn: Callable[[], None]) -> None:
        """``fn()`` runs each time a stream must wait for flow-control window:
        a slow reader at the far end, or a link the windows cannot fill."""
        self._on_stall = fn

    # ------------------------------------------------------------- events

    def _dispatch(self, ev: events.Event) -> bool:
        """Route one event; True when the connection is over."""
        if isinstance(ev, events.StreamData):
            ts = self.streams.get(ev.stream_id)
            if ts is not None:
                ts._deliver(ev)
                self.link.delivered(len(ev.data), trio.current_time())
                ts._landed(len(ev.data))
        elif isinstance(ev, events.WindowOpened):
            if ev.stream_id is None:
                for ts in self.streams.values():
                    ts._window_opened()
            elif (ts := self.streams.get(ev.stream_id)) is not None:
                ts._window_opened()
        elif isinstance(ev, events.StreamEnded):
            if (ts := self.streams.get(ev.stream_id)) is not None:
                ts._ended()
        elif isinstance(ev, events.StreamClosed):
            if (ts := self.streams.get(ev.stream_id)) is not None:
                ts._aborted(StreamAborted(f"{ev.close.code.value}: {ev.close.msg}", ev.close))
        elif isinstance(ev, events.StreamReset):
            if (
                not ev.remote
                and ev.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
                and self._on_bad_stream is not None
            ):
                self._on_bad_stream(ev.stream_id, ev.reason)
            if (ts := self.streams.pop(ev.stream_id, None)) is not None:
                who = "peer" if ev.remote else "protocol"
                ts._aborted(StreamAborted(f"stream reset by {who} {ev.reason}".strip()))
        elif isinstance(ev, events.DataStreamAccepted):
            if (ts := self.streams.get(ev.stream_id)) is not None:
                ts._accept()
        elif isinstance(ev, events.MessageReceived):
            self.handler.on_message(ev.message)
        elif isinstance(ev, events.DataStreamRequested):
            self.handler.on_data_stream_requested(ev)
        elif isinstance(ev, events.ControlRequested):
            self.handler.on_control_requested(ev)
        elif isinstance(ev, events.ControlAccepted):
            self.handler.on_control_accepted(ev)
        elif isinstance(ev, events.PingAcked):
            rtt = self._ka.acked(ev.payload, trio.current_time())
            if rtt is not None:
                # The next PING may be due before the ACK deadline was.
                timers().schedule(self, self._ka.due(self._driver.last_rx))
                self.link.rtt_sample(rtt)
                if self._on_rtt is not None:
                    self._on_rtt(rtt)
            if ev.payload in self._probes:
                self._probes[ev.payload].set()
            if self._bdp_ping is not None and self._bdp_ping[0] == ev.payload:
                self.link.rtt_sample(trio.current_time() - self._bdp_ping[1])
                self._bdp_ping = None
            sent = self._probe_pings.pop(ev.payload, None)
            if sent is not None and self._on_rtt is not None:
                # Not a sample for the window tuner: probes go out when the
                # link looks dead, and their answers may come after an outage.
                self._on_rtt(trio.current_time() - sent)
        elif isinstance(ev, events.ConnectionClosed):
            # h2 allows no stream traffic after GOAWAY: this is the end.
            reason = CloseReason.GOAWAY if ev.goaway else CloseReason.CONTROL_CLOSED
            self._driver.note_close(reason, f"peer closed: {ev.reason}")
            return True
        elif isinstance(ev, events.ControlRejected):
            self.rejection = ev
            self._driver.note_close(
                CloseReason.REJECTED, f"broker rejected the connection: {ev.status} {ev.message}"
            )
            return True
        return False

    async def probe(self, timeout: float) -> bool:
        """Whether the peer is alive: heard from within ``timeout`` seconds,
        or answers a PING within ``timeout``."""
        if self._driver.closed:
            return False
        if trio.current_time() - self._driver.last_rx < timeout:
            return True
        payload = self.session.send_ping(os.urandom(8))
        acked = self._probes[payload] = trio.Event()
        self.wake_writer()
        try:
            with trio.move_on_after(timeout):
                await acked.wait()
        finally:
            del self._probes[payload]
        return acked.is_set() and not self._driver.closed

    @property
    def last_rx(self) -> float:
        """When the connection last received anything (trio clock)."""
        return self._driver.last_rx

    def next_rx(self) -> trio.Event:
        """An event set when the connection next receives anything."""
        return self._driver.next_rx()

    def send_probe(self) -> None:
        """One PING, not waited for: its ACK (like anything else received)
        moves :attr:`last_rx` (the agent's hedging probe, protocol/hedge.py)."""
        if not self._driver.closed:
            if len(self._probe_pings) >= 8:  # unanswered ones: the link is quiet anyway
                self._probe_pings.pop(next(iter(self._probe_pings)))
            self._probe_pings[self.session.send_ping(os.urandom(8))] = trio.current_time()
            self.wake_writer()

    # ------------------------------------------------------------- tasks

    def keepalive_due(self, now: float) -> None:
        """The process's keepalive timer (:mod:`tether.netio.keepalive`)
        found this connection due."""
        if self._driver.closed:
            return
        ka = self._ka
        action = ka.poll(now, self._driver.last_rx)
        if action is Action.DEAD:
            if ka.mode is Mode.ANSWER:
                detail = f"keepalive: nothing heard for {ka.timeout:g}s (peer drives PINGs)"
            else:
                detail = f"keepalive: no PING ACK within {ka.timeout:g}s"
            self.abort(CloseReason.KEEPALIVE_TIMEOUT, detail)
            return
        if action is Action.PING:
            ka.ping_sent(self.session.send_ping(os.urandom(8)), now)
            self.wake_writer()
        timers().schedule(self, ka.due(self._driver.last_rx))

    async def _tune(self) -> None:
        """While streams are open and bytes move, once per round trip
        (within bounds): read the kernel's RTT and delivery rate into
        :attr:`link` (or, on a transport without ``TCP_INFO``, time a PING),
        set TCP_NOTSENT_LOWAT from it, and grow the connection window to the
        streams' windows. With no streams it sleeps until one is added; after
        a round in which nothing was read or written it sleeps until
        something is, so open but quiet streams (a ``logs -f`` or a
        port-forward nobody uses) cost nothing per second."""
        driver = self._driver
        while True:
            if not self.streams:
                self._streams_added = trio.Event()
                await self._streams_added.wait()
            start = driver.moved
            await trio.sleep(min(TUNE_MAX_S, max(TUNE_MIN_S, self.link.round_length)))
            busy = driver.moved - start >= TUNE_QUIET_BYTES
            self.tune_once(trio.current_time(), probe=busy)
            if not busy:
                await driver.next_traffic().wait()

    def tune_once(self, now: float, *, probe: bool = True) -> None:
        """One step of :meth:`_tune` (``now``: trio time; ``probe``: a
        transport without ``TCP_INFO`` may time a PING, which a quiet round
        does not, or the probe's own bytes would keep the tuner awake)."""
        info = tcp_info(self.transport)
        if info is not None:
            if info.rtt > 0:
                self.link.rtt_sample(info.rtt, info.min_rtt)
            self.link.rate_sample(info.delivery_rate, now)
        elif probe and self._bdp_ping is None and not self._driver.closed:
            self._bdp_ping = (self.session.send_ping(os.urandom(8)), now)
            self.wake_writer()
        if self.auto_lowat and self.link.srtt is not None:
            lowat = self.link.notsent_lowat(now)
            moved = abs(lowat - self.notsent_lowat) > self.notsent_lowat * LOWAT_CHANGE
            if moved and set_notsent_lowat(self.transport, lowat):
                self.notsent_lowat = lowat
        self.session.link_measured(self.link.bdp(now))
        if self.session.fit_connection_window():
            self.wake_writer()

    # ------------------------------------------------------------ teardown

    def _shutdown(self) -> None:
        timers().discard(self)
        for ts in list(self.streams.values()):
            ts._aborted(StreamAborted(f"tunnel connection lost: {self._driver.close_detail}"))
        self.streams.clear()
