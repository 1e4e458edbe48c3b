from __future__ import annotations

from typing import Any

import grpc_stubs
import pytest
from google.protobuf import descriptor_pb2
from hypothesis import given
from hypothesis import strategies as st

from protocol import konnectivity_pb2 as pb
from protocol import packets
from protocol.errors import InvalidMessage, MalformedMessage, ProtocolError
from protocol.grpc_framing import GrpcMessageDecoder, GrpcStatus, encode_message, status_for_error
from protocol.packets import (
    PAYLOAD_FOR_TYPE,
    close_response,
    data_packet,
    decode_packet,
    dial_response,
    encode_packet,
)

int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def _packet(ptype: int, payload: str | None) -> pb.Packet:
    pkt = pb.Packet(type=ptype)  # type: ignore[arg-type]
    if payload is not None:
        getattr(pkt, payload).SetInParent()
    return pkt


def test_schema_matches_konnectivity() -> None:
    fd = pb.DESCRIPTOR
    assert fd.package == ""
    fdp = descriptor_pb2.FileDescriptorProto()
    fd.CopyToProto(fdp)
    assert fdp.syntax == "proto3"
    assert {v.name: v.number for v in fd.enum_types_by_name["PacketType"].values} == {
        "DIAL_REQ": 0,
        "DIAL_RSP": 1,
        "CLOSE_REQ": 2,
        "CLOSE_RSP": 3,
        "DATA": 4,
        "DIAL_CLS": 5,
        "DRAIN": 6,
    }
    fields = {
        name: {f.name: (f.number, f.type) for f in msg.fields}
        for name, msg in fd.message_types_by_name.items()
    }
    d = pb.Packet.DESCRIPTOR.fields_by_name["type"]
    string, int64_t, bytes_t, message = d.TYPE_STRING, d.TYPE_INT64, d.TYPE_BYTES, d.TYPE_MESSAGE
    assert fields == {
        "Packet": {
            "type": (1, d.TYPE_ENUM),
            "dialRequest": (2, message),
            "dialResponse": (3, message),
            "data": (4, message),
            "closeRequest": (5, message),
            "closeResponse": (6, message),
            "closeDial": (7, message),
            "drain": (8, message),
        },
        "DialRequest": {"protocol": (1, string), "address": (2, string), "random": (3, int64_t)},
        "DialResponse": {"error": (1, string), "connectID": (2, int64_t), "random": (3, int64_t)},
        "Data": {"connectID": (1, int64_t), "error": (2, string), "data": (3, bytes_t)},
        "CloseRequest": {"connectID": (1, int64_t)},
        "CloseResponse": {"error": (1, string), "connectID": (2, int64_t)},
        "CloseDial": {"random": (1, int64_t)},
        "Drain": {},
    }
    oneof = pb.Packet.DESCRIPTOR.oneofs_by_name["payload"]
    assert sorted(f.name for f in oneof.fields) == sorted(PAYLOAD_FOR_TYPE.values())
    method = fd.services_by_name["ProxyService"].methods_by_name["Proxy"]
    assert method.input_type.full_name == method.output_type.full_name == "Packet"
    assert method.client_streaming and method.server_streaming


def test_known_wire_bytes() -> None:
    # Hand-assembled: field 1 varint 1 (DIAL_RSP), field 3 (dialResponse) of
    # 4 bytes holding connectID=7 (field 2) and random=5 (field 3).
    wire = b"\x08\x01\x1a\x04\x10\x07\x18\x05"
    pkt = decode_packet(wire)
    assert pkt == dial_response(5, connect_id=7)
    assert encode_packet(pkt) == wire


def test_decode_all_types() -> None:
    for ptype, payload in PAYLOAD_FOR_TYPE.items():
        pkt = decode_packet(encode_packet(_packet(ptype, payload)))
        assert pkt.type == ptype
        assert pkt.WhichOneof("payload") == payload


def test_decode_client_packets() -> None:
    dial = pb.Packet(
        type=pb.DIAL_REQ,
        dialRequest=pb.DialRequest(protocol="tcp", address="10.0.0.1:10250", random=-42),
    )
    got = decode_packet(encode_packet(dial))
    assert (got.dialRequest.protocol, got.dialRequest.address, got.dialRequest.random) == (
        "tcp",
        "10.0.0.1:10250",
        -42,
    )
    cls = pb.Packet(type=pb.DIAL_CLS, closeDial=pb.CloseDial(random=9))
    assert decode_packet(encode_packet(cls)).closeDial.random == 9
    close = pb.Packet(type=pb.CLOSE_REQ, closeRequest=pb.CloseRequest(connectID=3))
    assert decode_packet(encode_packet(close)).closeRequest.connectID == 3


@given(int64, int64, st.text(max_size=40))
def test_dial_response_round_trip(random: int, connect_id: int, error: str) -> None:
    pkt = decode_packet(encode_packet(dial_response(random, connect_id, error)))
    assert pkt.type == pb.DIAL_RSP
    r = pkt.dialResponse
    assert (r.random, r.connectID, r.error) == (random, connect_id, error)


@given(int64, st.binary(max_size=2000))
def test_data_round_trip(connect_id: int, data: bytes) -> None:
    pkt = decode_packet(encode_packet(data_packet(connect_id, data)))
    assert pkt.type == pb.DATA
    assert (pkt.data.connectID, pkt.data.data, pkt.data.error) == (connect_id, data, "")


