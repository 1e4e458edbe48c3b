"""The one trio driver for a sans-IO HTTP/2 engine over a trio stream.

An *engine* is anything with ``receive_data(bytes) -> events``,
``data_to_send() -> bytes`` and ``backlog`` (see :class:`Engine`): the
tunnel's :class:`protocol.session.TunnelSession`, or a gRPC server built on
:class:`protocol.h2base.H2Base`. :class:`H2Driver` runs one over a
transport:

- one reader task feeds the engine every read, drains its backlog (a burst
  of new streams is admitted in parts) and hands each event to ``handle``;
- one writer task writes: it asks the optional scheduler
  (:class:`tether.netio.scheduler.RoundRobin`) to move queued payload into
  HTTP/2, one batch per write, sized by whether the socket made it wait,
  then writes what the engine has queued;
- write-through (:meth:`H2Driver.write_through`): a sender whose payload is
  all there is, on a socket with nothing unsent, writes it itself, at once,
  without the hop to the writer task; under contention (a write in
  progress, other streams queued, an unsent kernel queue) it is left to
  the writer and the scheduler;
- senders that queue output outside the scheduler respect the write buffer
  with :meth:`H2Driver.wait_writable` (backpressure from the socket);
- an optional handshake deadline (:meth:`H2Driver.handshake_done`);
- at the end, the last frames (a GOAWAY, an RST_STREAM) are flushed, bounded,
  and after a protocol violation the transport lingers, so the peer reads
  our GOAWAY before the kernel's RST can destroy it.

Why it ended is :attr:`H2Driver.close_reason` (a
:class:`protocol.outcomes.CloseReason`) with :attr:`H2Driver.close_detail`.

Creating this module's first driver applies the runtime's h2/hyperframe
work-arounds (:func:`protocol.h2compat.quiet_data_frame_repr`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Protocol, TypeVar

import trio

from protocol import h2compat
from protocol.errors import ProtocolError
from protocol.flood import FloodDetected
from protocol.h2base import PING_LEN
from protocol.outcomes import CloseReason
from tether.netio import idle
from tether.netio.sockopts import set_linger_zero, unacked_bytes, unsent_probe

READ_SIZE = 256 * 1024
#: Payload the scheduler moves into one socket write. Small enough that an
#: interactive stream never waits behind more than this much bulk data in our
#: process; large enough to keep per-write overhead low.
BATCH = 256 * 1024
#: The batch while the socket is the bottleneck (see ``_writer``).
SMALL_BATCH = 32 * 1024
#: Payload a sender may write through itself (see ``write_through``).
WRITE_THROUGH = BATCH
#: After a GOAWAY for a violation, how long to drain what the peer still sends.
LINGER = 1.0
#: Bytes handed to the socket but not yet written before senders wait.
WRITE_BUFFER = 4 * 1024 * 1024
#: How long the writer may take for the last frames once reading stopped.
FINAL_FLUSH = 1.0

#: A transport's send_all, or one like it.
SendAll = Callable[[bytes], Awaitable[None]]

EventT = TypeVar("EventT")
EventT_co = TypeVar("EventT_co", covariant=True)

h2compat.quiet_data_frame_repr()


class Engine(Protocol[EventT_co]):
    """A sans-IO HTTP/2 engine the driver can run."""

    def receive_data(self, data: bytes) -> Sequence[EventT_co]: ...

    def data_to_send(self) -> bytes: ...

    @property
    def backlog(self) -> bool: ...


class Scheduler(Protocol):
    """Queued payload the writer moves into the engine, a batch at a time."""

    @property
    def ready(self) -> bool: ...

    def fill(self, budget: int) -> None: ...


class H2Driver(Generic[EventT]):
    """Runs ``engine`` over ``transport`` until either side ends it.

    ``handle(event)`` runs in the reader for every event and returns True
    when the connection is over (a GOAWAY: h2 allows no stream traffic
    after it).
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        engine: Engine[EventT],
        handle: Callable[[EventT], bool],
        *,
        scheduler: Scheduler | None = None,
        write_buffer: int = WRITE_BUFFER,
        handshake_timeout: float | None = None,
        on_handshake_timeout: Callable[[], None] | None = None,
        linger: float = LINGER,
        initial: bytes = b"",
        park_when_idle: bool = False,
    ) -> None:
        self.transport = transport
        self.engine = engine
        self.handle = handle
        self.scheduler = scheduler
        self.write_buffer = write_buffer
        self.handshake_timeout = handshake_timeout
        self._on_handshake_timeout = on_handshake_timeout
        self.linger = linger
        #: Bytes already read from the transport (the agent port's sniffed
        #: first request, :mod:`protocol.agent_port`): fed before any read.
        self._initial = initial
        self.close_reason: CloseReason | None = None
        self.close_detail = ""
        #: Set when the peer broke the protocol at connection level.
        self.protocol_error: ProtocolError | None = None
        #: trio time of the last read that brought bytes.
        self.last_rx = trio.current_time()
        #: Bytes read plus bytes written so far.
        self.moved = 0
        #: Set by the next read or write (see :meth:`next_traffic`).
        self._traffic: trio.Event | None = None
        #: Set by the next read that brings bytes (see :meth:`next_rx`).
        self._rx: trio.Event | None = None
        self._want_write = trio.Event()
        #: Woken (all at once) after every write and at the end: waiters park
        #: and recheck, so no wake-up is ever lost between two of them.
        self._progress = trio.lowlevel.ParkingLot()
        self._handshaken = trio.Event()
        self._pending_out = 0  # taken by the writer, not yet written
        self._queued = 0  # declared by senders (wait_writable), not yet taken
        #: A send_all was cut short (cancelled or failed): the transport may
        #: hold half a frame, so nothing more may be written to it.
        self._write_interrupted = False
        self._writing = False
        #: The writer waits in wait_send_all_might_not_block: the transport
        #: counts that as sending (a send_all meanwhile is BusyResourceError).
        self._awaiting_socket = False
        self._cancel: trio.CancelScope | None = None
        #: The engine's fast path for a read that is one PING, if it has one.
        self._quick_ping: Callable[[bytes], bytes | None] | None = getattr(
            engine, "quick_ping", None
        )
        #: The transport's send without a schedule point after a complete
        #: write (TLSStream.send_now), for the reader's PING answers: it
        #: waits for the socket next, and that wait is its schedule point.
        self._send_now: SendAll = getattr(transport, "send_now", transport.send_all)
        #: Bytes the kernel has not sent yet (-1: unknown), asked per write.
        self._unsent = unsent_probe(transport)
        #: After a lone PING, the reader parks with the run's idle poller
        #: (:mod:`tether.netio.idle`), which answers the next PINGs itself:
        #: for a peer that drives keepalive on a mostly idle connection.
        self._park_when_idle = (
            park_when_idle
            and self._quick_ping is not None
            and hasattr(transport, "receive_nowait")
            and getattr(transport, "raw_socket", lambda: None)() is not None
        )
        #: What the idle poller read that was more than a PING: the reader
        #: feeds it before reading again.
        self._stash = b""

    def next_traffic(self) -> trio.Event:
        """An event the next read or write of the connection sets: how a
        task that only has work while bytes move (the window tuner) sleeps
        through quiet periods without polling."""
        ev = self._traffic
        if ev is None:
            ev = self._traffic = trio.Event()
        return ev

    def next_rx(self) -> trio.Event:
        """An event the next read that brings bytes sets: how the agent's
        hedging hears at once that a quiet link is back (protocol/hedge.py)."""
        ev = self._rx
        if ev is None:
            ev = self._rx = trio.Event()
        return ev

    def _count(self, n: int) -> None:
        """``n`` bytes were read or written: count them, and wake whoever
        waits for the next traffic."""
        self.moved += n
        ev = self._traffic
        if ev is not None:
            self._traffic = None
            ev.set()

    # ------------------------------------------------------------------ run

    async def run(
        self,
        *tasks: Callable[[], Awaitable[None]],
        on_closed: Callable[[], None] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until the connection ends; always closes the transport.

        ``tasks`` run beside the reader and writer and are cancelled with
        them; ``on_closed`` runs once reading and writing stopped, before
        the final flush.
        """
        try:
            with trio.CancelScope() as self._cancel:
                self.wake_writer()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    if self.handshake_timeout is not None:
                        nursery.start_soon(self._handshake_deadline, self.handshake_timeout)
                    for task in tasks:
                        nursery.start_soon(task)
                    task_status.started()
                    await self._reader()
                    # The writer may hold the last frames (a GOAWAY, an
                    # RST_STREAM): cancelling it mid-write would lose them.
                    with trio.move_on_after(FINAL_FLUSH):
                        await self._writer_idle()
                    nursery.cancel_scope.cancel()
        finally:
            self.note_close(CloseReason.CLOSED, "closed")
            self._progress.unpark_all()
            if on_closed is not None:
                on_closed()
            with trio.CancelScope(shield=True):
                await self._final_flush()
                if self.protocol_error is not None and not self._write_interrupted:
                    await linger(self.transport, self.linger)
                if self._write_interrupted or (
                    self.protocol_error is not None and unacked_bytes(self.transport) > 0
                ):
                    # A peer that does not read: a FIN would wait behind our
                    # unsent bytes forever, in an orphaned socket the kernel
                    # keeps for minutes, and the peer would never learn the
                    # connection is gone. Reset instead.
                    set_linger_zero(self.transport)
                await trio.aclose_forcefully(self.transport)

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    def note_close(self, reason: CloseReason, detail: str) -> None:
        """Record why the connection ends (the first reason recorded stays);
        ``handle`` calls it for the peer's GOAWAY, say, then returns True."""
        if self.close_reason is None:
            self.close_reason = reason
            self.close_detail = detail

    def abort(self, reason: CloseReason, detail: str = "") -> None:
        """Tear the connection down now (from any task); the first reason
        recorded stays."""
        self.note_close(reason, detail or reason.value)
        if self._cancel is not None:
            self._cancel.cancel()

    def handshake_done(self) -> None:
        """The peer completed its handshake: the deadline no longer applies."""
        self._handshaken.set()

    async def _handshake_deadline(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self._handshaken.wait()
            return
        if self._on_handshake_timeout is not None:
            self._on_handshake_timeout()
        self.abort(CloseReason.HANDSHAKE_TIMEOUT, f"no handshake within {seconds:g}s")

    # -------------------------------------------------------------- writing

    def wake_writer(self) -> None:
        self._want_write.set()

    async def flush(self, timeout: float = 1.0) -> None:
        """Wait (bounded) until everything queued so far reached the socket."""
        with trio.move_on_after(timeout):
            while not self.closed and (self._want_write.is_set() or self._pending_out):
                await self._progress.park()

    async def wait_writable(self, queued: int) -> bool:
        """Backpressure from the socket: a sender that just queued ``queued``
        bytes in the engine waits while too much is unwritten. False once
        the connection is over."""
        self._queued += queued
        self.wake_writer()
        while self._pending_out + self._queued > self.write_buffer:
            if self.closed:
                return False
            await self._progress.park()
        return not self.closed

    async def _writer_idle(self) -> None:
        while self._want_write.is_set() or self._pending_out:
            await self._progress.park()

    def _take_output(self) -> bytes:
        self._queued = 0
        return self.engine.data_to_send()

    def _nobody_writing(self) -> bool:
        """No write in progress, none awaited, none torn, and still open."""
        return (
            not self._writing
            and not self._awaiting_socket
            and not self._write_interrupted
            and self.close_reason is None
        )

    def _may_write_through(self) -> bool:
        return self._nobody_writing() and self._unsent() == 0

    async def write_through(self, budget: int = WRITE_THROUGH) -> bool:
        """From a sender's task: write what is queued now, without waking the
        writer, if nobody else is writing and the kernel has nothing unsent
        (the socket wants more at once). At most ``budget`` payload bytes
        move; anything left, and every case of contention, is the writer's
        (woken here). True when everything queued was written.

        The write is shielded: a sender cancelled halfway would leave half a
        TLS record on the wire. It is small and goes to a socket with an
        empty unsent queue, so it does not wait for the peer.
        """
        if not self._may_write_through():
            self.wake_writer()
            return False
        scheduler = self.scheduler
        if scheduler is not None:
            scheduler.fill(budget)
        data = self._take_output()
        if scheduler is not None and scheduler.ready:
            self.wake_writer()
        if data:
            with trio.CancelScope(shield=True):
                await self._send(data)
        return not self._want_write.is_set()

    async def _send(self, data: bytes, *, send: SendAll | None = None) -> bool:
        """One write, by the writer or a sender writing through (``send``:
        another of the transport's send methods); False when the transport
        failed (the connection is then aborted)."""
        self._pending_out += len(data)
        self._write_interrupted = True
        self._writing = True
        try:
            await (send or self.transport.send_all)(data)
            self._write_interrupted = False
            self._count(len(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.abort(CloseReason.TRANSPORT_ERROR, f"transport error: {exc!r}")
            return False
        finally:
            # A cancelled send_all leaves the TLS stream unusable: the
            # connection is doomed either way, so no retry here.
            self._writing = False
            self._pending_out -= len(data)
            self._progress.unpark_all()
        return True

    async def _writer(self) -> None:
        batch = BATCH
        scheduler = self.scheduler
        while True:
            await self._want_write.wait()
            self._want_write = trio.Event()
            while self._writing:  # a sender is writing through
                await self._progress.park()
            if scheduler is not None and scheduler.ready and self._unsent() == 0:
                # Nothing unsent in the kernel: the socket wants more now,
                # and asking the event loop would only say so a trip later.
                batch = min(BATCH, batch * 2)
                scheduler.fill(batch)
                if scheduler.ready:
                    self._want_write.set()
            elif scheduler is not None and scheduler.ready:
                # Stream data waits until the socket wants more. With
                # TCP_NOTSENT_LOWAT that means the kernel's unsent queue is
                # nearly empty, so bulk data queues here, where the scheduler
                # lets interactive bytes overtake it, not in the kernel. A
                # socket that made us wait is link-bound: small batches keep
                # what sits ahead of an interactive byte small; a socket that
                # never waits (loopback, fast links) gets large batches.
                started = trio.current_time()
                self._awaiting_socket = True
                try:
                    await self.transport.wait_send_all_might_not_block()
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self.abort(CloseReason.TRANSPORT_ERROR, f"transport error: {exc!r}")
                    return
                finally:
                    self._awaiting_socket = False
                waited = trio.current_time() - started > 0.0005
                batch = SMALL_BATCH if waited else min(BATCH, batch * 2)
                while self._writing:  # a sender wrote through meanwhile
                    await self._progress.park()
                scheduler.fill(batch)
                if scheduler.ready:
                    self._want_write.set()  # more queued: come back after this write
            data = self._take_output()
            if not data and not (self._park_when_idle and self.transport.unsent):  # type: ignore[attr-defined]
                self._progress.unpark_all()
                continue
            # (with no data: what the idle poller's send left, see _idle_read)
            if not await self._send(data):
                return

    async def _final_flush(self) -> None:
        if self._write_interrupted:
            return  # a half-written frame is on the wire; more would corrupt it
        data = self._take_output()
        if data:
            with trio.move_on_after(FINAL_FLUSH):
                try:
                    await self.transport.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    # -------------------------------------------------------------- reading

    async def _reader(self) -> None:
        if self._initial:
            first, self._initial = self._initial, b""
            if await self._feed(first):
                return
        park = False
        while True:
            if park:
                park = False
                await self._park()
            data: bytes | bytearray
            if self._stash:
                data, self._stash = self._stash, b""
            else:
                try:
                    data = await self.transport.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self.note_close(CloseReason.TRANSPORT_ERROR, f"transport error: {exc!r}")
                    return
                if not data:
                    self.note_close(CloseReason.PEER_CLOSED, "peer closed the connection")
                    return
                self._heard(len(data))
            if (
                self._quick_ping is not None
                and len(data) == PING_LEN
                and self._may_write_through()
                and (ack := self._quick_ping(bytes(data))) is not None
            ):
                # A lone PING (the peer's keepalive): its ACK goes out from
                # here, with what else is queued, past h2's parser and the
                # writer task. Only when nothing contends for the socket, as
                # for a write-through, so the send does not wait.
                with trio.CancelScope(shield=True):
                    await self._send(ack + self._take_output(), send=self._send_now)
                park = self._park_when_idle
                continue
            if await self._feed(bytes(data)):
                return

    def _heard(self, n: int) -> None:
        """A read brought ``n`` bytes."""
        self.last_rx = trio.current_time()
        self._count(n)
        if (rx := self._rx) is not None:
            self._rx = None
            rx.set()

    async def _park(self) -> None:
        """Sleep while the idle poller answers the peer's PINGs; back when a
        read brings anything else (kept in ``_stash``), or at EOF or an
        error (which the next read meets again)."""
        watcher = idle.poller()
        if watcher is not None:
            sock = self.transport.raw_socket()  # type: ignore[attr-defined]
            await watcher.park(sock.fileno(), self._idle_read)

    def _idle_read(self) -> bool:
        """The idle poller found the parked socket readable: True to stay
        parked (a PING answered, or no whole record yet)."""
        transport = self.transport
        try:
            data: bytes = transport.receive_nowait()  # type: ignore[attr-defined]
        except trio.WouldBlock:
            if transport.unsent:  # type: ignore[attr-defined]
                self.wake_writer()  # a TLS record the read produced (a key update's answer)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False  # the reader's next read meets it again
        if not data:
            return False  # EOF: likewise
        self._heard(len(data))
        if (
            len(data) == PING_LEN
            # Not _may_write_through: the kernel's unsent queue does not
            # matter, a send it cannot take whole leaves the rest to the writer.
            and self._nobody_writing()
            and transport.can_send_nowait()  # type: ignore[attr-defined]
            and self._quick_ping is not None
            and (ack := self._quick_ping(data)) is not None
        ):
            out = ack + self._take_output()
            try:
                whole = transport.send_nowait(out)  # type: ignore[attr-defined]
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.abort(CloseReason.TRANSPORT_ERROR, f"transport error: {exc!r}")
                return False
            self._count(len(out))
            if len(out) > len(ack):
                self._progress.unpark_all()
            if not whole:
                self.wake_writer()  # it writes the rest first
            return True
        self._stash = data
        return False

    async def _feed(self, data: bytes) -> bool:
        """Hand one read to the engine; True when the connection is over."""
        while True:
            try:
                evs = self.engine.receive_data(data)
            except ProtocolError as exc:
                # This outcome replaces any recorded before: it is the cause.
                flood = isinstance(exc, FloodDetected)
                self.close_reason = CloseReason.FLOOD if flood else CloseReason.PROTOCOL_ERROR
                self.close_detail = f"protocol error: {exc}"
                self.protocol_error = exc
                return True
            finally:
                self.wake_writer()
            for ev in evs:
                if self.handle(ev):
                    return True
            if not self.engine.backlog:
                return False
            # A burst of new streams, a part at a time: each part's refusals
            # close its streams before h2 counts the next, and other
            # connections run in between.
            await trio.lowlevel.checkpoint()
            data = b""


async def linger(transport: trio.abc.ReceiveStream, seconds: float = LINGER) -> None:
    """Read and drop what the peer still sends, for a moment, before closing.

    Closing a socket with unread input makes the kernel send RST, and an RST
    can destroy our GOAWAY before the peer reads it: a peer that broke the
    protocol (or flooded us) would never learn why it was cut off.
    """
    with trio.move_on_after(seconds):
        try:
            while await transport.receive_some(READ_SIZE):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
