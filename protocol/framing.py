"""Incremental decoders for the two kinds of stream body.

A control stream carries a sequence of msgpack maps (:class:`ControlDecoder`).
A data stream carries msgpack ``bin`` objects (payload) and at most one
``close`` map (:class:`DataStreamDecoder`). Both accept bytes in any chunking
and raise only :class:`protocol.errors.ProtocolError` subclasses.

The data-stream decoder parses ``bin`` headers itself and hands payload on as
it arrives, without waiting for the whole object. Each piece carries the exact
number of wire bytes it accounts for, so a receiver can return HTTP/2 flow
control credit byte-exactly once the destination has taken the piece.
"""

from __future__ import annotations

import struct
from typing import Any

import attrs
import msgpack

from protocol import messages
from protocol.errors import MalformedMessage, MessageTooLarge, ProtocolError, RemoteProtocolError

#: Largest payload in one ``bin`` object on a data stream.
MAX_PAYLOAD_OBJECT = 1024 * 1024

_BIN_HEADERS = {0xC4: (1, ">B"), 0xC5: (2, ">H"), 0xC6: (4, ">I")}


def bin_header(length: int) -> bytes:
    """The msgpack ``bin`` header for a payload of ``length`` bytes."""
    if length < 0x100:
        return b"\xc4" + length.to_bytes(1, "big")
    if length < 0x10000:
        return b"\xc5" + length.to_bytes(2, "big")
    return b"\xc6" + length.to_bytes(4, "big")


def bin_header_size(length: int) -> int:
    return 2 if length < 0x100 else 3 if length < 0x10000 else 5


#: The unpacker's first buffer; it grows up to the message limit when a
#: message needs it (msgpack would otherwise allocate the limit up front).
UNPACK_START = 1024


def _unpacker(max_size: int) -> msgpack.Unpacker:
    return msgpack.Unpacker(
        read_size=min(UNPACK_START, max_size),
        raw=False,
        strict_map_key=True,
        max_buffer_size=max_size,
        max_str_len=max_size,
        max_bin_len=max_size,
        max_array_len=1024,
        max_map_len=64,
        max_ext_len=0,
    )


def _next_object(unpacker: msgpack.Unpacker) -> tuple[bool, Any]:
    """(True, obj) for a complete object, (False, None) when more bytes are needed."""
    try:
        return True, unpacker.unpack()
    except msgpack.OutOfData:
        return False, None
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise MalformedMessage(f"undecodable msgpack: {exc}") from None


class ControlDecoder:
    """Decodes the control stream into validated messages.

    Unknown message types are dropped here, as the protocol requires. The
    msgpack unpacker exists only while a message is incomplete: an idle
    connection keeps none.
    """

    def __init__(self, max_message_size: int = messages.MAX_MESSAGE_SIZE) -> None:
        self._max = max_message_size
        self._unpacker: msgpack.Unpacker | None = None
        self._base = 0  # stream offset where the current unpacker began
        self._fed = 0
        self._start = 0  # stream offset where the pending message began

    @property
    def buffered(self) -> int:
        # Not ``fed - tell()``: the C unpacker folds a partial object's bytes
        # into its parse state, so tell() moves before the object is complete.
        return self._fed - self._start

    def feed(self, data: bytes) -> list[messages.Message]:
        return [msg for msg, _size in self.feed_sized(data) if msg is not None]

    def feed_sized(self, data: bytes) -> list[tuple[messages.Message | None, int]]:
        """Like :meth:`feed`, with each message's encoded size; an unknown
        type is ``None`` here (so that its size and rate can be budgeted)."""
        out: list[tuple[messages.Message | None, int]] = []
        view = memoryview(data)
        while view:
            # Never hand the unpacker more than one message's worth, so that a
            # burst of small messages is not mistaken for one oversized one.
            room = self._max - self.buffered
            if room <= 0:
                raise MessageTooLarge(f"control message exceeds {self._max} bytes")
            piece, view = view[:room], view[room:]
            unpacker = self._unpacker
            if unpacker is None:
                unpacker = self._unpacker = _unpacker(self._max)
                self._base = self._fed
            unpacker.feed(piece)
            self._fed += len(piece)
            while True:
                ok, obj = _next_object(unpacker)
                if not ok:
                    break
                end = self._base + int(unpacker.tell())
                size = end - self._start
                if size > self._max:
                    raise MessageTooLarge(f"control message exceeds {self._max} bytes")
                self._start = end
                msg = messages.decode(obj)
                if isinstance(msg, messages.Close):
                    raise RemoteProtocolError("close map is not valid on the control stream")
                out.append((msg, size))
            if self.buffered >= self._max:
                raise MessageTooLarge(f"control message exceeds {self._max} bytes")
            if self._start == self._fed:
                self._unpacker = None  # nothing pending: free its buffer
        return out


