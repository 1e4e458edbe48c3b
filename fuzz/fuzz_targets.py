"""Fuzz targets: every decoder that peer bytes reach, bytes in, verdict out.

Each target takes one fuzzer input and drives one decoder the way the
broker does. It may raise only the errors that path documents:

- the sans-IO protocol layer raises only :class:`protocol.errors.ProtocolError`
  (and its subclasses), whatever it is fed;
- the CONNECT request parser raises nothing at all: every request becomes a
  :class:`~protocol.connect_request.ConnectTarget` or a refusal;
- calls the broker makes from its event handlers (accepting the control
  stream, pairing or refusing a data stream, crediting, resetting) raise
  nothing, because an exception there ends the agent's connection as an
  internal error.

Anything else escaping a target is a crash. Targets also assert the
properties the rest of the code relies on: results do not depend on how the
bytes were chunked, data-stream credit is byte-exact, and what decodes
re-encodes to the same value.

The input is split with :class:`atheris.FuzzedDataProvider` where a target
needs choices (chunk sizes, limits, frames); the payload stays one contiguous
tail so that libFuzzer's mutations land on it directly.
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import atheris  # type: ignore[import-untyped]
import h2.errors
import h2.events
import h2.exceptions
import hpack
import msgpack

from protocol import events as E
from protocol import framing, grpc_framing, h2base, messages, packets, session
from protocol.codes import CloseCode, DialFailCode
from protocol.connect_request import (
    MAX_REQUEST_HEADER_BYTES,
    ConnectRefusal,
    ConnectRequestParser,
    ConnectTarget,
    parse_connect_request,
    render_response,
)
from protocol.errors import ProtocolError, RemoteProtocolError
from protocol.messages import split_host_port

Target = Callable[[bytes], None]


# ------------------------------------------------------------------ helpers


def _chunk_plan(fdp: atheris.FuzzedDataProvider) -> list[int]:
    """Chunk sizes (cycled) for feeding a payload piecewise; 1..300 bytes."""
    count = fdp.ConsumeIntInRange(1, 6)
    return [fdp.ConsumeIntInRange(1, 300) for _ in range(count)]


def _chunks(data: bytes, plan: list[int]) -> Iterator[bytes]:
    pos, i = 0, 0
    while pos < len(data):
        n = plan[i % len(plan)]
        yield data[pos : pos + n]
        pos += n
        i += 1


def _unpack(body: bytes) -> Any:
    """msgpack as the broker configures it (framing._unpacker's limits)."""
    return msgpack.unpackb(
        body,
        raw=False,
        strict_map_key=True,
        max_str_len=messages.MAX_MESSAGE_SIZE,
        max_bin_len=messages.MAX_MESSAGE_SIZE,
        max_array_len=1024,
        max_map_len=64,
        max_ext_len=0,
    )


_MSGPACK_ERRORS = (ValueError, TypeError, msgpack.UnpackException, RecursionError)

_KEYS = ["t", "id", "addr", "timeout_ms", "proto", "early", "retry_ms", "code", "msg", "value"]
_TYPES = ["dial", "cancel", "drain", "dial_fail", "identifiers", "close", "other", ""]
_CODES = [c.value for c in DialFailCode] + [c.value for c in CloseCode] + ["bogus"]


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    kind = fdp.ConsumeIntInRange(0, 11)
    if kind == 0:
        return fdp.ConsumeIntInRange(0, 2**64 - 1)
    if kind == 1:
        return fdp.ConsumeIntInRange(-(2**63), 2**16)
    if kind == 2:
        return fdp.ConsumeBool()
    if kind == 3:
        return None
    if kind == 4:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 64))
    if kind == 5:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    if kind == 6:
        return fdp.ConsumeFloat()
    if kind == 7 and depth < 3:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 8:
        return fdp.PickValueInList(_CODES)
    if kind == 9:
        host = fdp.PickValueInList(["10.0.0.5", "[::1]", "node-1", "", "a b", "[v6"])
        return f"{host}:{fdp.ConsumeIntInRange(0, 70000)}"
    if kind == 10:
        return fdp.ConsumeIntInRange(0, 3_600_001)
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40_000))


def _message_map(fdp: atheris.FuzzedDataProvider) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if fdp.ConsumeIntInRange(0, 7):
        body["t"] = fdp.PickValueInList(_TYPES)
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        key = fdp.PickValueInList(_KEYS) if fdp.ConsumeIntInRange(0, 7) else "x"
        body[key] = _value(fdp)
    return body


