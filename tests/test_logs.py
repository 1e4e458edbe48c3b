"""Structured logs: the event vocabulary, JSON fields, and no secrets.

The end-to-end test runs a broker and agents with token authentication at
debug level, drives every kind of event, and then searches all output for
the tokens and for private-key material.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from procs import BrokerHandle, Proc, connect_tunnel, serve_echo, wait_for

from edge_agent.app import cause_of_close
from protocol.outcomes import CloseReason
from tether.netio import logs
from tether.tools.launch import BIN

ROOT = Path(__file__).resolve().parent.parent
GOOD_TOKEN = "tok-good-8d1c77f0e5a2b9"
WRONG_TOKEN = "tok-wrong-52a9e0c3d4b6f1"


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("tether.test", logging.INFO, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


# ----------------------------------------------------------------- formatters


@pytest.mark.timeout(5)
def test_json_lines_carry_event_fields() -> None:
    line = logs.JsonFormatter().format(
        record("agent %s up", "a1", **logs.event("agent_connected", agent_id="a1", attempt=3))
    )
    out = json.loads(line)
    assert out["msg"] == "agent a1 up"
    assert out["event"] == "agent_connected"
    assert out["agent_id"] == "a1" and out["attempt"] == 3
    assert {"ts", "level", "logger"} <= set(out)


@pytest.mark.timeout(5)
def test_text_lines_end_with_the_event() -> None:
    fmt = logs.TextFormatter()
    assert fmt.format(record("hello", **logs.event("drain"))).endswith("hello  event=drain")
    assert "event=" not in fmt.format(record("plain"))


@pytest.mark.timeout(5)
def test_unknown_event_names_are_refused() -> None:
    with pytest.raises(AssertionError):
        logs.event("agent_conected")


@pytest.mark.timeout(5)
@pytest.mark.parametrize("fmt", [logs.JsonFormatter(), logs.TextFormatter()])
def test_tokens_and_keys_are_redacted_anyway(fmt: logging.Formatter) -> None:
    key = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIB\n-----END EC PRIVATE KEY-----"
    line = fmt.format(
        record("headers %r key %s", {"authorization": f"Bearer {GOOD_TOKEN}"}, key, error=key)
    )
    assert GOOD_TOKEN not in line
    assert "PRIVATE KEY" not in line and "MHcCAQEEIB" not in line
    # Prose about tokens is not mangled.
    assert "no bearer token" in fmt.format(record("no client certificate and no bearer token"))


@pytest.mark.timeout(5)
def test_every_event_is_documented() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    missing = [name for name in sorted(logs.EVENTS) if f"`{name}`" not in doc]
    assert not missing, f"events not documented in docs/operations.md: {missing}"


@pytest.mark.timeout(5)
@pytest.mark.parametrize(
    ("reason", "label"),
    [
        (CloseReason.KEEPALIVE_TIMEOUT, "keepalive_timeout"),
        (CloseReason.PROTOCOL_ERROR, "protocol_error"),
        (CloseReason.FLOOD, "protocol_error"),
        (CloseReason.CONTROL_UNUSABLE, "protocol_error"),
        (CloseReason.PEER_CLOSED, "broker_closed"),
        (CloseReason.GOAWAY, "broker_closed"),
        (CloseReason.CONTROL_CLOSED, "broker_closed"),
        (CloseReason.TRANSPORT_ERROR, "transport_error"),
        (CloseReason.ABORTED, "other"),
        (None, "other"),
    ],
)
def test_tunnel_close_reasons_have_bounded_labels(reason: CloseReason | None, label: str) -> None:
    """The agent's own causes are typed where they arise (protocol/reconnect.py);
    a tunnel's close reason is mapped in one place."""
    assert cause_of_close(reason).value == label


# ------------------------------------------------------------ the real commands


def json_events(proc: Proc) -> list[dict[str, Any]]:
    events = []
    for line in proc.log().splitlines():
        out = json.loads(line)  # every line is one JSON object
        if "event" in out:
            events.append(out)
    return events


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


