"""The gRPC egress frontend end to end: grpcio (the real gRPC C-core client,
standing in for kube-apiserver's konnectivity-client) talks to the real
``tether-broker --mode grpc`` over its Unix socket; a real ``tether-agent``
dials targets on 127.0.0.1.

grpcio is blocking, so these tests are plain functions with thread-based
targets; the processes come from the shared launch tooling. Most tests share
one broker and agent (module fixture) to keep the file fast.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import queue
import re
import socket
import ssl
import struct
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import grpc
import pytest
import trio
from grpc_client import Call, close_req, data_pkt, dial_cls, dial_req, open_call
from grpc_stubs import METHOD_PATH, proxy_service_stub

from protocol import konnectivity_pb2 as pb
from protocol import packets
from protocol.errors import MalformedMessage
from tether.tools.certs import PkiPaths
from tether.tools.launch import BrokerHandle, Proc, frontend_ssl, start_agent, start_broker

pytestmark = [pytest.mark.e2e]

MiB = 1024 * 1024
_END = object()


# ------------------------------------------------------------------ processes


@attrs.frozen
class Stack:
    broker: BrokerHandle
    agent: Proc

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.broker.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    def metric(self, name: str, labels: str = "") -> float:
        pattern = re.escape(name + (("{" + labels + "}") if labels else "")) + r" (\S+)"
        match = re.search("^" + pattern + "$", self.metrics(), re.M)
        return float(match.group(1)) if match else 0.0

    def channel(self, *, single_use: bool = False) -> grpc.Channel:
        # grpcio shares connections between channels with equal arguments;
        # a local subchannel pool gives a channel its own connection, as
        # kube-apiserver's single-use tunnels have.
        options = [("grpc.use_local_subchannel_pool", 1)] if single_use else []
        return grpc.insecure_channel(f"unix:{self.broker.uds}", options=options)


def _start_stack(tmp: Path, pki: PkiPaths, *extra: str) -> tuple[BrokerHandle, Proc]:
    broker = start_broker(tmp, pki, *extra, mode="grpc")
    try:
        agent = start_agent(tmp, broker)
    except BaseException:
        broker.proc.stop(timeout=5)
        raise
    return broker, agent


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pki: PkiPaths) -> Iterator[Stack]:
    broker, agent = _start_stack(tmp_path_factory.mktemp("grpc"), pki)
    try:
        trio.run(broker.ready)
        yield Stack(broker, agent)
    finally:
        agent.stop(timeout=5)
        broker.proc.stop(timeout=5)


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def raw_call(
    channel: grpc.Channel, messages: list[bytes], method: str = METHOD_PATH, **kwargs: Any
) -> tuple[grpc.StatusCode, str]:
    """Send raw message bodies (no serializer) and return the final status."""
    multi = channel.stream_stream(
        method, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    responses = multi(iter(messages), timeout=15, **kwargs)
    try:
        for _ in responses:
            pass
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return responses.code(), responses.details()


# --------------------------------------------------------------------- targets


class Target:
    """A TCP server on 127.0.0.1; ``handler(conn)`` runs in a thread per connection."""

    def __init__(self, handler: Callable[[socket.socket], None], backlog: int = 512) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.port = int(self._sock.getsockname()[1])
        self.address = f"127.0.0.1:{self.port}"
        self._handler = handler
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            try:
                self._handler(conn)
            except OSError:
                pass

    def close(self) -> None:
        self._sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()


@contextlib.contextmanager
def target(handler: Callable[[socket.socket], None]) -> Iterator[Target]:
    t = Target(handler)
    try:
        yield t
    finally:
        t.close()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(256 * 1024):
        conn.sendall(data)


@contextlib.contextmanager
def unanswered_listener() -> Iterator[str]:
    """A loopback listener whose accept queue is full, so a connect hangs.

    With ``listen(0)`` the kernel queues one connection and drops further
    SYNs; nothing is ever accepted, so the next connect waits until the
    dialer gives up (or is cancelled). Only loopback is used.
    """
    lsock = socket.socket()
    fillers: list[socket.socket] = []
    try:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(0)
        for _ in range(2):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(lsock.getsockname())
            fillers.append(s)
        probe = socket.socket()
        probe.settimeout(0.3)
        with probe, pytest.raises(TimeoutError):
            probe.connect(lsock.getsockname())
        yield f"127.0.0.1:{lsock.getsockname()[1]}"
    finally:
        for s in fillers:
            s.close()
        lsock.close()


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# ----------------------------------------------------------------------- tests


@pytest.mark.timeout(60)
def test_dial_data_close_50mb_each_way_and_throughput(stack: Stack) -> None:
    """The full cycle, 50 MB each way with sha256 checks; then the same
    transfer through the CONNECT frontend of the same broker, for the
    throughput comparison printed at the end (measured, not asserted)."""
    size = 50 * MiB
    down = os.urandom(size)
    up = os.urandom(size)
    results: queue.Queue[tuple[str, int]] = queue.Queue()

    def source_sink(conn: socket.socket) -> None:
        sender = threading.Thread(target=conn.sendall, args=(down,), daemon=True)
        sender.start()
        h, n = hashlib.sha256(), 0
        while data := conn.recv(256 * 1024):
            h.update(data)
            n += len(data)
        sender.join()
        results.put((h.hexdigest(), n))

    timings: dict[str, float] = {}
    with target(source_sink) as tgt, stack.channel() as channel:
        with open_call(channel, queue_size=64) as call:
            t0 = time.monotonic()
            rsp = call.dial(tgt.address, random=-5)
            assert rsp.error == "" and rsp.connectID != 0
            cid = rsp.connectID

            def upload() -> None:
                view = memoryview(up)
                for off in range(0, size, 64 * 1024):
                    call.send(data_pkt(cid, bytes(view[off : off + 64 * 1024])))

            uploader = threading.Thread(target=upload, daemon=True)
            uploader.start()
            h, n = hashlib.sha256(), 0
            while n < size:
                pkt = call.recv(timeout=20)
                assert pkt is not None and pkt.type == pb.DATA, pkt
                assert pkt.data.connectID == cid
                h.update(pkt.data.data)
                n += len(pkt.data.data)
            uploader.join(20)
            assert not uploader.is_alive()
            call.send(close_req(cid))
            pkt = call.recv()
            assert pkt is not None and pkt.type == pb.CLOSE_RSP, pkt
            assert pkt.closeResponse.connectID == cid and pkt.closeResponse.error == ""
            # The close is clean (a FIN after every byte), so the target
            # sees all 50 MB and then its EOF.
            sha_up, n_up = results.get(timeout=20)
            timings["grpc"] = time.monotonic() - t0
            assert n == size and h.hexdigest() == hashlib.sha256(down).hexdigest()
            assert n_up == size and sha_up == hashlib.sha256(up).hexdigest()
            assert call.status() == (grpc.StatusCode.OK, "")

        t0 = time.monotonic()
        sha_down, sha_up2 = _connect_transfer(stack, tgt.address, up)
        sha_up, _ = results.get(timeout=20)
        timings["connect"] = time.monotonic() - t0
        assert sha_down == hashlib.sha256(down).hexdigest()
        assert sha_up == sha_up2 == hashlib.sha256(up).hexdigest()

    for name, label in (("grpc", "gRPC (UDS, h2c)"), ("connect", "CONNECT (TCP+mTLS)")):
        rate = 2 * size / MiB / timings[name]
        print(
            f"\n[throughput] {label}: 50 MiB each way in {timings[name]:.2f}s "
            f"= {rate:.0f} MiB/s combined"
        )


def _connect_transfer(stack: Stack, address: str, up: bytes) -> tuple[str, str]:
    """The same transfer through the TCP mTLS CONNECT frontend (python ssl)."""
    ctx = frontend_ssl(stack.broker.pki)
    raw = socket.create_connection(("127.0.0.1", stack.broker.server_port), timeout=30)
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(f"CONNECT {address} HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += tls.recv(4096)
        head, _, rest = head.partition(b"\r\n\r\n")
        assert head.split()[1] == b"200", head
        # One ssl socket must not be read and written from two threads at
        # once; interleave with select-free non-blocking I/O instead.
        tls.setblocking(False)
        h = hashlib.sha256(rest)
        n, sent, view = len(rest), 0, memoryview(up)
        while n < len(up):
            if sent < len(up):
                with contextlib.suppress(ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    sent += tls.send(view[sent : sent + 256 * 1024])
            try:
                data = tls.recv(256 * 1024)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                if sent >= len(up):
                    time.sleep(0.0005)
                continue
            assert data, "CONNECT tunnel closed early"
            h.update(data)
            n += len(data)
        tls.setblocking(True)
        while sent < len(up):
            sent += tls.send(view[sent:])
        tls.settimeout(30)
    return h.hexdigest(), hashlib.sha256(up).hexdigest()


@pytest.mark.timeout(30)
def test_dial_to_closed_port_is_refused(stack: Stack) -> None:
    with stack.channel() as channel, open_call(channel) as call:
        rsp = call.dial(closed_port(), random=77)
        assert rsp.connectID == 0
        assert "refused" in rsp.error, rsp.error
        # Nothing more can happen on this call; it ends cleanly.
        assert call.recv() is None
        assert call.status()[0] is grpc.StatusCode.OK


@pytest.mark.timeout(30)
def test_dial_timeout_with_short_backend_dial_timeout(
    tmp_path: Path, pki: PkiPaths, procs_started: list[Proc]
) -> None:
    broker, agent = _start_stack(tmp_path, pki, "--backend-dial-timeout=1")
    procs_started += [broker.proc, agent]
    trio.run(broker.ready)
    with (
        unanswered_listener() as address,
        grpc.insecure_channel(f"unix:{broker.uds}") as channel,
        open_call(channel) as call,
    ):
        t0 = time.monotonic()
        rsp = call.dial(address, random=3, timeout=10)
        elapsed = time.monotonic() - t0
        assert rsp.connectID == 0
        assert "timed out" in rsp.error, rsp.error
        assert 0.8 < elapsed < 5, elapsed
        assert call.status()[0] is grpc.StatusCode.OK


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["dial_cls", "client_reset"])
def test_cancelling_a_slow_dial_aborts_it_at_the_agent(stack: Stack, how: str) -> None:
    """DIAL_CLS (or the client resetting its call) during a dial that hangs."""
    aborted_before = stack.agent.log().count("cancelled by the broker")
    with unanswered_listener() as address, stack.channel() as channel:
        with open_call(channel) as call:
            call.send(dial_req(address, random=99))
            # The dial has reached the agent once the broker counts it pending.
            wait_until(
                lambda: (
                    stack.metric("konnectivity_network_proxy_server_pending_backend_dials") == 1
                ),
                10,
                "the dial to be pending",
            )
            if how == "dial_cls":
                call.send(dial_cls(99))
                # No DIAL_RSP: konnectivity-server answers DIAL_CLS with nothing.
                assert call.recv() is None
                assert call.status()[0] is grpc.StatusCode.OK
            else:
                call.call.cancel()
                assert call.recv() is None
        wait_until(
            lambda: stack.agent.log().count("cancelled by the broker") > aborted_before,
            10,
            "the agent to report the dial aborted",
        )
        wait_until(
            lambda: stack.metric("konnectivity_network_proxy_server_pending_backend_dials") == 0,
            10,
            "no pending dial",
        )


def _echo_cycle(channel: grpc.Channel, address: str, i: int, barrier: threading.Barrier) -> int:
    with open_call(channel) as call:
        rsp = call.dial(address, random=i, timeout=20)
        assert rsp.error == "" and rsp.connectID != 0, rsp
        barrier.wait(timeout=20)  # all tunnels are open at the same time
        message = f"hello {i}".encode()
        call.send(data_pkt(rsp.connectID, message))
        got = b""
        while len(got) < len(message):
            pkt = call.recv(timeout=20)
            assert pkt is not None and pkt.type == pb.DATA, pkt
            got += pkt.data.data
        assert got == message
        call.send(close_req(rsp.connectID))
        pkt = call.recv(timeout=20)
        assert pkt is not None and pkt.type == pb.CLOSE_RSP, pkt
        assert call.status(timeout=20)[0] is grpc.StatusCode.OK
        return int(rsp.connectID)


@pytest.mark.timeout(60)
def test_100_streams_on_one_channel_and_100_single_use_channels(stack: Stack) -> None:
    n = 100
    log_before = stack.broker.proc.log()
    with target(echo) as tgt, concurrent.futures.ThreadPoolExecutor(n) as pool:
        with stack.channel() as shared:
            barrier = threading.Barrier(n)
            ids = list(pool.map(lambda i: _echo_cycle(shared, tgt.address, i, barrier), range(n)))

        def single_use(i: int) -> int:
            with stack.channel(single_use=True) as channel:
                return _echo_cycle(channel, tgt.address, n + i, barrier)

        barrier = threading.Barrier(n)
        ids += list(pool.map(single_use, range(n)))
    assert len(set(ids)) == 2 * n and 0 not in ids

    def connections() -> list[int]:
        new = stack.broker.proc.log()[len(log_before) :]
        return [int(m) for m in re.findall(r"connection closed after (\d+) call", new)]

    # The broker saw one connection carrying 100 calls and 100 carrying one.
    wait_until(lambda: connections().count(1) >= n and n in connections(), 10, "closed conns")
    wait_until(
        lambda: (
            stack.metric(
                "konnectivity_network_proxy_server_established_connections", 'frontend="grpc"'
            )
            == 0
        ),
        10,
        "no established tunnel left",
    )


@pytest.mark.timeout(45)
def test_client_that_stops_reading_does_not_stall_another_stream(stack: Stack) -> None:
    sent = [0]
    source_error: queue.Queue[str] = queue.Queue()

    def endless_source(conn: socket.socket) -> None:
        block = os.urandom(64 * 1024)
        try:
            while True:
                conn.sendall(block)
                sent[0] += len(block)
        except OSError as exc:
            source_error.put(repr(exc))

    size = 8 * MiB
    payload = os.urandom(size)
    with (
        target(endless_source) as src,
        target(echo) as echo_tgt,
        stack.channel() as channel,
    ):
        # Stream A reads its DIAL_RSP and then nothing more.
        stalled = Call(channel, read_limit=1)
        try:
            rsp = stalled.dial(src.address, random=1)
            assert rsp.error == ""
            wait_until(lambda: sent[0] > 4 * MiB, 10, "the source to push data")
            # Windows fill up: the source is stopped by backpressure.
            previous = -1
            while sent[0] != previous:
                previous = sent[0]
                time.sleep(0.5)
            stalled_at = sent[0]

            # Stream B on the same channel (same h2 connection) still moves
            # several MB both ways.
            with open_call(channel, queue_size=64) as call:
                cid = call.dial(echo_tgt.address, random=2).connectID

                def upload() -> None:
                    for off in range(0, size, 64 * 1024):
                        call.send(data_pkt(cid, payload[off : off + 64 * 1024]))

                threading.Thread(target=upload, daemon=True).start()
                h, n = hashlib.sha256(), 0
                while n < size:
                    pkt = call.recv(timeout=15)
                    assert pkt is not None and pkt.type == pb.DATA, pkt
                    h.update(pkt.data.data)
                    n += len(pkt.data.data)
                assert h.hexdigest() == hashlib.sha256(payload).hexdigest()
                call.send(close_req(cid))
                pkt = call.recv()
                assert pkt is not None and pkt.type == pb.CLOSE_RSP

            # A is still held back, and what it buffered along the way stays
            # bounded by windows and socket buffers, nowhere near unbounded.
            assert sent[0] == stalled_at
            assert stalled_at < 48 * MiB, stalled_at
            print(f"\n[backpressure] stalled stream let the source send {stalled_at / MiB:.1f} MiB")
        finally:
            # The client resets A: the broker resets the tunnel, and the
            # agent aborts the target connection.
            stalled.finish()
        assert source_error.get(timeout=10)


@pytest.mark.timeout(30)
def test_bad_input_gets_clean_grpc_errors_and_the_broker_keeps_serving(stack: Stack) -> None:
    garbage = b"\x07not a protobuf"
    with pytest.raises(MalformedMessage):
        packets.decode_packet(garbage)
    oversized = packets.encode_packet(data_pkt(1, b"x" * (5 * MiB)))

    with stack.channel() as channel:
        code, details = raw_call(channel, [garbage])
        assert code is grpc.StatusCode.INTERNAL, details
        assert "unmarshal" in details

        code, details = raw_call(channel, [oversized])
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "larger than max" in details

        code, details = raw_call(channel, [b""], method="/ProxyService/Nope")
        assert code is grpc.StatusCode.UNIMPLEMENTED, details
        code, details = raw_call(channel, [b""], method="/kube.Other/Proxy")
        assert code is grpc.StatusCode.UNIMPLEMENTED, details

        code, details = raw_call(
            channel, [packets.encode_packet(dial_req("x:1", 1))], compression=grpc.Compression.Gzip
        )
        assert code is grpc.StatusCode.UNIMPLEMENTED, details

        # The same connection, and a fresh one, still serve a normal dial.
        with target(echo) as tgt:
            for ch in (channel, stack.channel(single_use=True)):
                with open_call(ch) as call:
                    cid = call.dial(tgt.address).connectID
                    call.send(data_pkt(cid, b"still here"))
                    pkt = call.recv()
                    assert pkt is not None and pkt.data.data == b"still here"
                    call.send(close_req(cid))
                    pkt = call.recv()
                    assert pkt is not None and pkt.type == pb.CLOSE_RSP
    metrics = stack.metrics()
    for reason in ("malformed", "too_large", "unknown_method", "grpc_encoding"):
        assert f'tether_bad_input_total{{reason="{reason}",source="grpc"}}' in metrics, reason
    assert stack.broker.proc.alive()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["fin", "rst"])
def test_target_closing_first_sends_close_rsp(stack: Stack, how: str) -> None:
    def closer(conn: socket.socket) -> None:
        if how == "fin":
            conn.sendall(b"bye")
        else:
            # Reset only once the dial is surely complete: a reset that beats
            # the agent's connect() is a failed dial, not a target closing.
            time.sleep(0.3)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    with target(closer) as tgt, stack.channel() as channel, open_call(channel) as call:
        cid = call.dial(tgt.address, random=11).connectID
        if how == "fin":
            pkt = call.recv()
            assert pkt is not None and pkt.type == pb.DATA and pkt.data.data == b"bye", pkt
        pkt = call.recv()
        assert pkt is not None and pkt.type == pb.CLOSE_RSP, pkt
        assert pkt.closeResponse.connectID == cid
        if how == "fin":
            assert pkt.closeResponse.error == ""
        else:
            assert "reset" in pkt.closeResponse.error, pkt.closeResponse.error
        assert call.recv() is None
        assert call.status()[0] is grpc.StatusCode.OK


@pytest.mark.timeout(30)
def test_second_dial_req_on_a_stream_is_refused(stack: Stack) -> None:
    with target(echo) as tgt, stack.channel() as channel, open_call(channel) as call:
        first = call.dial(tgt.address, random=1)
        assert first.error == ""
        second = call.dial(tgt.address, random=2)
        assert second.connectID == 0 and "one dial" in second.error
        # The first tunnel is untouched.
        call.send(data_pkt(first.connectID, b"ping"))
        pkt = call.recv()
        assert pkt is not None and pkt.data.data == b"ping"
        # DATA naming another connection ends the call, as in konnectivity.
        call.send(data_pkt(first.connectID + 1000, b"x"))
        errors = set()
        for _ in range(2):
            pkt = call.recv()
            assert pkt is not None and pkt.type == pb.CLOSE_RSP, pkt
            errors.add((pkt.closeResponse.connectID, pkt.closeResponse.error))
        assert errors == {
            (first.connectID, "mismatched connection IDs"),
            (first.connectID + 1000, "mismatched connection IDs"),
        }
        assert call.status()[0] is grpc.StatusCode.OK


@pytest.mark.timeout(30)
def test_client_half_close_closes_the_tunnel_cleanly(stack: Stack) -> None:
    received: queue.Queue[bytes] = queue.Queue()

    def sink(conn: socket.socket) -> None:
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        received.put(data)  # reached only through a clean EOF

    gauge = "konnectivity_network_proxy_server_grpc_connections"
    with target(sink) as tgt, stack.channel() as channel, open_call(channel) as call:
        cid = call.dial(tgt.address).connectID
        assert stack.metric(gauge, 'service_method="Proxy"') == 1  # an open call
        call.send(data_pkt(cid, b"last words"))
        call.half_close()
        assert received.get(timeout=10) == b"last words"
        assert call.recv() is None
        assert call.status()[0] is grpc.StatusCode.OK
    deadline = time.monotonic() + 10
    while stack.metric(gauge, 'service_method="Proxy"') != 0:
        assert time.monotonic() < deadline, "the ended call is still counted"
        time.sleep(0.05)


@pytest.mark.timeout(30)
def test_a_message_larger_than_the_stream_window_passes(stack: Stack) -> None:
    """A 3 MiB DATA packet: under the 4 MiB message limit, over the 1 MiB
    stream window, so its first bytes must be credited before it is whole."""
    payload = os.urandom(3 * MiB)
    with target(echo) as tgt, stack.channel() as channel, open_call(channel) as call:
        cid = call.dial(tgt.address).connectID
        call.send(data_pkt(cid, payload))
        got = bytearray()
        while len(got) < len(payload):
            pkt = call.recv()
            assert pkt is not None and pkt.type == pb.DATA, pkt
            got += pkt.data.data
        assert got == payload
        call.send(close_req(cid))
        pkt = call.recv()
        assert pkt is not None and pkt.type == pb.CLOSE_RSP


def _echo_256k_in_32k_packets(
    channel: grpc.Channel, address: str, i: int, barrier: threading.Barrier, wait: float
) -> str:
    """One Proxy call: dial the echo target, send 256 KiB as eight 32 KiB DATA
    packets from this thread while a second thread reads the replies; return
    "ok" or what went wrong."""
    payload = os.urandom(256 * 1024)
    requests: queue.Queue[Any] = queue.Queue()

    def iter_requests() -> Iterator[pb.Packet]:
        while (item := requests.get()) is not _END:
            yield item

    # The call deadline is far beyond what the test waits: a stalled call is
    # seen by the reader's timeout below, not by grpc.
    responses = proxy_service_stub()(channel).Proxy(iter_requests(), timeout=120)
    got: queue.Queue[Any] = queue.Queue()

    def read() -> None:
        try:
            for pkt in responses:
                got.put(pkt)
        except grpc.RpcError as exc:
            got.put(exc)
        got.put(_END)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + wait

    def next_packet() -> Any:
        return got.get(timeout=max(0.01, deadline - time.monotonic()))

    try:
        requests.put(dial_req(address, random=i))
        rsp = next_packet()
        if not isinstance(rsp, pb.Packet) or rsp.type != pb.DIAL_RSP or rsp.dialResponse.error:
            return f"dial: {rsp}"
        cid = rsp.dialResponse.connectID
        barrier.wait(timeout=wait)  # every call has its tunnel before any data moves
        for off in range(0, len(payload), 32 * 1024):
            requests.put(data_pkt(cid, payload[off : off + 32 * 1024]))
        h, n = hashlib.sha256(), 0
        while n < len(payload):
            try:
                pkt = next_packet()
            except queue.Empty:
                return f"stalled after {n} of {len(payload)} bytes"
            if not isinstance(pkt, pb.Packet) or pkt.type != pb.DATA:
                return f"unexpected {pkt!r}"[:200]
            h.update(pkt.data.data)
            n += len(pkt.data.data)
        if n != len(payload) or h.hexdigest() != hashlib.sha256(payload).hexdigest():
            return f"sha256 mismatch ({n} bytes)"
        requests.put(close_req(cid))
        pkt = next_packet()
        if not isinstance(pkt, pb.Packet) or pkt.type != pb.CLOSE_RSP:
            return f"no CLOSE_RSP: {pkt!r}"[:200]
        return "ok"
    except queue.Empty:
        return "timed out"
    finally:
        requests.put(_END)
        responses.cancel()


@pytest.mark.timeout(120)
def test_50_calls_echoing_256k_on_one_channel_do_not_stall(stack: Stack) -> None:
    """Issue 12 item 2: one grpcio channel (one HTTP/2 connection), 50
    concurrent Proxy calls, each echoing 256 KiB in 32 KiB DATA packets with
    its replies read by a second thread. Each call must get its bytes back
    (sha256) well within the time a healthy broker needs; a stalled call is
    reported, not waited out to its grpc deadline."""
    n = 50
    with (
        target(echo) as tgt,
        concurrent.futures.ThreadPoolExecutor(n) as pool,
        stack.channel(single_use=True) as channel,
    ):
        barrier = threading.Barrier(n)
        outcomes = list(
            pool.map(
                lambda i: _echo_256k_in_32k_packets(channel, tgt.address, i, barrier, 30),
                range(n),
            )
        )
    failed = [o for o in outcomes if o != "ok"]
    assert not failed, f"{len(failed)} of {n} calls failed: {sorted(set(failed))[:5]}"
