"""Write the committed seed corpora under ``fuzz/corpus/<target>/``.

Seeds are small valid inputs (plus a few near misses) that get each target
past its first checks at once; the fuzzer mutates from there. Re-run after
changing a target's input layout:  python fuzz/make_seeds.py
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import h2.config
import h2.connection
import msgpack

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fuzz_targets import _preface  # noqa: E402

from protocol import framing, grpc_framing, messages, packets, session  # noqa: E402
from protocol import konnectivity_pb2 as pb  # noqa: E402
from protocol.codes import CloseCode, DialFailCode  # noqa: E402

CHUNKS = b"\x02\x07\x40"  # FuzzedDataProvider picks: a couple of chunk sizes


def _msgs() -> list[bytes]:
    return [
        messages.encode(messages.Dial(id=7, addr="10.0.0.5:10250", timeout_ms=5000, early=b"hi")),
        messages.encode(messages.Cancel(id=7)),
        messages.encode(messages.Drain(retry_ms=3000)),
        messages.encode(messages.Drain()),
        messages.encode(messages.DialFail(id=7, code=DialFailCode.REFUSED, msg="no")),
        messages.encode(messages.Identifiers("host=n1&ipv4=10.0.0.5&cidr=10.1.0.0/16")),
        messages.encode(messages.Close(CloseCode.RESET, "reset")),
        msgpack.packb({"t": "future", "x": 1}),
    ]


def seeds() -> dict[str, list[bytes]]:
    msgs = _msgs()
    bins = framing.bin_header(5) + b"hello" + framing.bin_header(0) + framing.bin_header(300)
    bins += b"x" * 300 + messages.encode(messages.Close(CloseCode.ERROR, "bye"))
    pkt = [
        pb.Packet(type=pb.DIAL_REQ, dialRequest=pb.DialRequest(protocol="tcp", address="a:1")),
        packets.data_packet(3, b"payload"),
        packets.close_response(3, "done"),
        pb.Packet(type=pb.CLOSE_REQ, closeRequest=pb.CloseRequest(connectID=3)),
        pb.Packet(type=pb.DIAL_CLS, closeDial=pb.CloseDial(random=9)),
    ]
    grpc_stream = b"".join(grpc_framing.encode_message(packets.encode_packet(p)) for p in pkt)

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(
        1,
        [
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", "broker"),
            (":path", session.CONTROL_PATH),
            ("content-type", session.CONTENT_TYPE),
            ("tether-agent-id", "agent-1"),
        ],
    )
    client.send_data(1, msgs[4] + msgs[5])
    client.send_headers(
        3,
        [
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", "broker"),
            (":path", session.STREAM_PATH),
            ("content-type", session.CONTENT_TYPE),
            (session.DIAL_ID_HEADER, "1"),
        ],
    )
    client.send_data(3, framing.bin_header(4) + b"ping", end_stream=True)
    client.reset_stream(3)
    h2_wire = client.data_to_send()
    raw_after_preface = (
        h2_wire[len(_preface()) :] if h2_wire.startswith(_preface()) else h2_wire[24:]
    )

    return {
        "messages": [b"\x00" + m for m in msgs] + [b"\x01" + b"\x00\x03" * 20],
        "control": [
            b"\x02" + CHUNKS + b"".join(msgs[:6]),
            b"\x00\x01\x05" + msgs[0] * 3,
            b"\x01\x01\x09" + msgpack.packb({"t": "dial", "addr": "x" * 400}),
        ],
        "data_stream": [b"\x02" + CHUNKS + bins, b"\x00\x01\x03" + bins[:40]],
        "grpc": [
            b"\x03\x0010S" + CHUNKS + grpc_stream,
            b"\x01\x02" + b"1H" + b"\x01\x05" + grpc_framing.encode_message(b"\x08\x04"),
        ],
        "session": [
            b"\x01\x10\x00" + raw_after_preface,
            b"\x00" + bytes(range(256)) * 4,
            b"\x00" + b"\x00\x00\x01\x00\x01\x03\x01\x04\x00\x00\x05" * 40,
        ],
        "h2base": [
            b"\x01\x10\x00" + raw_after_preface,
            b"\x00" + bytes(range(256)) * 4,
        ],
        "connect": [
            CHUNKS + b"CONNECT 10.0.0.5:10250 HTTP/1.1\r\nHost: 10.0.0.5:10250\r\n\r\nearly",
            CHUNKS + b"CONNECT [::1]:22 HTTP/1.1\r\nHost: x\r\nUser-Agent: kube\r\n\r\n",
            CHUNKS + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            CHUNKS + b"CONNECT a HTTP/1.0\r\n\r\n",
            CHUNKS + b"CONNECT a:1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
            CHUNKS + b"CONNECT a:1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ],
    }


def main() -> None:
    for target, inputs in seeds().items():
        out = HERE / "corpus" / target
        out.mkdir(parents=True, exist_ok=True)
        for data in inputs:
            (out / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)
        print(f"{target}: {len(inputs)} seeds")


if __name__ == "__main__":
    main()