# ----------------------------------------------------------- msgpack messages


def fuzz_messages(data: bytes) -> None:
    """``messages.decode`` over ``msgpack.unpackb``: raw bytes, or a
    structured map (known types, fields of every msgpack type)."""
    if not data:
        return
    fdp = atheris.FuzzedDataProvider(data[1:])
    if data[0] & 1:
        body: bytes = msgpack.packb(_message_map(fdp), use_bin_type=True)
    else:
        body = data[1:]
    try:
        obj = _unpack(body)
    except _MSGPACK_ERRORS:
        return  # not msgpack: the framing layer's MalformedMessage, tested there
    try:
        msg = messages.decode(obj)
    except ProtocolError:
        return
    if msg is None:
        return
    # What decodes must re-encode to an equal message.
    try:
        again = messages.encode(msg)
    except ProtocolError:
        return
    assert messages.decode(_unpack(again)) == msg, (msg, again)


# ------------------------------------------------------------ control stream


def fuzz_control(data: bytes) -> None:
    """``ControlDecoder`` fed in random chunks; the same bytes fed at once
    must give the same messages (or fail too)."""
    fdp = atheris.FuzzedDataProvider(data)
    limit = fdp.PickValueInList([64, 300, messages.MAX_MESSAGE_SIZE])
    plan = _chunk_plan(fdp)
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())

    chunked = framing.ControlDecoder(limit)
    got: list[messages.Message] = []
    chunked_error: ProtocolError | None = None
    try:
        for piece in _chunks(payload, plan):
            got.extend(chunked.feed(piece))
    except ProtocolError as exc:
        chunked_error = exc

    whole = framing.ControlDecoder(limit)
    try:
        all_at_once = whole.feed(payload)
    except ProtocolError as exc:
        assert chunked_error is not None, f"chunked feed passed, whole feed failed: {exc!r}"
        return
    assert chunked_error is None, f"whole feed passed, chunked feed failed: {chunked_error!r}"
    assert got == all_at_once, (got, all_at_once)
    assert chunked.buffered == whole.buffered, (chunked.buffered, whole.buffered)
    assert 0 <= whole.buffered < limit


# --------------------------------------------------------------- data stream


def _drain_data(
    decoder: framing.DataStreamDecoder, pieces: Iterator[bytes]
) -> tuple[bytes, list[messages.Close], int, int, ProtocolError | None]:
    payload, closes, credited, fed = bytearray(), [], 0, 0
    try:
        for piece in pieces:
            items = decoder.feed(piece)
            fed += len(piece)
            for item in items:
                credited += item.wire_len
                if isinstance(item, framing.Payload):
                    payload += item.data
                else:
                    closes.append(item.close)
            # Credit is byte-exact at every step, not only at the end.
            assert credited == fed, (credited, fed)
    except ProtocolError as exc:
        return bytes(payload), closes, credited, fed, exc
    return bytes(payload), closes, credited, fed, None


def fuzz_data_stream(data: bytes) -> None:
    """``DataStreamDecoder`` in random chunks: every wire byte is credited
    exactly once, and chunking changes nothing."""
    fdp = atheris.FuzzedDataProvider(data)
    max_object = fdp.PickValueInList([16, 300, framing.MAX_PAYLOAD_OBJECT])
    plan = _chunk_plan(fdp)
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())

    chunked = framing.DataStreamDecoder(max_object)
    c_data, c_closes, _, _, c_err = _drain_data(chunked, _chunks(payload, plan))
    whole = framing.DataStreamDecoder(max_object)
    w_data, w_closes, _, _, w_err = _drain_data(whole, iter([payload]))

    assert (c_err is None) == (w_err is None), (c_err, w_err)
    if w_err is None:
        assert c_data == w_data
        assert c_closes == w_closes
        assert chunked.mid_object == whole.mid_object
        for dec in (chunked, whole):
            try:
                framing.check_clean_end(dec)
            except ProtocolError:
                assert dec.mid_object
    else:
        # Before an error, the chunked decoder may only have seen a prefix.
        assert w_data.startswith(c_data) or c_data.startswith(w_data)


# -------------------------------------------------------- gRPC and protobuf


