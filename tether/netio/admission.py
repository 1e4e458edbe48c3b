"""The agent listener's accept loop under admission control: the trio
adapter around :class:`protocol.admission.Admission`.

Only the agent port goes through it. The health, admin and frontend
listeners keep their own accept loops (``trio.serve_listeners`` and
:func:`tether.netio.http.serve_http`) that never wait here, and because at
most ``max_handshakes`` agent handshakes run at once, the trio run queue
they share stays short however many agents dial at the same moment.
"""

from __future__ import annotations

import errno
import logging
import random
from collections.abc import Awaitable, Callable

import attrs
import trio

from protocol.admission import Admission, Ticket, Verdict
from tether.netio.sockopts import peer_closed

log = logging.getLogger("tether.admission")

#: accept() errors that mean "out of descriptors or memory": wait, then go on.
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@attrs.define(eq=False)
class Pass:
    """What a handler is given with its connection: ``shed`` (answer
    503 overloaded, retrying in ``retry_after_ms``) or not, and
    :meth:`release`, called once the TLS handshake is over."""

    gate: AdmissionGate
    ticket: Ticket
    retry_after_ms: int = 0

    @property
    def shed(self) -> bool:
        return self.ticket.verdict is Verdict.SHED

    def release(self) -> None:
        """Give the handshake slot back (idempotent)."""
        self.gate.release(self.ticket)


Handler = Callable[[trio.SocketStream, Pass], Awaitable[None]]


class AdmissionGate:
    def __init__(
        self,
        admission: Admission,
        *,
        on_verdict: Callable[[Verdict], None] | None = None,
        on_source_refused: Callable[[str, bool], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.admission = admission
        self._on_verdict = on_verdict or (lambda _v: None)
        #: (source, first of its episode): a connection dropped because its
        #: address holds ``max_per_source`` already (bad input, not load).
        self._on_source_refused = on_source_refused or (lambda _s, _f: None)
        self._rng = rng or random.Random()
        self._waiting: dict[Ticket, trio.Event] = {}
        self._queue_changed = trio.Event()

    def release(self, ticket: Ticket) -> None:
        self._wake(self.admission.finished(ticket, trio.current_time()))

    def _wake(self, changed: list[Ticket]) -> None:
        for ticket in changed:
            self._on_verdict(ticket.verdict)
            event = self._waiting.pop(ticket, None)
            if event is not None:
                event.set()

    async def _expire(self) -> None:
        """Shed (or drop) queued connections that waited ``max_wait``."""
        while True:
            deadline = self.admission.next_expiry()
            if deadline is None:
                await self._queue_changed.wait()
                continue
            await trio.sleep_until(deadline + 0.001)
            self._wake(self.admission.expire(trio.current_time()))

    async def serve(self, listener: trio.SocketListener, handler: Handler) -> None:
        """Accept from ``listener`` at the paced rate, forever; each
        connection's handler runs once admitted (or shed)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expire)
            while True:
                delay = self.admission.accept_delay(trio.current_time())
                if delay > 0:
                    await trio.sleep(delay)
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _RESOURCE_ERRNOS:
                        raise
                    log.error("agent port: accept failed (%s); retrying in 100 ms", exc)
                    await trio.sleep(0.1)
                    continue
                now = trio.current_time()
                self._wake(self.admission.expire(now))
                ticket = self.admission.arrive(now, _source(stream))
                self._on_verdict(ticket.verdict)
                if ticket.verdict is Verdict.DROP:
                    if ticket.source_refused:
                        self._on_source_refused(ticket.source, ticket.first_refusal)
                    stream.socket.close()
                    continue
                if ticket.verdict is Verdict.QUEUE:
                    self._waiting[ticket] = trio.Event()
                    self._queue_changed.set()
                    self._queue_changed = trio.Event()
                nursery.start_soon(self._run, stream, ticket, handler)

    async def _run(self, stream: trio.SocketStream, ticket: Ticket, handler: Handler) -> None:
        try:
            waiting = self._waiting.get(ticket)
            if waiting is not None:
                await waiting.wait()
            if ticket.verdict is Verdict.DROP:
                return
            if waiting is not None and peer_closed(stream):
                # It waited long enough for its client to give up (and dial
                # again): a handshake now would be work for nobody.
                self._on_verdict(Verdict.ABANDONED)
                return
            retry = 0
            if ticket.verdict is Verdict.SHED:
                retry = self.admission.retry_after_ms(self._rng.random())
            await handler(stream, Pass(self, ticket, retry))
        except Exception:
            log.exception("agent connection handler failed")
        finally:
            self._waiting.pop(ticket, None)
            self.release(ticket)
            await trio.aclose_forcefully(stream)


def _source(stream: trio.SocketStream) -> str:
    """The peer's address (its share of admission is counted by it)."""
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "?"
