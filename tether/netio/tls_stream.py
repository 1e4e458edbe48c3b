"""TLS over a trio stream, processing many TLS records per socket call.

``trio.SSLStream.receive_some`` returns at most one TLS record (16 KiB) per
call, and every call costs a few trio checkpoints. For the tunnel that is
the dominant per-byte overhead. :class:`TLSStream` reads the socket in large
chunks, decrypts every complete record in one synchronous loop, and encrypts
whole write batches at once, so a 256 KiB read or write costs one socket
call instead of sixteen.

Nothing large stays with a connection between reads: ciphertext is read
from a socket into one receive buffer per thread, and plaintext decrypted
into another, then copied out at its size. A PING-sized read therefore
allocates a few dozen bytes, not two 256 KiB buffers, and an idle
connection keeps only OpenSSL's state (CPython sets
``SSL_MODE_RELEASE_BUFFERS`` on every context, so OpenSSL frees its record
buffers while idle too).

The API is the subset of ``trio.SSLStream`` the tunnel uses. As with
``SSLStream``, a cancelled ``send_all`` leaves the stream broken.
"""

from __future__ import annotations

import errno
import os
import ssl
import threading
from typing import Any

import trio

READ_CHUNK = 256 * 1024
#: The largest plaintext of one TLS record: what one SSL read returns.
RECORD = 16 * 1024
#: A read of fewer bytes (ciphertext) leaves the socket likely empty.
QUIET_READ = 1024


class _Buffers(threading.local):
    """Scratch space of the thread's TLS streams, filled and emptied with no
    checkpoint in between, so the streams of one trio run can share it."""

    def __init__(self) -> None:
        self.cipher = bytearray(READ_CHUNK)
        self.plain = bytearray(READ_CHUNK)


_BUFFERS = _Buffers()


def _read_into(sock: Any, buf: bytearray) -> int | None:
    """One non-blocking read of ``sock`` into ``buf``: the byte count, or
    None when nothing is there yet."""
    try:
        return os.readv(sock.fileno(), [buf])
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise trio.ClosedResourceError("socket was closed") from exc
        raise trio.BrokenResourceError(exc) from exc