def _check_packet(raw: bytes) -> None:
    try:
        pkt = packets.decode_packet(raw)
    except ProtocolError as exc:
        status, text = grpc_framing.status_for_error(exc)
        assert status != grpc_framing.GrpcStatus.OK
        grpc_framing.grpc_trailers(status, text)
        return
    again = packets.decode_packet(packets.encode_packet(pkt))
    assert again == pkt, (pkt, again)


def fuzz_grpc(data: bytes) -> None:
    """``GrpcMessageDecoder`` in random chunks, every message through
    ``packets.decode_packet``; plus the header helpers a client reaches."""
    fdp = atheris.FuzzedDataProvider(data)
    limit = fdp.PickValueInList([0, 32, 4096, grpc_framing.DEFAULT_MAX_MESSAGE_SIZE])
    header = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 16))
    timeout = grpc_framing.parse_timeout(header)
    assert timeout is None or timeout >= 0
    grpc_framing.decode_grpc_message(header)
    plan = _chunk_plan(fdp)
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())

    chunked = grpc_framing.GrpcMessageDecoder(limit)
    got: list[bytes] = []
    c_err: ProtocolError | None = None
    try:
        for piece in _chunks(payload, plan):
            got.extend(chunked.feed(piece))
    except ProtocolError as exc:
        c_err = exc
        try:  # a decoder that failed on input stays failed
            chunked.feed(b"\x00")
            raise AssertionError("decoder accepted input after an error")
        except ProtocolError:
            pass
    else:
        try:
            chunked.end_of_stream_check()
        except ProtocolError as exc:
            c_err = exc

    whole = grpc_framing.GrpcMessageDecoder(limit)
    try:
        all_at_once = whole.feed(payload)
        whole.end_of_stream_check()
    except ProtocolError:
        assert c_err is not None, "whole feed failed, chunked feed passed"
    else:
        assert c_err is None, f"chunked feed failed: {c_err!r}"
        assert got == all_at_once
    for raw in got:
        _check_packet(raw)
    if not got:
        _check_packet(payload)  # the protobuf decoder on its own, too


# ----------------------------------------------------- tunnel session (broker)

_DATA, _HEADERS, _PRIORITY, _RST, _SETTINGS, _PUSH, _PING, _GOAWAY, _WINDOW, _CONT = range(10)
_END_STREAM, _END_HEADERS, _PADDED, _PRIO_FLAG, _ACK = 0x1, 0x4, 0x8, 0x20, 0x1

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", sid)
        + payload
    )


