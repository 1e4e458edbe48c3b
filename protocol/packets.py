"""Typed helpers around the generated konnectivity ``Packet`` messages.

:func:`decode_packet` is the only way peer bytes become a ``Packet``: it raises
only :mod:`protocol.errors` exceptions, and it guarantees that ``type`` names
the payload that is actually set, so callers can switch on ``type`` and read
the matching field without re-checking.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from protocol import konnectivity_pb2 as pb
from protocol.errors import InvalidMessage, MalformedMessage

Packet = pb.Packet

#: The oneof member each packet type must carry.
PAYLOAD_FOR_TYPE: dict[int, str] = {
    pb.DIAL_REQ: "dialRequest",
    pb.DIAL_RSP: "dialResponse",
    pb.CLOSE_REQ: "closeRequest",
    pb.CLOSE_RSP: "closeResponse",
    pb.DATA: "data",
    pb.DIAL_CLS: "closeDial",
    pb.DRAIN: "drain",
}


def decode_packet(data: bytes) -> pb.Packet:
    """Parse one gRPC message body as a ``Packet`` and check type vs payload.

    Raises :class:`MalformedMessage` when the bytes are not a valid Packet
    (wording as grpc-go's INTERNAL status), and :class:`InvalidMessage` when
    the type is unknown or its payload is missing or a different one.
    """
    pkt = pb.Packet()
    try:
        pkt.ParseFromString(data)
    # The upb backend raises DecodeError for everything; the pure-Python one
    # lets UnicodeDecodeError (a ValueError) escape for a bad proto3 string.
    except (DecodeError, ValueError, RecursionError) as exc:
        raise MalformedMessage(f"grpc: failed to unmarshal the received message: {exc}") from None
    expected = PAYLOAD_FOR_TYPE.get(pkt.type)
    if expected is None:
        raise InvalidMessage(f"unknown konnectivity packet type {int(pkt.type)}")
    actual = pkt.WhichOneof("payload")
    if actual != expected:
        raise InvalidMessage(
            f"konnectivity packet type {pb.PacketType.Name(pkt.type)} "
            f"carries payload {actual or 'none'}, expected {expected}"
        )
    return pkt


def encode_packet(pkt: pb.Packet) -> bytes:
    """Serialize a Packet (the body of one gRPC message)."""
    return pkt.SerializeToString()


def dial_response(random: int, connect_id: int = 0, error: str = "") -> pb.Packet:
    """DIAL_RSP: ``connect_id`` (nonzero) on success, or ``error`` on failure."""
    return pb.Packet(
        type=pb.DIAL_RSP,
        dialResponse=pb.DialResponse(random=random, connectID=connect_id, error=error),
    )


def data_packet(connect_id: int, data: bytes) -> pb.Packet:
    """DATA carrying ``data`` for connection ``connect_id``."""
    return pb.Packet(type=pb.DATA, data=pb.Data(connectID=connect_id, data=data))


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64: negative values are ten bytes, as protobuf has them
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def data_message(connect_id: int, data: bytes | memoryview) -> bytes:
    """A DATA packet for ``connect_id`` as a whole gRPC message (the 5-byte
    prefix, then the packet): the bytes ``encode_packet(data_packet(...))``
    framed by :func:`protocol.grpc_framing.encode_message` gives, built with
    one copy of the payload instead of three (into the protobuf object, out
    of it, behind the prefix). Fields in number order, defaults omitted,
    as protobuf serializes them."""
    inner = b"\x08" + _varint(connect_id) if connect_id else b""
    if len(data):
        inner += b"\x1a" + _varint(len(data))
    body_len = len(inner) + len(data)
    head = b"\x08\x04" + b"\x22" + _varint(body_len) + inner  # type=DATA, data={...}
    length = len(head) + len(data)
    if length > 0xFFFFFFFF:
        raise ValueError(f"gRPC message of {length} bytes does not fit a 4-byte length")
    return b"".join((b"\x00", length.to_bytes(4, "big"), head, data))


def close_response(connect_id: int, error: str = "") -> pb.Packet:
    """CLOSE_RSP for ``connect_id``, sent on a client CLOSE_REQ or when the target closes."""
    return pb.Packet(
        type=pb.CLOSE_RSP,
        closeResponse=pb.CloseResponse(connectID=connect_id, error=error),
    )
