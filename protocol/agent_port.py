"""Which protocol an agent-port connection speaks, from its first request (sans-IO).

The agent port serves two kinds of agent on one TLS listener and one HTTP/2
engine (:class:`protocol.h2base.H2Base`): Tether's own (the control stream
``/tether.v1/connect``, :mod:`protocol.session`) and konnectivity's (the
``/AgentService/Connect`` bidirectional gRPC stream,
:mod:`protocol.grpc_server`). The request path tells them apart, and the
first request arrives before anything else could.

:class:`FirstRequest` watches the client's bytes *ahead of* h2: the
connection preface, then frames, until the first HEADERS frame (with its
CONTINUATIONs) is complete. Its header block is the first of the connection,
so a fresh HPACK decoder reads it exactly as h2 will. Nothing is fed to h2
meanwhile: the caller builds the engine for the kind found around its
already-initiated :class:`~protocol.h2base.H2Base` and feeds it every byte
seen here, so no event is replayed or lost.

Bounded: at most :data:`MAX_SNIFF` bytes are held; a frame bigger than the
peer may send before our SETTINGS, an undecodable header block or too many
bytes without a request decide :attr:`Kind.TETHER`, whose session then
refuses the connection with the usual protocol error.
"""

from __future__ import annotations

import enum

import hpack

from protocol import handshake

#: The client connection preface.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: Most bytes held before a decision (the preface, SETTINGS, a WINDOW_UPDATE
#: and a HEADERS frame take a few hundred).
MAX_SNIFF = 64 * 1024
#: A peer may send frames of at most 16 KiB until it has seen our SETTINGS.
_MAX_EARLY_FRAME = 16 * 1024

_HEADERS = 0x1
_CONTINUATION = 0x9
_END_HEADERS = 0x4
_PADDED = 0x8
_PRIORITY = 0x20


def method_path(service: str, method: str) -> str:
    """A method's gRPC path as the schema (protocol/agent.proto) names it."""
    from protocol import agent_pb2

    desc = agent_pb2.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    return "/" + desc.full_name.rpartition(".")[0] + "/" + desc.name


#: konnectivity's agent stream: ``method_path("AgentService", "Connect")``,
#: written out so that telling the kinds apart does not import protobuf (a
#: broker without konnectivity agents never does; issue 16). A test checks
#: it against the schema.
KONNECTIVITY_CONNECT_PATH = "/AgentService/Connect"

# The konnectivity agent's request metadata (proto/header/header.go upstream;
# gRPC metadata keys travel lower-case).
KONN_AGENT_ID = "agentid"
KONN_AGENT_IDENTIFIERS = "agentidentifiers"
# What the server answers in its response headers (grpc SendHeader).
KONN_SERVER_ID = "serverid"
KONN_SERVER_COUNT = "servercount"


class Kind(enum.Enum):
    TETHER = "tether"
    KONNECTIVITY = "konnectivity"


class FirstRequest:
    """Feed the client's bytes until :meth:`feed` returns a :class:`Kind`."""

    def __init__(self, max_bytes: int = MAX_SNIFF) -> None:
        self.max_bytes = max_bytes
        #: Every byte fed so far, to be handed to the chosen engine.
        self.buffer = bytearray()
        #: The first request's ``:path`` once decided (None: not found).
        self.path: str | None = None
        #: Why the decision fell back to Tether without a path (diagnostics).
        self.fallback = ""
        # Scanning resumes where it stopped: each byte is looked at once.
        self._pos = 0  # next frame header (after the preface)
        self._block = bytearray()  # header block so far
        self._in_headers = False
        #: Frame headers looked at so far (the tests count work with it).
        self.work = 0

    def feed(self, data: bytes) -> Kind | None:
        """Add received bytes; the kind once known, None while undecided."""
        self.buffer += data
        kind = self._scan()
        if kind is None and len(self.buffer) > self.max_bytes:
            self.fallback = "no request within the sniff limit"
            return Kind.TETHER
        return kind

    def _fallback(self, why: str) -> Kind:
        self.fallback = why
        return Kind.TETHER

    def _scan(self) -> Kind | None:
        buf = self.buffer
        if self._pos == 0:
            head = bytes(buf[: len(PREFACE)])
            if not PREFACE.startswith(head[: len(PREFACE)]):
                return self._fallback("no HTTP/2 preface")
            if len(head) < len(PREFACE):
                return None
            self._pos = len(PREFACE)
        while True:
            pos = self._pos
            if len(buf) - pos < 9:
                return None
            self.work += 1
            length = int.from_bytes(buf[pos : pos + 3], "big")
            ftype, flags = buf[pos + 3], buf[pos + 4]
            if length > _MAX_EARLY_FRAME:
                return self._fallback("oversized frame before SETTINGS")
            if len(buf) - pos - 9 < length:
                return None
            self._pos = pos + 9 + length
            if self._in_headers:
                if ftype != _CONTINUATION:
                    return self._fallback("HEADERS without CONTINUATION")
                self._block += buf[pos + 9 : pos + 9 + length]
            elif ftype == _HEADERS:
                payload = bytes(buf[pos + 9 : pos + 9 + length])
                start, end = 0, len(payload)
                if flags & _PADDED:
                    if not payload:
                        return self._fallback("bad padding")
                    start, end = 1, len(payload) - payload[0]
                if flags & _PRIORITY:
                    start += 5
                if end < start:
                    return self._fallback("bad padding")
                self._block += payload[start:end]
                self._in_headers = True
            else:
                continue  # SETTINGS, WINDOW_UPDATE, PING, ...: h2 takes them later
            if flags & _END_HEADERS:
                return self._decide(bytes(self._block))

    def _decide(self, block: bytes) -> Kind:
        decoder = hpack.Decoder()
        decoder.max_header_list_size = 16 * 1024
        try:
            headers = decoder.decode(block, raw=True)
        except Exception:  # hpack raises several kinds; h2 will refuse it too
            return self._fallback("undecodable header block")
        for name, value in headers:
            if name == b":path":
                self.path = value.decode("utf-8", "replace")
                break
        if self.path == KONNECTIVITY_CONNECT_PATH:
            return Kind.KONNECTIVITY
        if self.path != handshake.CONTROL_PATH and self.path is None:
            self.fallback = "no :path"
        return Kind.TETHER