class _Agent:
    """A hostile agent, frame by frame, as the fuzzer chooses."""

    def __init__(self, fdp: atheris.FuzzedDataProvider) -> None:
        self.fdp = fdp
        self.encoder = hpack.Encoder()
        self.next_sid = 1

    def sid(self) -> int:
        fdp = self.fdp
        pick = fdp.ConsumeIntInRange(0, 7)
        if pick == 0:
            sid = self.next_sid
            self.next_sid += 2
            return sid
        if pick == 1:
            return 0
        if pick == 2:
            return int(fdp.ConsumeIntInRange(0, 2**31 - 1))
        return int(fdp.ConsumeIntInRange(0, 6)) * 2 + 1  # a recent odd id

    def request(self, path: str, extra: list[tuple[str, str]]) -> bytes:
        fdp = self.fdp
        headers = [
            (":method", fdp.PickValueInList(["POST", "POST", "GET"])),
            (":scheme", "https"),
            (":authority", "broker"),
            (":path", path),
            ("content-type", session.CONTENT_TYPE),
            *extra,
        ]
        if fdp.ConsumeIntInRange(0, 7) == 0:
            headers.append(
                (fdp.ConsumeUnicodeNoSurrogates(8).lower(), fdp.ConsumeUnicodeNoSurrogates(16))
            )
        raw: list[tuple[bytes, bytes]] = []
        if fdp.ConsumeIntInRange(0, 7) == 0:
            raw.append((b"x-raw", fdp.ConsumeBytes(8)))  # not necessarily UTF-8
        block = self.encoder.encode([*headers, *raw])
        flags = _END_HEADERS | (_END_STREAM if fdp.ConsumeIntInRange(0, 7) == 0 else 0)
        sid = self.next_sid if fdp.ConsumeIntInRange(0, 3) else self.sid()
        self.next_sid = max(self.next_sid, sid + 2 if sid % 2 else sid + 1)
        return _frame(_HEADERS, flags, sid, block)

    def frame(self) -> bytes:
        fdp = self.fdp
        op = fdp.ConsumeIntInRange(0, 13)
        if op == 0:
            extra = [("tether-agent-id", "agent-1")]
            return self.request(session.CONTROL_PATH, extra)
        if op == 1:
            dial = fdp.PickValueInList(["1", "2", "3", "7", "", "x", "²", "18446744073709551616"])
            return self.request(session.STREAM_PATH, [(session.DIAL_ID_HEADER, dial)])
        if op == 2:
            return self.request(fdp.ConsumeUnicodeNoSurrogates(12), [])
        if op in (3, 4):
            size = fdp.ConsumeIntInRange(0, 600)
            if op == 3:
                body = framing.bin_header(size) + fdp.ConsumeBytes(size)
            else:
                body = fdp.ConsumeBytes(size)
            flags = fdp.PickValueInList([0, 0, _END_STREAM, _PADDED])
            if flags & _PADDED:
                pad = fdp.ConsumeIntInRange(0, 255)
                body = bytes([pad]) + body + b"\x00" * pad
            return _frame(_DATA, flags, self.sid(), body)
        if op == 5:
            msg = msgpack.packb(_message_map(fdp), use_bin_type=True)
            return _frame(_DATA, 0, 1, msg)
        if op == 6:
            code = fdp.PickValueInList([0, 1, 2, 3, 7, 8, 11, 0xFFFFFFFF])
            return _frame(_RST, 0, self.sid(), struct.pack(">I", code))
        if op == 7:
            inc = fdp.PickValueInList(
                [0, 1, 65535, 2**20, 2**31 - 1, fdp.ConsumeInt(4) & 0xFFFFFFFF]
            )
            return _frame(_WINDOW, 0, self.sid(), struct.pack(">I", inc))
        if op == 8:
            if fdp.ConsumeBool():
                return _frame(_SETTINGS, _ACK, 0, b"")
            pairs = b"".join(
                struct.pack(">HI", fdp.ConsumeIntInRange(0, 9), fdp.ConsumeInt(4) & 0xFFFFFFFF)
                for _ in range(fdp.ConsumeIntInRange(0, 4))
            )
            return _frame(_SETTINGS, 0, 0, pairs)
        if op == 9:
            return _frame(_PING, fdp.PickValueInList([0, _ACK]), 0, fdp.ConsumeBytes(8).ljust(8))
        if op == 10:
            code = fdp.PickValueInList([0, 1, 11])
            return _frame(_GOAWAY, 0, 0, struct.pack(">II", fdp.ConsumeIntInRange(0, 99), code))
        if op == 11:
            return _frame(_PRIORITY, 0, self.sid(), fdp.ConsumeBytes(5).ljust(5, b"\x00"))
        if op == 12:
            kind = fdp.PickValueInList([_CONT, _PUSH, 0x0A, 0xFF, _HEADERS])
            flags = fdp.ConsumeIntInRange(0, 255)
            return _frame(kind, flags, self.sid(), fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
        return bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 32)))


