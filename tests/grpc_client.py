"""A konnectivity-client stand-in built on grpcio, shared by the gRPC tests.

One :class:`Call` is one Proxy stream driven from threads, as
konnectivity-client drives it for kube-apiserver.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
from grpc_stubs import proxy_service_stub

from protocol import konnectivity_pb2 as pb
from protocol import packets

_END = object()


def dial_req(address: str, random: int) -> pb.Packet:
    return pb.Packet(
        type=pb.DIAL_REQ,
        dialRequest=pb.DialRequest(protocol="tcp", address=address, random=random),
    )


def data_pkt(connect_id: int, data: bytes) -> pb.Packet:
    return packets.data_packet(connect_id, data)


def close_req(connect_id: int) -> pb.Packet:
    return pb.Packet(type=pb.CLOSE_REQ, closeRequest=pb.CloseRequest(connectID=connect_id))


def dial_cls(random: int) -> pb.Packet:
    return pb.Packet(type=pb.DIAL_CLS, closeDial=pb.CloseDial(random=random))


class Call:
    """One Proxy call driven from threads, like konnectivity-client's tunnel.

    Requests come from a queue (its end is the client's half-close);
    responses are read by a thread into a queue, up to ``read_limit``
    messages: a client that stops reading simply stops asking for more.
    """

    def __init__(
        self, channel: grpc.Channel, *, read_limit: int | None = None, queue_size: int = 0
    ) -> None:
        self._requests: queue.Queue[Any] = queue.Queue(queue_size)
        self.responses: queue.Queue[Any] = queue.Queue()
        self.call: Any = proxy_service_stub()(channel).Proxy(self._iter())
        self._read_limit = read_limit
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _iter(self) -> Iterator[pb.Packet]:
        while (item := self._requests.get()) is not _END:
            yield item

    def _read(self) -> None:
        try:
            for n, pkt in enumerate(self.call, 1):
                self.responses.put(pkt)
                if self._read_limit is not None and n >= self._read_limit:
                    return
        except grpc.RpcError:
            pass
        self.responses.put(_END)

    def send(self, pkt: pb.Packet) -> None:
        self._requests.put(pkt, timeout=30)

    def half_close(self) -> None:
        self._requests.put(_END)

    def recv(self, timeout: float = 10) -> pb.Packet | None:
        item = self.responses.get(timeout=timeout)
        return None if item is _END else item

    def dial(self, address: str, random: int = 1, timeout: float = 10) -> pb.DialResponse:
        self.send(dial_req(address, random))
        pkt = self.recv(timeout)
        assert pkt is not None and pkt.type == pb.DIAL_RSP, pkt
        assert pkt.dialResponse.random == random
        return pkt.dialResponse

    def status(self, timeout: float = 10) -> tuple[grpc.StatusCode, str]:
        """The call's final status (waits for it)."""
        deadline = time.monotonic() + timeout
        while self.call.running():
            if time.monotonic() > deadline:
                raise AssertionError("call did not end")
            time.sleep(0.01)
        return self.call.code(), self.call.details()

    def finish(self) -> None:
        self.half_close()
        self.call.cancel()


@contextlib.contextmanager
def open_call(channel: grpc.Channel, **kwargs: Any) -> Iterator[Call]:
    call = Call(channel, **kwargs)
    try:
        yield call
    finally:
        call.finish()
