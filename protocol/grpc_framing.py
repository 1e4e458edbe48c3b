"""Sans-IO gRPC message framing and status plumbing (the ``--mode grpc`` frontend).

On an HTTP/2 stream a gRPC body is a sequence of length-prefixed messages::

    compressed-flag (1 byte) | message-length (4 bytes, big-endian) | message

We never negotiate compression (we send no ``grpc-accept-encoding`` and no
``grpc-encoding``), so the only acceptable flag is 0. A request whose
``grpc-encoding`` header names a real codec should be refused at the header
stage with :attr:`GrpcStatus.UNIMPLEMENTED` plus ``grpc-accept-encoding:
identity``, as the gRPC compression spec says; this module covers the body.

Error messages copy grpc-go's wording, so a kube-apiserver log reads the same
whichever server it talked to. :func:`status_for_error` turns the exceptions
raised here (and by :mod:`protocol.packets`) into a status for the trailers.
"""

from __future__ import annotations

import enum
import re

from protocol.errors import InvalidMessage, MalformedMessage, MessageTooLarge, ProtocolError

#: grpc-go's default receive limit, which kube-apiserver's client also uses.
DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024

HEADER_SIZE = 5
_MAX_LENGTH_FIELD = 0xFFFFFFFF

#: ``reason`` tokens of the MalformedMessage instances raised here.
REASON_COMPRESSED = "grpc_compressed"
REASON_BAD_FLAG = "grpc_bad_flag"
REASON_TRUNCATED = "grpc_truncated"


class GrpcStatus(enum.IntEnum):
    """The canonical gRPC status codes (``grpc-status`` trailer values)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def encode_message(payload: bytes) -> bytes:
    """Frame one uncompressed message: flag 0, 4-byte big-endian length, payload."""
    length = len(payload)
    if length > _MAX_LENGTH_FIELD:
        # Our own bug, not the peer's: the length cannot be represented.
        raise ValueError(f"gRPC message of {length} bytes does not fit a 4-byte length")
    return b"\x00" + length.to_bytes(4, "big") + payload


class GrpcMessageDecoder:
    """Incremental decoder of a gRPC message stream; accepts any chunking.

    A declared length above ``max_message_size`` is rejected as soon as the
    5-byte header is complete, before any of the body is waited for. After an
    error the decoder is poisoned: every later :meth:`feed` re-raises it.
    """

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        if max_message_size < 0:
            raise ValueError("max_message_size must be >= 0")
        self._max = max_message_size
        self._buf = bytearray()
        # Length of the message whose header has been consumed, or None while
        # waiting for a header.
        self._body_len: int | None = None
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Wire bytes received but not yet returned as part of a message."""
        return len(self._buf) + (HEADER_SIZE if self._body_len is not None else 0)

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return every message they complete, in order."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        try:
            while True:
                if self._body_len is None:
                    if len(buf) - pos < HEADER_SIZE:
                        break
                    self._body_len = self._check_header(
                        buf[pos], int.from_bytes(buf[pos + 1 : pos + HEADER_SIZE], "big")
                    )
                    pos += HEADER_SIZE
                end = pos + self._body_len
                if len(buf) < end:
                    break
                out.append(bytes(buf[pos:end]))
                pos = end
                self._body_len = None
        except ProtocolError as exc:
            self._error = exc
            buf.clear()
            self._body_len = None
            raise
        del buf[:pos]
        return out

    def _check_header(self, flag: int, length: int) -> int:
        # Length first, as grpc-go does: an oversized message is
        # RESOURCE_EXHAUSTED whatever its flag says.
        if length > self._max:
            raise MessageTooLarge(
                f"grpc: received message larger than max ({length} vs. {self._max})"
            )
        if flag == 1:
            raise MalformedMessage(
                "grpc: compressed flag set with identity or empty encoding",
                reason=REASON_COMPRESSED,
            )
        if flag != 0:
            raise MalformedMessage(
                f"grpc: received unexpected payload format {flag}", reason=REASON_BAD_FLAG
            )
        return length

    def end_of_stream_check(self) -> None:
        """Call when the peer ends the stream: a partial message is an error."""
        if self._error is not None:
            raise self._error
        if self.buffered:
            raise MalformedMessage(
                f"grpc: stream ended inside a message ({self.buffered} bytes buffered): "
                "unexpected EOF",
                reason=REASON_TRUNCATED,
            )


def status_for_error(exc: ProtocolError) -> tuple[GrpcStatus, str]:
    """The (status, message) to put in the trailers when ``exc`` ends a call.

    - :class:`MessageTooLarge` -> RESOURCE_EXHAUSTED (as grpc-go).
    - :class:`MalformedMessage` -> INTERNAL. That covers a compressed message
      (grpc-go answers INTERNAL "compressed flag set with identity or empty
      encoding" when no grpc-encoding was negotiated; UNIMPLEMENTED is only
      for a named but unsupported grpc-encoding, refused at the headers),
      an unknown flag, a truncated stream, and undecodable protobuf (grpc-go:
      INTERNAL "grpc: failed to unmarshal the received message").
    - :class:`InvalidMessage` (a Packet that decodes but is inconsistent) ->
      INVALID_ARGUMENT.
    - anything else -> INTERNAL.
    """
    if isinstance(exc, MessageTooLarge):
        return GrpcStatus.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, InvalidMessage):
        return GrpcStatus.INVALID_ARGUMENT, str(exc)
    return GrpcStatus.INTERNAL, str(exc)


def encode_grpc_message(message: str) -> str:
    """Percent-encode a ``grpc-message`` value as the gRPC HTTP/2 spec requires.

    The UTF-8 bytes 0x20-0x7E pass through, except ``%``; every other byte
    becomes ``%XX`` (upper-case hex, as grpc-go writes it).
    """
    raw = message.encode("utf-8", "surrogatepass")
    out: list[str] = []
    for b in raw:
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(chr(b))
        else:
            out.append(f"%{b:02X}")
    return "".join(out)


_PCT_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")


def decode_grpc_message(value: str) -> str:
    """Reverse :func:`encode_grpc_message`, leniently.

    The spec says a receiver must not fail on a bad encoding: an invalid
    ``%`` sequence is kept literally, and invalid UTF-8 is replaced.
    """
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # lone surrogates beyond the escape range
        raw = value.encode("utf-8", "surrogatepass")  # replaced below
    decoded = _PCT_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw)
    return decoded.decode("utf-8", "replace")


def grpc_trailers(status: GrpcStatus, message: str = "") -> list[tuple[str, str]]:
    """The trailers that end a call: ``grpc-status`` and ``grpc-message``."""
    return [
        ("grpc-status", str(int(status))),
        ("grpc-message", encode_grpc_message(message)),
    ]


_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_TIMEOUT_UNIT_SECONDS = {
    "H": 3600.0,
    "M": 60.0,
    "S": 1.0,
    "m": 1e-3,
    "u": 1e-6,
    "n": 1e-9,
}


def parse_timeout(value: str) -> float | None:
    """Seconds from a ``grpc-timeout`` header (``"10S"``, ``"500m"``, ``"1H"``).

    The spec's grammar: at most 8 ASCII digits, then one of H M S m u n.
    Returns None for anything else; the caller decides whether to ignore the
    header or fail the call (grpc-go fails it with INTERNAL "malformed
    grpc-timeout").
    """
    match = _TIMEOUT.fullmatch(value)
    if match is None:
        return None
    return int(match.group(1)) * _TIMEOUT_UNIT_SECONDS[match.group(2)]
