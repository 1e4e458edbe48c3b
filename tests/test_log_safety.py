"""Logs cannot be forged or flooded (issue 11, item 7 / row 9).

Unit tests of the escaping formatters and the sans-IO log limiter, then
hostile tests through the real broker: a ``dial_fail`` text with newlines
from a malicious agent, and TLS garbage from one address in a loop.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import pytest
import trio
from hostile import (
    DATA,
    END_HEADERS,
    HEADERS,
    PREFACE,
    FrameReader,
    RawPeer,
    bad_input,
    dial_id_from,
    frame,
    header_block,
    metric,
    open_peer,
    request_headers,
    settings_frame,
    tls_to_agent_port,
    tunnel_roundtrip,
    wait_log,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from procs import BrokerHandle, Proc, Tunnel, connect_tunnel, serve_echo

from protocol import messages, session
from protocol.codes import DialFailCode
from tether.netio import logs

HOSTILE_CHARS = "\n\r\x00\x1b\x7f\x85\u2028\u2029\u202e\u200b\ufeff\ud800\t"


def record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom\nFORGED 2026-01-01 00:00:00,000 ERROR tether: fake")
        except ValueError:
            import sys

            info = sys.exc_info()
    rec = logging.LogRecord("tether.test", logging.WARNING, __file__, 1, msg, args, info)
    rec.__dict__.update(extra)
    return rec


def _one_line(line: str) -> None:
    assert len(line.splitlines()) == 1, line
    assert not any(c in line for c in HOSTILE_CHARS), ascii(line)


# ------------------------------------------------------------------ escaping


@pytest.mark.timeout(10)
def test_text_format_escapes_controls_in_message_args_and_traceback() -> None:
    fmt = logs.TextFormatter()
    line = fmt.format(
        record(
            "dial %s failed: %s",
            "evil\r\nhost",
            "no\nFORGED 2026-01-01 WARNING tether.broker: fake\x1b[2J\u2028\x85",
            exc=True,
            **logs.event("dial_failed", code="refused"),
        )
    )
    _one_line(line)
    assert "evil\\r\\nhost" in line
    assert "no\\nFORGED" in line and "\\x1b[2J" in line and "\\u2028" in line and "\\x85" in line
    assert "Traceback" in line and "boom\\nFORGED" in line
    assert "event=dial_failed" in line


@pytest.mark.timeout(10)
def test_json_format_escapes_what_json_leaves_raw() -> None:
    msg = "x\n\x1b\x7f\x85\u2028\u2029\u202e\ud800y"
    line = logs.JsonFormatter().format(record("%s", msg, exc=True, error=msg))
    _one_line(line)
    out = json.loads(line)
    assert out["msg"] == msg and out["error"] == msg  # the same text, escaped on the wire
    assert "boom\nFORGED" in out["exc"]


@given(st.text(max_size=60))
@settings(max_examples=300)
@pytest.mark.timeout(30)
def test_any_text_is_one_line_in_both_formats(text: str) -> None:
    rec = record("m %s", text, field=text)
    _one_line(logs.TextFormatter().format(rec))
    line = logs.JsonFormatter().format(rec)
    _one_line(line)
    assert json.loads(line)["msg"] == f"m {text}"


@pytest.mark.timeout(10)
def test_plain_text_is_unchanged() -> None:
    text = "agent edge-01 connected from 10.0.0.1:5000 (é, ü, 中文)"
    assert logs.escape_controls(text) is text


# ------------------------------------------------------------------ limiter


@pytest.mark.timeout(10)
def test_limiter_admits_a_budget_per_source_then_counts() -> None:
    lim = logs.LogLimiter(per_source=3, interval=10.0, per_event=100)
    got = [lim.admit("tls", "10.0.0.1", 0.1 * i) for i in range(20)]
    assert [ok for ok, _ in got] == [True] * 3 + [False] * 17
    assert all(ended is None for _, ended in got)
    # Another source has its own budget.
    assert lim.admit("tls", "10.0.0.2", 2.0) == (True, None)
    # Nothing is reported before the window ends ...
    assert lim.expired(9.9) == []
    # ... then one summary for the noisy source only.
    (summary,) = lim.expired(10.5)
    assert (summary.event, summary.source, summary.count) == ("tls", "10.0.0.1", 17)
    assert summary.message() == "suppressed 17 similar messages from 10.0.0.1 in the last 10s (tls)"
    assert len(lim) == 1  # 10.0.0.2's window is still open


@pytest.mark.timeout(10)
def test_limiter_reports_on_the_next_line_of_the_same_key() -> None:
    lim = logs.LogLimiter(per_source=1, interval=5.0)
    assert lim.admit("e", "s", 0.0) == (True, None)
    assert lim.admit("e", "s", 1.0) == (False, None)
    ok, ended = lim.admit("e", "s", 6.0)
    assert ok and ended is not None and ended.count == 1 and ended.seconds == 6.0


@pytest.mark.timeout(10)
def test_limiter_caps_each_event_across_sources_and_bounds_its_table() -> None:
    lim = logs.LogLimiter(per_source=10, interval=10.0, per_event=25, max_keys=50)
    written = sum(lim.admit("tls", f"10.0.{i // 256}.{i % 256}", 0.0)[0] for i in range(5000))
    assert written == 25
    assert len(lim) <= 51  # max_keys plus the shared OTHER_SOURCES key
    summaries = lim.expired(11.0)
    assert sum(s.count for s in summaries) == 5000 - 25
    assert any(s.source == logs.OTHER_SOURCES for s in summaries)
    assert len(lim) == 0


@pytest.mark.timeout(10)
def test_limited_writes_the_summary_line(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("tether.test.limited")
    source = f"192.0.2.{time.monotonic_ns() % 200}"
    with caplog.at_level(logging.INFO):
        results = [
            logs.limited(log, logging.WARNING, source, "garbage from %s", source, key="t-garbage")
            for _ in range(logs.PER_SOURCE + 5)
        ]
        assert results.count(True) == logs.PER_SOURCE
        for summary in logs.LIMITER.expired(time.monotonic() + logs.INTERVAL + 1):
            logs._report(summary)
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count(f"garbage from {source}") == logs.PER_SOURCE
    assert f"suppressed 5 similar messages from {source} in the last" in "\n".join(lines)


# ------------------------------------------------------- through the broker


def _lines_with(log_text: str, needle: str) -> list[str]:
    return [line for line in log_text.splitlines() if needle in line]


@pytest.mark.timeout(60)
async def test_hostile_agent_dial_fail_text_cannot_forge_broker_log_lines(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    """Row 9: a malicious agent answers a dial with a ``dial_fail`` whose
    text holds newlines and terminal escapes. The broker's log gets exactly
    one line for it (escaped), the client a one-line 502, the failure is
    counted, and a normal tunnel through a real agent still works."""
    broker = broker_factory(
        "--proxy-strategies=destHost,default",
        "--agent-allowed-identifiers=agent-1:ipv4=127.0.0.1,agent-2:host=evil.example",
    )
    good = agent_factory(broker, "--agent-identifiers=ipv4=127.0.0.1", agent_id="agent-1")
    await broker.ready(agents=1)
    echo = await serve_echo(nursery)
    forged = "FORGED 2026-01-01 00:00:00,000 WARNING tether.broker: agent root logged in"
    peer: RawPeer = await open_peer(broker, agent_id="agent-2", identifiers="host=evil.example")
    await broker.ready(agents=2)
    before = metric(
        await broker.metrics(),
        "konnectivity_network_proxy_server_dial_failure_count_total",
        reason="refused",
    )
    results: list[Tunnel] = []

    async def client() -> None:
        with trio.fail_after(15):
            results.append(await connect_tunnel(broker, "evil.example:443", via="uds"))

    nursery.start_soon(client)  # destHost routing: the hostile agent gets it
    dial = await peer.wait_message(messages.Dial, timeout=10)
    assert dial is not None, "the hostile agent got no dial"
    text = f"refused\n{forged}\r\n{forged}\x1b[2J\u2028{forged}"
    reply = messages.DialFail(id=dial_id_from(dial), code=DialFailCode.REFUSED, msg=text)
    await peer.send(frame(DATA, 0, 1, messages.encode(reply)))
    with trio.fail_after(15):
        while not results:
            await trio.sleep(0.05)
    tunnel = results[0]
    assert tunnel.status == 502
    assert tunnel.body.count(b"\n") == 1 and tunnel.body.endswith(b"\n"), tunnel.body
    await tunnel.aclose()
    assert await wait_log(broker, "agent root logged in")
    await trio.sleep(0.3)
    log_text = broker.proc.log()
    lines = _lines_with(log_text, "agent root logged in")
    assert len(lines) == 1, lines  # one record, one line: nothing forged
    assert "\\nFORGED" in lines[0] and "\\x1b[2J" in lines[0] and "\\u2028" in lines[0]
    assert not any(line.startswith("FORGED") for line in log_text.splitlines())
    after = metric(
        await broker.metrics(),
        "konnectivity_network_proxy_server_dial_failure_count_total",
        reason="refused",
    )
    assert after >= before + 1
    await peer.aclose()
    await tunnel_roundtrip(broker, echo, via="uds")
    assert good.alive() and broker.proc.alive()


@pytest.mark.timeout(90)
async def test_tls_garbage_flood_from_one_address_is_rate_limited_in_the_log(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    """Row 9: 2,000 connections from one address send TLS garbage to the
    agent port and the TCP frontend. Every one is counted in the metric; the
    log holds a bounded number of WARNING lines per port and a ``suppressed``
    line with the count; a normal tunnel works throughout."""
    broker = broker_factory()
    agent_factory(broker)
    await broker.ready(agents=1)
    n = 1000
    before_agent = await bad_input(broker, "agent", "tls_handshake")
    before_fe = await bad_input(broker, "frontend", "tls")
    garbage = b"\x16\x03\x01\x00\x05hello" + b"\x00" * 64
    started = time.monotonic()

    async def hit(port: int, count: int) -> None:
        for _ in range(count):
            try:
                tcp = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.9")
            except OSError:
                continue
            try:
                await tcp.send_all(garbage)
                with trio.move_on_after(2):
                    await tcp.receive_some(1024)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await trio.aclose_forcefully(tcp)

    echo = await serve_echo(nursery)
    async with trio.open_nursery() as attack:
        for _ in range(8):
            attack.start_soon(hit, broker.agent_port, n // 8)
            attack.start_soon(hit, broker.server_port, n // 8)
    elapsed = time.monotonic() - started
    await tunnel_roundtrip(broker, echo, via="uds")
    # Every attempt is counted, though few are logged.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        got_agent = await bad_input(broker, "agent", "tls_handshake") - before_agent
        got_fe = await bad_input(broker, "frontend", "tls") - before_fe
        if got_agent >= n and got_fe >= n:
            break
        await trio.sleep(0.1)
    assert got_agent >= n and got_fe >= n, (got_agent, got_fe)
    # Windows end within INTERVAL; the reporter then writes their summaries,
    # which with the lines written account for every attempt.
    deadline = time.monotonic() + logs.INTERVAL + 5
    while True:
        log_text = broker.proc.log()
        warnings = [
            line
            for line in log_text.splitlines()
            if " WARNING " in line and "127.0.0.9" in line and "TLS handshake" in line
        ]
        summaries = _lines_with(log_text, "similar messages from 127.0.0.9")
        suppressed = sum(int(line.split("suppressed ", 1)[1].split()[0]) for line in summaries)
        if suppressed + len(warnings) >= got_agent + got_fe or time.monotonic() > deadline:
            break
        await trio.sleep(0.2)
    agent_lines = [line for line in warnings if "agent connection" in line]
    fe_lines = [line for line in warnings if "frontend TLS handshake" in line]
    windows = int(elapsed // logs.INTERVAL) + 1
    print(
        f"{2 * n} garbage connections in {elapsed:.1f}s: {len(warnings)} WARNING lines, "
        f"{len(summaries)} summaries for {suppressed} suppressed"
    )
    assert summaries, log_text[-3000:]
    assert all("event=log_suppressed" in line for line in summaries)
    assert 0 < len(agent_lines) <= windows * logs.PER_SOURCE, len(agent_lines)
    assert 0 < len(fe_lines) <= windows * logs.PER_SOURCE, len(fe_lines)
    assert len(warnings) <= 2 * windows * logs.PER_SOURCE
    assert suppressed + len(warnings) == got_agent + got_fe, (suppressed, len(warnings))
    await tunnel_roundtrip(broker, echo, via="uds")


@pytest.mark.timeout(90)
async def test_rejected_credentials_in_a_loop_are_rate_limited_in_the_log(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    """One address presents agent-2's certificate as agent-1 (403) 40 times
    in a row: every rejection is counted, the log keeps at most PER_SOURCE
    ``auth_rejected`` lines for that address in the window and then a
    ``log_suppressed`` line, and a real agent keeps serving."""
    broker = broker_factory()
    agent_factory(broker)
    await broker.ready(agents=1)
    echo = await serve_echo(nursery)
    n = 40
    reason = "identity_mismatch"
    before = metric(
        await broker.metrics(), "tether_agent_connections_rejected_total", reason=reason
    )
    headers = request_headers(
        session.CONTROL_PATH,
        [("tether-agent-id", "agent-1"), ("tether-agent-identifiers", "")],
    )
    for _ in range(n):
        with trio.fail_after(10):
            stream = await tls_to_agent_port(broker, "agent-2", source="127.0.0.9")
            await stream.send_all(
                PREFACE + settings_frame({}) + frame(HEADERS, END_HEADERS, 1, header_block(headers))
            )
            reader, status = FrameReader(), None
            while status is None:
                data = await stream.receive_some(65536)
                assert data, "closed before the control stream's answer"
                for f in reader.feed(bytes(data)):
                    if f.kind == HEADERS and f.sid == 1:
                        status = f.status
            assert status == "403", status
            await trio.aclose_forcefully(stream)
    after = metric(await broker.metrics(), "tether_agent_connections_rejected_total", reason=reason)
    assert after - before == n
    assert await wait_log(broker, "similar messages from 127.0.0.9", timeout=logs.INTERVAL + 5)
    log_text = broker.proc.log()
    lines = [
        line
        for line in log_text.splitlines()
        if "rejected (403)" in line and "from 127.0.0.9:" in line
    ]
    assert 0 < len(lines) <= 2 * logs.PER_SOURCE, len(lines)
    summaries = _lines_with(log_text, "similar messages from 127.0.0.9")
    assert sum(int(s.split("suppressed ", 1)[1].split()[0]) for s in summaries) == n - len(lines)
    await tunnel_roundtrip(broker, echo, via="uds")