class _Broker:
    """What the broker's handlers do with session events (AgentConnection,
    TunnelConnection): every call here must not raise."""

    def __init__(self, sess: session.TunnelSession, fdp: atheris.FuzzedDataProvider) -> None:
        self.sess = sess
        self.fdp = fdp
        self.pending = {1, 2, 3}  # dial ids the broker is waiting for
        self.streams: set[int] = set()
        self.owed: list[tuple[int, int]] = []

    def handle(self, events: list[E.Event]) -> None:
        sess, fdp = self.sess, self.fdp
        for ev in events:
            if isinstance(ev, E.ControlRequested):
                if fdp.ConsumeIntInRange(0, 3):
                    sess.accept_control({"tether-server-id": "s1", "tether-server-count": "1"})
                else:
                    sess.reject_control(403, "identity_mismatch: fuzz")
            elif isinstance(ev, E.DataStreamRequested):
                if ev.dial_id in self.pending:
                    self.pending.discard(ev.dial_id)  # a replay is refused
                    sess.accept_data_stream(ev.stream_id)
                    self.streams.add(ev.stream_id)
                else:
                    sess.reset_stream(ev.stream_id, h2.errors.ErrorCodes.CANCEL)
            elif isinstance(ev, E.StreamData):
                self.owed.append((ev.stream_id, ev.flow_len))
            elif isinstance(ev, E.StreamReset | E.StreamEnded):
                self.streams.discard(ev.stream_id)
            elif isinstance(ev, E.ControlAccepted | E.DataStreamAccepted):
                raise AssertionError(f"a broker session emitted {ev!r}")
        sess.data_to_send()

    def act(self) -> None:
        sess, fdp = self.sess, self.fdp
        op = fdp.ConsumeIntInRange(0, 9)
        sid = fdp.PickValueInList(sorted(self.streams) or [1])
        if op == 0 and self.owed:
            for stream_id, n in self.owed:
                sess.acknowledge(stream_id, n)
            self.owed.clear()
        elif op == 1:
            sess.send_data(sid, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2000)))
        elif op == 2:
            sess.send_close(sid, messages.Close(CloseCode.RESET, "fuzz"))
        elif op == 3:
            sess.end_stream(sid)
        elif op == 4:
            sess.reset_stream(sid)
        elif op == 5:
            try:  # TunnelConnection.send_message turns this into TunnelClosed
                sess.send_message(
                    messages.Dial(id=fdp.ConsumeIntInRange(1, 5), addr="a:1", timeout_ms=1)
                )
            except ProtocolError:
                pass
        elif op == 6:
            sess.send_ping(b"fuzzping")
        elif op == 7:
            sess.close(0, "fuzz")
        sess.send_capacity(sid)
        sess.data_to_send()


def _preface() -> bytes:
    """A valid agent preface: magic, SETTINGS, connection WINDOW_UPDATE."""
    settings = struct.pack(">HI", 0x2, 0) + struct.pack(">HI", 0x4, 1 << 20)
    return _PREFACE + _frame(_SETTINGS, 0, 0, settings) + _frame(_WINDOW, 0, 0, b"\x00\xf0\x00\x00")


def fuzz_session(data: bytes) -> None:
    """``TunnelSession(Role.BROKER, clock=time.monotonic)`` after a valid preface: raw bytes, or a
    frame-by-frame hostile agent (control and data streams, resets, window
    updates, settings, pings) interleaved with the broker's own actions."""
    if not data:
        return
    fdp = atheris.FuzzedDataProvider(data[1:])
    sess = session.TunnelSession(session.Role.BROKER, clock=time.monotonic)
    sess.initiate()
    sess.data_to_send()
    broker = _Broker(sess, fdp)
    if data[0] & 1:
        size = fdp.ConsumeIntInRange(1, 4096)
        wire = _preface() + fdp.ConsumeBytes(fdp.remaining_bytes())
        pieces: Iterator[bytes] = _chunks(wire, [size])
    else:
        agent = _Agent(fdp)

        def frames() -> Iterator[bytes]:
            yield _preface()
            while fdp.remaining_bytes():
                batch = b"".join(agent.frame() for _ in range(fdp.ConsumeIntInRange(1, 4)))
                yield batch
                broker.act()

        pieces = frames()
    for piece in pieces:
        while True:  # as TunnelConnection does: drain a burst's backlog
            try:
                events = sess.receive_data(piece)
            except ProtocolError:
                sess.data_to_send()  # the GOAWAY; must not raise either
                return
            broker.handle(events)
            if not sess.backlog:
                break
            piece = b""


# ------------------------------------------------------ the HTTP/2 base (server)