@attrs.frozen
class Payload:
    data: bytes
    #: Wire bytes this piece accounts for (payload plus its share of headers).
    wire_len: int


@attrs.frozen
class CloseReceived:
    close: messages.Close
    wire_len: int


DataItem = Payload | CloseReceived


class DataStreamDecoder:
    """Turns data-stream body bytes into payload pieces and a close reason."""

    def __init__(self, max_payload_object: int = MAX_PAYLOAD_OBJECT) -> None:
        self._max_object = max_payload_object
        self._header = bytearray()  # a bin header split across frames
        self._remaining = 0  # payload bytes still due for the current bin
        self._map: msgpack.Unpacker | None = None
        self._map_fed = 0
        self._closed = False

    @property
    def mid_object(self) -> bool:
        """True when the stream may not end here (a partial object is pending)."""
        return bool(self._header) or self._remaining > 0 or self._map is not None

    def feed(self, data: bytes) -> list[DataItem]:
        out: list[DataItem] = []
        view = memoryview(data)
        pending_wire = 0  # header bytes consumed but not yet attributed
        while view:
            if self._remaining:
                n = min(self._remaining, len(view))
                out.append(Payload(bytes(view[:n]), n + pending_wire))
                pending_wire = 0
                self._remaining -= n
                view = view[n:]
                continue
            if self._map is not None:
                view = self._feed_map(view, out)
                continue
            if self._closed:
                raise RemoteProtocolError("data after close on a data stream")
            if not self._header:
                first = view[0]
                if first in _BIN_HEADERS:
                    self._header.append(first)
                    view = view[1:]
                    pending_wire += 1
                    continue
                if 0x80 <= first <= 0x8F or first == 0xDE:
                    self._map = _unpacker(messages.MAX_MESSAGE_SIZE)
                    self._map_fed = 0
                    continue
                raise MalformedMessage(f"data stream object must be bin or map, got 0x{first:02x}")
            size, fmt = _BIN_HEADERS[self._header[0]]
            need = size + 1 - len(self._header)
            take = bytes(view[:need])
            self._header += take
            pending_wire += len(take)
            view = view[len(take) :]
            if len(self._header) == size + 1:
                (length,) = struct.unpack(fmt, self._header[1:])
                self._header.clear()
                if length > self._max_object:
                    raise MessageTooLarge(
                        f"payload object of {length} bytes exceeds {self._max_object}"
                    )
                self._remaining = length
                if length == 0:
                    # An empty bin still spends wire bytes; credit them.
                    out.append(Payload(b"", pending_wire))
                    pending_wire = 0
        if pending_wire:
            # Header bytes whose payload has not arrived yet: credit them now
            # with an empty piece so the window accounting stays exact.
            out.append(Payload(b"", pending_wire))
        return out

    def _feed_map(self, view: memoryview, out: list[DataItem]) -> memoryview:
        assert self._map is not None
        room = messages.MAX_MESSAGE_SIZE - self._map_fed
        if room <= 0:
            raise MessageTooLarge("close map exceeds the message size limit")
        piece = view[:room]
        self._map.feed(piece)
        ok, obj = _next_object(self._map)
        if not ok:
            # Credit the partial map now; the whole stream stays byte-exact.
            self._map_fed += len(piece)
            out.append(Payload(b"", len(piece)))
            return view[len(piece) :]
        used = self._map.tell() - self._map_fed
        self._map_fed = 0
        self._map = None
        msg = messages.decode(obj)
        if not isinstance(msg, messages.Close):
            raise RemoteProtocolError("only a close map may appear on a data stream")
        self._closed = True
        out.append(CloseReceived(msg, used))
        return view[used:]


def check_clean_end(decoder: DataStreamDecoder) -> None:
    """Raise if a stream ended in the middle of an object."""
    if decoder.mid_object:
        raise MalformedMessage("data stream ended inside an object")


__all__ = [
    "MAX_PAYLOAD_OBJECT",
    "CloseReceived",
    "ControlDecoder",
    "DataItem",
    "DataStreamDecoder",
    "Payload",
    "ProtocolError",
    "bin_header",
    "bin_header_size",
    "check_clean_end",
]
