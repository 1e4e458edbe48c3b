"""The broker's refusal reason travels as a header token beside the body
text (docs/protocol.md, 2. The control stream), through the real broker."""

from __future__ import annotations

from collections.abc import Callable

import msgpack
import pytest
import trio
from hostile import (
    DATA,
    END_HEADERS,
    HEADERS,
    PREFACE,
    FrameReader,
    frame,
    header_block,
    request_headers,
    settings_frame,
)
from procs import BrokerHandle

from protocol import handshake
from tether.netio import tls

pytestmark = [pytest.mark.e2e]


async def _refusal(broker: BrokerHandle, hello: list[tuple[str, str]]) -> tuple[str, str, str]:
    """Open the control stream as agent-1 (its certificate) with ``hello``:
    the answer's status, refusal header and body text."""
    cert, key = broker.pki.agent("agent-1")
    ctx = tls.client_context(broker.pki.ca_cert, cert, key, alpn=["h2"])
    with trio.fail_after(20):
        tcp = await trio.open_tcp_stream("127.0.0.1", broker.agent_port)
        stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
        try:
            await stream.do_handshake()
            headers = request_headers(handshake.CONTROL_PATH, hello)
            await stream.send_all(
                PREFACE + settings_frame() + frame(HEADERS, END_HEADERS, 1, header_block(headers))
            )
            reader = FrameReader()
            status = token = ""
            while data := await stream.receive_some(65536):
                for f in reader.feed(bytes(data)):
                    if f.kind == HEADERS and f.sid == 1:
                        status = f.status or ""
                        token = dict(f.headers or []).get(handshake.REFUSAL, "")
                    elif f.kind == DATA and f.sid == 1 and f.payload:
                        return status, token, msgpack.unpackb(f.payload)["error"]
            return status, token, ""
        finally:
            await trio.aclose_forcefully(stream)


@pytest.mark.timeout(60)
async def test_refusals_carry_their_token(broker_factory: Callable[..., BrokerHandle]) -> None:
    broker = broker_factory("--server-id=b-7")
    await broker.up()
    # A replica the agent already holds: 409 duplicate.
    got = await _refusal(
        broker, [(handshake.AGENT_ID, "agent-1"), (handshake.CONNECTED_SERVERS, "b-1,b-7")]
    )
    assert got[:2] == ("409", "duplicate"), got
    assert got[2].startswith("duplicate: agent already holds a connection to server b-7")
    # An id the certificate does not name: 403 with the auth reason.
    got = await _refusal(broker, [(handshake.AGENT_ID, "-bad")])
    assert got[:2] == ("403", "bad_agent_id"), got
    assert got[2].startswith("bad_agent_id: ")
    # Identifiers that do not parse: 403 bad_identifiers.
    got = await _refusal(
        broker, [(handshake.AGENT_ID, "agent-1"), (handshake.AGENT_IDENTIFIERS, "color=red")]
    )
    assert got[:2] == ("403", "bad_identifiers"), got
