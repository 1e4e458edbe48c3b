"""A konnectivity-protocol agent for tests, written from the schema with grpcio.

It does what a stock konnectivity agent does on its ``/AgentService/Connect``
stream (protocol/agent.proto): sends ``agentid``/``agentidentifiers`` (and a
bearer token when given) as metadata, reads ``serverid``/``servercount``
from the response headers, answers DIAL_REQ by dialing the address and
replying DIAL_RSP with a connectID, relays DATA both ways, answers CLOSE_REQ
with CLOSE_RSP, sends CLOSE_RSP when its target closes, and drops a dial on
DIAL_CLS. Knobs let a test hold dials unanswered, send raw bytes, or stop
reading a target.

grpcio is blocking: the stream's reader is a thread, each target connection
has a reader thread too. Everything is closed by :meth:`KonnAgent.close`.
"""

from __future__ import annotations

import itertools
import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from protocol import konnectivity_pb2 as pb
from protocol.agent_port import KONNECTIVITY_CONNECT_PATH

_STOP = object()


def _raw(b: Any) -> bytes:
    return b if isinstance(b, bytes) else bytes(b.SerializeToString())


class KonnAgent:
    def __init__(
        self,
        port: int,
        agent_id: str,
        *,
        ca: Path,
        cert: Path | None = None,
        key: Path | None = None,
        token: str | None = None,
        identifiers: str = "",
        hold_dials: bool = False,
        extra_metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.agent_id = agent_id
        self.hold_dials = hold_dials
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes(),
            private_key=key.read_bytes() if key else None,
            certificate_chain=cert.read_bytes() if cert else None,
        )
        self.channel = grpc.secure_channel(
            f"127.0.0.1:{port}",
            creds,
            options=[
                ("grpc.ssl_target_name_override", "localhost"),
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        # Bounded, as a real agent's sends block on the stream's flow control:
        # a target that streams without end must not fill our memory.
        self._out: queue.Queue[object] = queue.Queue(maxsize=64)
        self._closed = threading.Event()
        md = [("agentid", agent_id)]
        if identifiers:
            md.append(("agentidentifiers", identifiers))
        if token:
            md.append(("authorization", f"Bearer {token}"))
        md.extend(extra_metadata)
        multi = self.channel.stream_stream(
            KONNECTIVITY_CONNECT_PATH, request_serializer=_raw, response_deserializer=lambda b: b
        )
        self.call = multi(self._requests(), metadata=md)
        self.received: queue.Queue[pb.Packet] = queue.Queue()
        self.held: queue.Queue[pb.Packet] = queue.Queue()  # DIAL_REQs not answered
        self.dial_closed: list[int] = []  # randoms of DIAL_CLS received
        self.close_reqs: list[int] = []
        self.conns: dict[int, socket.socket] = {}
        self.paused: set[int] = set()  # connectIDs whose target we stop reading
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.status: tuple[grpc.StatusCode, str] | None = None
        self.ended = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    # ------------------------------------------------------------ stream

    def _requests(self) -> Iterator[object]:
        while True:
            item = self._out.get()
            if item is _STOP:
                return
            yield item

    def send(self, pkt: pb.Packet | bytes) -> None:
        """Queue ``pkt`` for the stream, waiting while the queue is full (the
        stream's flow control), but never past :meth:`close`."""
        while not self._closed.is_set():
            try:
                self._out.put(pkt, timeout=0.1)
                return
            except queue.Full:
                continue

    def half_close(self) -> None:
        self.send(_STOP)

    def headers(self, timeout: float = 10) -> dict[str, str]:
        """The response headers (serverid, servercount)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            md = self.call.initial_metadata()  # blocks until they come or the call ends
            return {k: str(v) for k, v in md}
        raise AssertionError("no response headers")

    def _read(self) -> None:
        try:
            for raw in self.call:
                pkt = pb.Packet.FromString(raw)
                self.received.put(pkt)
                self._on_packet(pkt)
        except grpc.RpcError as exc:
            self.status = (exc.code(), exc.details() or "")
        else:
            self.status = (self.call.code(), self.call.details() or "")
        finally:
            self.ended.set()
            with self._lock:
                for s in self.conns.values():
                    s.close()
                self.conns.clear()

    def wait_status(self, timeout: float = 15) -> tuple[grpc.StatusCode, str]:
        assert self.ended.wait(timeout), "Connect call did not end"
        assert self.status is not None
        return self.status

    # ----------------------------------------------------------- packets

    def _on_packet(self, pkt: pb.Packet) -> None:
        if pkt.type == pb.DIAL_REQ:
            if self.hold_dials:
                self.held.put(pkt)
            else:
                threading.Thread(target=self.answer_dial, args=(pkt,), daemon=True).start()
        elif pkt.type == pb.DATA:
            with self._lock:
                s = self.conns.get(pkt.data.connectID)
            if s is not None:
                try:
                    s.sendall(pkt.data.data)
                except OSError:
                    pass
        elif pkt.type == pb.CLOSE_REQ:
            cid = pkt.closeRequest.connectID
            self.close_reqs.append(cid)
            with self._lock:
                s = self.conns.pop(cid, None)
            if s is not None:
                s.close()
                self.send(close_rsp(cid))
        elif pkt.type == pb.DIAL_CLS:
            self.dial_closed.append(pkt.closeDial.random)

    def answer_dial(self, pkt: pb.Packet) -> None:
        req = pkt.dialRequest
        host, _, port = req.address.rpartition(":")
        try:
            s = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
        except OSError as exc:
            self.send(
                pb.Packet(
                    type=pb.DIAL_RSP,
                    dialResponse=pb.DialResponse(random=req.random, error=str(exc)),
                )
            )
            return
        s.settimeout(None)
        cid = next(self._ids)
        with self._lock:
            self.conns[cid] = s
        self.send(
            pb.Packet(
                type=pb.DIAL_RSP, dialResponse=pb.DialResponse(random=req.random, connectID=cid)
            )
        )
        threading.Thread(target=self._pump, args=(cid, s), daemon=True).start()

    def _pump(self, cid: int, s: socket.socket) -> None:
        while True:
            while cid in self.paused:
                time.sleep(0.05)
            try:
                data = s.recv(64 * 1024)
            except OSError:
                data = b""
            if not data:
                with self._lock:
                    live = self.conns.pop(cid, None) is not None
                if live:
                    self.send(close_rsp(cid))
                return
            self.send(pb.Packet(type=pb.DATA, data=pb.Data(connectID=cid, data=data)))

    def close(self) -> None:
        """End the call and the channel. Never blocks on a full queue (a
        stalled stream): senders give up, and the request iterator is handed
        its end past whatever is still queued."""
        self._closed.set()
        self.call.cancel()
        while True:
            try:
                self._out.get_nowait()
            except queue.Empty:
                break
        self._out.put_nowait(_STOP)
        self.channel.close()
        with self._lock:
            for s in self.conns.values():
                s.close()
            self.conns.clear()


def close_rsp(cid: int, error: str = "") -> pb.Packet:
    return pb.Packet(type=pb.CLOSE_RSP, closeResponse=pb.CloseResponse(connectID=cid, error=error))


def data(cid: int, payload: bytes) -> pb.Packet:
    return pb.Packet(type=pb.DATA, data=pb.Data(connectID=cid, data=payload))