@given(int64, st.text(max_size=40))
def test_close_response_round_trip(connect_id: int, error: str) -> None:
    pkt = decode_packet(encode_packet(close_response(connect_id, error)))
    assert pkt.type == pb.CLOSE_RSP
    assert (pkt.closeResponse.connectID, pkt.closeResponse.error) == (connect_id, error)


def test_empty_payload_members_still_count_as_set() -> None:
    # Default-valued submessages serialize as zero-length fields, and must
    # still satisfy the type check (an empty DATA, a fresh DRAIN).
    assert decode_packet(encode_packet(data_packet(0, b""))).WhichOneof("payload") == "data"
    assert decode_packet(b"\x08\x06\x42\x00").type == pb.DRAIN


@pytest.mark.parametrize(
    "wire",
    [
        b"\x08",  # truncated varint
        b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # over-long varint
        b"\x22\x05abc",  # length beyond the end
        b"\x0f",  # wire type 7 does not exist
        b"\x00\x00",  # field number 0
        b"\x08\x04\x22\x03\x12\x01\xff",  # invalid UTF-8 in a proto3 string (Data.error)
    ],
)
def test_garbage_is_malformed(wire: bytes) -> None:
    with pytest.raises(MalformedMessage) as info:
        decode_packet(wire)
    assert str(info.value).startswith("grpc: failed to unmarshal the received message")
    assert status_for_error(info.value)[0] == GrpcStatus.INTERNAL


@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_protocol_errors(wire: bytes) -> None:
    try:
        pkt = decode_packet(wire)
    except ProtocolError as exc:
        assert isinstance(exc, (MalformedMessage, InvalidMessage))
    else:
        assert PAYLOAD_FOR_TYPE[pkt.type] == pkt.WhichOneof("payload")


@pytest.mark.parametrize(
    ("ptype", "payload"),
    [
        (pb.DIAL_REQ, None),  # also what an empty message decodes to
        (pb.DIAL_REQ, "dialResponse"),
        (pb.DATA, "closeRequest"),
        (pb.CLOSE_REQ, "data"),
        (pb.DRAIN, None),
        (pb.DIAL_CLS, "drain"),
        (7, None),  # a type this schema does not know
        (7, "data"),
        (-1, "data"),
    ],
)
def test_type_payload_mismatch_is_invalid(ptype: int, payload: str | None) -> None:
    wire = encode_packet(_packet(ptype, payload))
    with pytest.raises(InvalidMessage) as info:
        decode_packet(wire)
    assert status_for_error(info.value)[0] == GrpcStatus.INVALID_ARGUMENT


def test_empty_message_is_invalid() -> None:
    with pytest.raises(InvalidMessage):
        decode_packet(b"")


def test_unknown_fields_are_ignored() -> None:
    # Forward compatibility: a newer peer's extra field does not break decoding.
    wire = encode_packet(data_packet(1, b"x")) + b"\x48\x01"  # field 9, varint 1
    assert decode_packet(wire).data.data == b"x"


@given(st.lists(st.tuples(int64, st.binary(max_size=100)), max_size=8))
def test_framed_stream_round_trip(items: list[tuple[int, bytes]]) -> None:
    wire = b"".join(encode_message(encode_packet(data_packet(c, d))) for c, d in items)
    dec = GrpcMessageDecoder()
    got = [decode_packet(m) for m in dec.feed(wire)]
    assert [(p.data.connectID, p.data.data) for p in got] == items


class _RecordingChannel:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def stream_stream(self, method: str, **kwargs: Any) -> str:
        self.calls.append((method, kwargs))
        return method


@pytest.mark.timeout(60)
def test_generated_grpc_stub() -> None:
    module = grpc_stubs.load_grpc_module()
    assert (module.GENERATED_DIR / "konnectivity_pb2_grpc.py").is_file()
    assert (module.GENERATED_DIR / "konnectivity_pb2.py").is_file()
    assert grpc_stubs.load_grpc_module() is module  # generated once

    channel = _RecordingChannel()
    stub = grpc_stubs.proxy_service_stub()(channel)
    assert stub.Proxy == "/ProxyService/Proxy" == grpc_stubs.METHOD_PATH
    [(method, kwargs)] = channel.calls
    assert method == "/ProxyService/Proxy"
    # The stub speaks the committed Packet class.
    pkt = dial_response(1, connect_id=2)
    wire = kwargs["request_serializer"](pkt)
    assert wire == encode_packet(pkt)
    assert isinstance(kwargs["response_deserializer"](wire), pb.Packet)


@given(
    connect_id=st.one_of(st.integers(0, 2**63 - 1), st.integers(-(2**63), -1)),
    data=st.binary(max_size=70_000),
)
def test_data_message_is_the_protobuf_encoding_framed(connect_id: int, data: bytes) -> None:
    # The hand-built DATA message (one payload copy) is byte for byte what
    # protobuf serializes, behind the gRPC prefix; and it decodes back.
    expected = encode_message(packets.encode_packet(packets.data_packet(connect_id, data)))
    assert packets.data_message(connect_id, memoryview(data)) == expected
    pkt = packets.decode_packet(expected[5:])
    assert (pkt.data.connectID, pkt.data.data) == (connect_id, data)