def _send_some(sock: Any, data: bytes) -> int:
    """One non-blocking send of ``data`` to ``sock``: the bytes it took."""
    try:
        return os.write(sock.fileno(), data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise trio.ClosedResourceError("socket was closed") from exc
        raise trio.BrokenResourceError(exc) from exc


class TLSStream(trio.abc.Stream):
    def __init__(
        self,
        transport: trio.abc.Stream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> None:
        """``session``: a client's earlier session with this server (from
        :attr:`session` of an earlier stream made with the same
        ``context``), offered for resumption."""
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=None if server_side else server_hostname,
            session=session,
        )
        self._send_lock = trio.Lock()
        self._handshook = False
        self._broken: BaseException | None = None
        self._eof = False
        #: The last read was small: the next one waits for the socket first.
        self._quiet = False
        #: Ciphertext send_nowait encrypted but the kernel did not take.
        self._tail = b""

    # --------------------------------------------------------------- info

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._ssl.getpeercert(binary_form=binary_form)

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    def version(self) -> str | None:
        return self._ssl.version()

    @property
    def session(self) -> ssl.SSLSession | None:
        """The TLS session to resume next time (a client's; TLS 1.3 sends
        its ticket after the handshake, so ask once data has arrived)."""
        return self._ssl.session

    @property
    def session_reused(self) -> bool:
        """Whether the handshake resumed an earlier session (a ticket)."""
        return bool(self._ssl.session_reused)

    # ---------------------------------------------------------- internals

    def _check(self) -> None:
        if self._broken is not None:
            raise trio.BrokenResourceError("TLS stream is broken") from self._broken

    async def _flush(self) -> None:
        """Send everything the TLS engine has queued, in order."""
        async with self._send_lock:
            await self._send_queued()

    async def _send_queued(self, schedule: bool = True) -> None:
        # Called with the send lock held.
        data = self._outgoing.read()
        if self._tail:
            data, self._tail = self._tail + data, b""
        if not data:
            return
        transport = self.transport
        try:
            if isinstance(transport, trio.SocketStream):
                # As _fill reads: one non-blocking send of the records, and
                # trio's send_all (which waits for the socket) only for what
                # the kernel did not take.
                await trio.lowlevel.checkpoint_if_cancelled()
                sent = _send_some(transport.socket, data)
                if sent == len(data):
                    if schedule:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return
                with memoryview(data) as view:
                    await transport.send_all(view[sent:])
            else:
                await transport.send_all(data)
        except BaseException as exc:
            # Cancelled or failed mid-record: the TLS byte stream is torn.
            self._broken = exc
            raise

    async def _fill(self) -> bool:
        """Read more ciphertext; False at transport EOF."""
        transport = self.transport
        if isinstance(transport, trio.SocketStream):
            # Not trio's recv_into: it yields after the read, and another
            # stream would overwrite the shared buffer meanwhile. The bytes
            # go to OpenSSL before any yield. As in trio's own socket calls,
            # a read that finds data yields once after it, and one that has
            # to wait yields only in the wait: one task step per read.
            # After a small read (a PING, a keystroke: a quiet link) the
            # socket is most likely empty, so wait first rather than try a
            # read that fails.
            sock = transport.socket
            if self._quiet:
                n = None
            else:
                await trio.lowlevel.checkpoint_if_cancelled()
                n = self._pull(sock)
            waited = n is None
            while n is None:
                await trio.lowlevel.wait_readable(sock)
                n = self._pull(sock)
            self._quiet = 0 < n < QUIET_READ
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return n > 0
        data = await transport.receive_some(READ_CHUNK)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    def _pull(self, sock: Any) -> int | None:
        """One non-blocking read of ``sock`` into the TLS engine: the byte
        count (0: EOF, given to the engine as such), or None when nothing is
        there yet. No checkpoint between the read into the shared buffer
        and the engine taking it."""
        buf = _BUFFERS.cipher
        n = _read_into(sock, buf)
        if n:
            with memoryview(buf) as view:
                self._incoming.write(view[:n])
        elif n == 0:
            self._incoming.write_eof()
        return n

    # ------------------------------------------------------------ public

    async def do_handshake(self) -> None:
        self._check()
        while not self._handshook:
            try:
                self._ssl.do_handshake()
                self._handshook = True
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise trio.BrokenResourceError("peer closed during the TLS handshake") from None
                continue
            except ssl.SSLError as exc:
                self._broken = exc
                try:
                    with trio.move_on_after(1):
                        await self._flush()  # the alert tells the peer why
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
        await self._flush()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check()
        if not self._handshook:
            await self.do_handshake()
        limit = min(max_bytes or READ_CHUNK, READ_CHUNK)
        while True:
            data = self._decrypt(limit)
            if (self._outgoing.pending or self._tail) and not self._send_lock.locked():
                # e.g. a TLS 1.3 key update answer. Never wait for a sender:
                # one blocked on a peer that does not read would stop us
                # reading too, and a peer doing the same deadlocks with us.
                # The sender takes everything queued with its own flush.
                await self._flush()
            if data:
                return data
            if self._eof:
                return b""
            try:
                if not await self._fill():
                    # EOF without close_notify: treat as EOF, as https does.
                    self._eof = True
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._broken = exc
                raise

    def _decrypt(self, limit: int) -> bytes:
        """Every complete record the TLS engine holds, up to ``limit``
        plaintext bytes (b"": none yet, or EOF: see ``_eof``). A read that
        can only fail (no ciphertext left, nothing decrypted and unread) is
        not tried: its SSLWantReadError costs more than the check."""
        if self._drained():
            return b""
        tls = self._ssl
        total = 0
        with memoryview(_BUFFERS.plain) as view:
            try:
                while total < limit:
                    # With a buffer, read returns a count (typeshed: bytes).
                    got: int = tls.read(  # type: ignore[assignment]
                        min(limit - total, RECORD),
                        view[total:],
                    )
                    if not got:
                        break
                    total += got
                    if self._drained():
                        break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                self._eof = True
            except ssl.SSLError as exc:
                self._broken = exc
                raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
            # Out of the shared buffer before any checkpoint.
            return bytes(view[:total])

    def _drained(self) -> bool:
        """Nothing for the TLS engine to decrypt: no ciphertext left (nor an
        EOF to report), nothing decrypted and unread."""
        incoming = self._incoming
        return not incoming.pending and not incoming.eof and not self._ssl.pending()

    def receive_nowait(self) -> bytes:
        """:meth:`receive_some` without a checkpoint, for a task watching
        many sockets at once (:mod:`tether.netio.idle`): what one
        non-blocking read of the socket completes. Raises ``trio.WouldBlock``
        when no complete record is there (a partial one stays in the TLS
        engine for the next read); b"" at EOF, as :meth:`receive_some`."""
        self._check()
        sock = self.raw_socket()
        if sock is None or not self._handshook:
            raise trio.WouldBlock
        data = self._decrypt(READ_CHUNK)
        if data:
            return data
        if self._eof:
            return b""
        try:
            n = self._pull(sock)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._broken = exc
            raise
        if n is None:
            raise trio.WouldBlock
        data = self._decrypt(READ_CHUNK)
        if data:
            return data
        if self._eof or not n:
            self._eof = True
            return b""
        raise trio.WouldBlock

    def raw_socket(self) -> Any:
        """The trio socket under this stream, or None (not over TCP)."""
        transport = self.transport
        return transport.socket if isinstance(transport, trio.SocketStream) else None

    def can_send_nowait(self) -> bool:
        """Whether :meth:`send_nowait` may run now: over a socket, after the
        handshake, with no other send under way and nothing kept unsent."""
        return (
            self._broken is None
            and self._handshook
            and not self._send_lock.locked()
            and not self._tail
            and not self._outgoing.pending
            and self.raw_socket() is not None
        )

    @property
    def unsent(self) -> bool:
        """Bytes to write before the stream may rest: ciphertext
        :meth:`send_nowait` could not write, or TLS records a read produced
        (a key update's answer). The next send, or the flush in
        :meth:`receive_some`, writes them first."""
        return bool(self._tail or self._outgoing.pending)

    def send_nowait(self, data: bytes) -> bool:
        """Encrypt ``data`` and write it with one non-blocking send, no
        checkpoint (only when :meth:`can_send_nowait`): for a reply of a few
        bytes (a PING ACK) from a task that may not wait. False when the
        kernel did not take it whole: the rest is kept, in order, for the
        next send (:attr:`unsent`)."""
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:
            self._broken = exc
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
        out = self._outgoing.read()
        try:
            sent = _send_some(self.transport.socket, out)  # type: ignore[attr-defined]
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._broken = exc
            raise
        if sent < len(out):
            self._tail = out[sent:]
            return False
        return True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._send(data, schedule=True)

    async def send_now(self, data: bytes | bytearray | memoryview) -> None:
        """:meth:`send_all` without the schedule point after a send the
        kernel took whole: for a caller that waits for the socket next
        anyway (the reader answering a PING), so one wake-up serves both."""
        await self._send(data, schedule=False)

    async def _send(self, data: bytes | bytearray | memoryview, *, schedule: bool) -> None:
        self._check()
        if not self._handshook:
            await self.do_handshake()
        # The lock is taken before the plaintext goes into the TLS engine:
        # the reader flushes what its own reads produced only while no
        # sender holds it, so it never finds a sender's records queued and
        # blocks writing them to a peer that does not read (it would stop
        # reading, and a peer flooding us unread would never be noticed).
        lock = self._send_lock
        if schedule or lock.locked():
            await lock.acquire()  # a schedule point, or a wait
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
            lock.acquire_nowait()
        try:
            if data:
                try:
                    self._ssl.write(data)
                except ssl.SSLError as exc:
                    self._broken = exc
                    raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
            await self._send_queued(schedule)
        finally:
            lock.release()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        try:
            if self._handshook and self._broken is None:
                try:
                    self._ssl.unwrap()
                except ssl.SSLError:
                    pass
                try:
                    with trio.move_on_after(1):
                        await self._flush()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        finally:
            # Always, even when cancelled (trio.aclose_forcefully) before
            # the close_notify went: a sender blocked on the socket is woken
            # by the close, and the socket is not left open.
            await self.transport.aclose()