@pytest.mark.timeout(40)
async def test_event_vocabulary_and_no_secrets_in_any_output(
    tmp_path: Path,
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    digest = hashlib.sha256(GOOD_TOKEN.encode()).hexdigest()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"sha256:{digest} default edge-* max=4\n")
    good_file, wrong_file = tmp_path / "good", tmp_path / "wrong"
    good_file.write_text(GOOD_TOKEN + "\n")
    wrong_file.write_text(WRONG_TOKEN + "\n")
    as_json = "--log-format=json"

    broker = broker_factory(f"--agent-token-file={tokens}", as_json)
    await broker.up()
    good = agent_factory(
        broker,
        f"--service-account-token-path={good_file}",
        as_json,
        agent_id="edge-1",
        client_cert=False,
    )
    await broker.ready(agents=1)
    wrong = agent_factory(
        broker,
        f"--service-account-token-path={wrong_file}",
        as_json,
        agent_id="edge-2",
        client_cert=False,
    )

    # Dials: one that works (with bytes), one that is refused.
    echo = await serve_echo(nursery)
    tunnel = await connect_tunnel(broker, f"127.0.0.1:{echo}")
    assert tunnel.status == 200
    await tunnel.send_all(b"ping")
    assert await tunnel.receive_some() == b"ping"
    await tunnel.aclose()
    refused = await connect_tunnel(broker, "127.0.0.1:1")
    assert refused.status == 502
    await refused.aclose()

    # Certificates reloaded (reads every key file again, at debug level).
    broker.proc.signal(signal.SIGHUP)
    good.signal(signal.SIGHUP)

    async def reloaded_and_rejected() -> bool:
        return (
            '"cert_reloaded"' in broker.proc.log()
            and '"cert_reloaded"' in good.log()
            and '"reconnect"' in wrong.log()
        )

    await wait_for(reloaded_and_rejected, 15, "reloads and a rejected agent's reconnect")
    assert good.stop(timeout=10) == 0  # drain, stopped

    async def disconnected() -> bool:
        return '"agent_disconnected"' in broker.proc.log()

    await wait_for(disconnected, 10, "agent_disconnected on the broker")
    wrong.stop(timeout=10)
    assert broker.proc.stop(timeout=10) == 0

    printed = subprocess.run(
        [str(BIN / "tether-agent"), f"--service-account-token-path={good_file}", "--print-config"],
        capture_output=True,
        text=True,
        timeout=20,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert printed.returncode == 2  # no --ca-cert: a config check, printed anyway
    everything = "\n".join(
        [broker.proc.log(), good.log(), wrong.log(), printed.stdout, printed.stderr]
    )
    for secret in (GOOD_TOKEN, WRONG_TOKEN, "PRIVATE KEY", "-----BEGIN"):
        assert secret not in everything, f"{secret!r} leaked into the output"

    b, g, w = json_events(broker.proc), json_events(good), json_events(wrong)
    seen = {e["event"] for e in b + g + w}
    assert seen <= logs.EVENTS
    expected = {
        "started",
        "stopped",
        "agent_connected",
        "agent_disconnected",
        "auth_rejected",
        "dial_ok",
        "dial_failed",
        "drain",
        "reconnect",
        "cert_reloaded",
    }
    assert expected <= seen, expected - seen

    (connected,) = [e for e in named(b, "agent_connected") if e["agent_id"] == "edge-1"]
    assert connected["cluster"] == "default" and connected["auth"] == "token"
    assert any(e["status"] == 401 and e["reason"] == "bad_token" for e in named(b, "auth_rejected"))
    assert named(w, "auth_rejected")[0]["status"] == 401
    reconnect = named(w, "reconnect")[0]
    assert reconnect["cause"] == "rejected" and reconnect["delay_s"] >= 0
    assert {"attempt", "ceiling_s", "reason"} <= set(reconnect)
    assert any(e["code"] == "refused" for e in named(b, "dial_failed"))
    assert any(e["code"] == "refused" for e in named(g, "dial_failed"))
    assert any(e["addr"] == f"127.0.0.1:{echo}" for e in named(g, "dial_ok"))
    assert named(g, "cert_reloaded")[0]["trigger"] == "SIGHUP"
    assert {e["cert"] for e in named(b, "cert_reloaded")} == {"cluster", "server"}
    assert named(g, "drain")[0]["initiator"] == "SIGTERM"
    (gone,) = [e for e in named(b, "agent_disconnected") if e["agent_id"] == "edge-1"]
    assert gone["cause"] in {"peer_closed", "shutdown"}


@pytest.mark.timeout(5)
def test_setup_logging_levels_keep_h2_quiet() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup_logging("json", "debug")
        stream = io.StringIO()
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        logging.getLogger("hpack").debug("authorization: Bearer %s", GOOD_TOKEN)
        logging.getLogger("tether.x").debug("visible", extra=logs.event("dial_ok"))
        assert GOOD_TOKEN not in stream.getvalue()
        assert json.loads(stream.getvalue())["event"] == "dial_ok"
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