def fuzz_h2base(data: bytes) -> None:
    """``H2Base`` in the server role after a valid preface, under a hostile
    client (raw bytes, or frame by frame) while a generic server answers,
    credits, refuses, resets, sends and drains at random. ``receive_data``
    may raise only ``RemoteProtocolError`` (``FloodDetected`` is one); the
    server-side calls and ``data_to_send`` raise nothing."""
    if not data:
        return
    fdp = atheris.FuzzedDataProvider(data[1:])
    now = 0.0
    base = h2base.H2Base(
        h2base.H2Settings(max_concurrent_streams=fdp.ConsumeIntInRange(1, 200)),
        client=False,
        now=now,
    )
    base.initiate()
    base.data_to_send()
    opened: list[int] = []

    def handle(ev: h2.events.Event) -> None:
        sid = getattr(ev, "stream_id", 0) or 0
        if isinstance(ev, h2.events.RequestReceived):
            h2base.header_dict(ev.headers)
            opened.append(sid)
            pick = fdp.ConsumeIntInRange(0, 3) if fdp.remaining_bytes() else 0
            if pick == 1:
                base.refuse(sid, h2.errors.ErrorCodes.REFUSED_STREAM, now)
            elif pick == 2:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    base.h2.send_headers(sid, [(":status", "200")])
        elif isinstance(ev, h2.events.DataReceived):
            base.credit_stream(sid, ev.flow_controlled_length or 0)

    def act() -> None:
        if not fdp.remaining_bytes():
            return
        op = fdp.ConsumeIntInRange(0, 9)
        sid = fdp.PickValueInList(opened) if opened else fdp.ConsumeIntInRange(0, 9)
        if op == 0:
            base.credit_stream(sid, fdp.ConsumeIntInRange(0, 2**31))
        elif op == 1:
            base.reset(sid, h2.errors.ErrorCodes.CANCEL)
        elif op == 2:
            base.goaway("fuzz")
        elif op == 3:
            room = min(base.send_window(sid), fdp.ConsumeIntInRange(0, 70_000))
            if room > 0 and not base.closed:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    base.send_data(sid, b"d" * room, end_stream=fdp.ConsumeBool())
        elif op == 4:
            base.close(h2.errors.ErrorCodes.NO_ERROR, "fuzz")
        base.data_to_send()

    agent = _Agent(fdp)
    if data[0] & 1:
        size = fdp.ConsumeIntInRange(1, 4096)
        wire = _preface() + fdp.ConsumeBytes(fdp.remaining_bytes())
        pieces: Iterator[bytes] = _chunks(wire, [size])
    else:

        def frames() -> Iterator[bytes]:
            yield _preface()
            while fdp.remaining_bytes():
                yield b"".join(agent.frame() for _ in range(fdp.ConsumeIntInRange(1, 4)))
                act()

        pieces = frames()
    for piece in pieces:
        now += 0.001
        while True:
            try:
                base.receive_data(piece, now, handle)
            except RemoteProtocolError:
                base.data_to_send()  # the GOAWAY; must not raise either
                assert base.closed
                return
            base.data_to_send()
            if not base.backlog:
                break
            piece = b""


# ------------------------------------------------------------ CONNECT request


def fuzz_connect(data: bytes) -> None:
    """The CONNECT request path: ``ConnectRequestParser`` in random chunks
    and the one-shot ``parse_connect_request``; never raises, answers are
    well-formed, and chunking changes nothing."""
    fdp = atheris.FuzzedDataProvider(data)
    plan = _chunk_plan(fdp)
    wire = fdp.ConsumeBytes(fdp.remaining_bytes())

    whole = parse_connect_request(wire)
    parser = ConnectRequestParser()
    result: ConnectTarget | ConnectRefusal | None = None
    fed = 0
    for piece in _chunks(wire, plan):
        result = parser.feed(piece)
        fed += len(piece)
        if result is not None:
            break
    if result is None:
        result = parser.feed(b"")
    assert result is not None

    for parsed, conn in ((result, parser.conn), (whole, None)):
        if isinstance(parsed, ConnectTarget):
            split_host_port(parsed.target)
        elif parsed.status:
            assert 400 <= parsed.status < 600, parsed
            response = render_response(conn or ConnectRequestParser().conn, parsed.status, "x\r\ny")
            assert response.startswith(f"HTTP/1.1 {parsed.status} ".encode()), response
            assert b"\r\ny" not in response
    if len(wire) > MAX_REQUEST_HEADER_BYTES:
        return  # h11 checks its size limit only while a request is incomplete
    if isinstance(result, ConnectTarget):
        # The handler reads what follows the request as early client bytes.
        result = ConnectTarget(result.target, result.early + wire[fed:])
    assert result == whole or (
        isinstance(result, ConnectRefusal)
        and isinstance(whole, ConnectRefusal)
        and result.status == whole.status
    ), (result, whole)


TARGETS: dict[str, Target] = {
    "messages": fuzz_messages,
    "control": fuzz_control,
    "data_stream": fuzz_data_stream,
    "grpc": fuzz_grpc,
    "session": fuzz_session,
    "h2base": fuzz_h2base,
    "connect": fuzz_connect,
}
