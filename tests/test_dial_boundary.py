"""The agent's dial task: no exception from one dial can end the agent.

In-process, with faults injected where the resolver and the dial path can
raise: the dialer maps every error to a ``DialFailed`` code, and the dial
task's boundary turns whatever is left into a ``dial_fail`` while the link's
nursery (and with it the agent) keeps running.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio

from edge_agent import app
from edge_agent.dialer import DialFailed, dial_target
from edge_agent.policy import Policy
from protocol import messages
from protocol.budget import BufferBudget, Grant
from protocol.codes import DialFailCode


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (UnicodeError("encoding with 'idna' codec failed"), DialFailCode.DNS),
        (ValueError("embedded null byte"), DialFailCode.DNS),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), DialFailCode.DNS),
        (ConnectionRefusedError(111, "refused"), DialFailCode.REFUSED),
        (OSError(99, "weird"), DialFailCode.ERROR),
        (RuntimeError("resolver bug"), DialFailCode.ERROR),
        (KeyError("x"), DialFailCode.ERROR),
    ],
)
async def test_every_resolver_or_codec_error_is_a_dial_fail_code(
    monkeypatch: pytest.MonkeyPatch, exc: Exception, code: DialFailCode
) -> None:
    async def failing(*_args: Any, **_kw: Any) -> Any:
        raise exc

    for policy in (None, Policy.parse("127.0.0.0/8:*")):
        monkeypatch.setattr(trio, "open_tcp_stream", failing)
        monkeypatch.setattr(trio.socket, "getaddrinfo", failing)
        with pytest.raises(DialFailed) as caught:
            await dial_target("example.test:443", 1.0, policy)
        assert caught.value.code is code, (policy, caught.value.msg)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("addr", ["..:80", ".:80", "x..y:443", "a" * 64 + ":443", "h:²", ""])
async def test_bad_addresses_never_reach_the_resolver(
    monkeypatch: pytest.MonkeyPatch, addr: str
) -> None:
    called: list[object] = []

    async def resolver(*args: Any, **_kw: Any) -> Any:
        called.append(args)
        raise AssertionError("resolver reached")

    monkeypatch.setattr(trio, "open_tcp_stream", resolver)
    monkeypatch.setattr(trio.socket, "getaddrinfo", resolver)
    with pytest.raises(DialFailed) as caught:
        await dial_target(addr, 1.0, Policy.parse("0.0.0.0/0:*"))
    assert caught.value.code is DialFailCode.BAD_ADDRESS
    assert caught.value.msg.startswith("addr_")
    assert not called


class _Conn:
    """Records what the link sends; enough of a TunnelConnection for _fail."""

    def __init__(self) -> None:
        self.sent: list[messages.Message] = []
        self.streams: dict[int, Any] = {}  # no data stream was opened

    def send_message(self, msg: messages.Message) -> None:
        self.sent.append(msg)


class _Agent:
    metrics = None
    policy = Policy()
    authority = "broker:8443"
    active_streams = 0

    def streams_changed(self) -> None:
        pass

    budget = BufferBudget(limit=64 * 1024 * 1024)

    def reserve(self) -> Grant | None:
        return self.budget.open()


@pytest.mark.timeout(10)
async def test_an_unexpected_exception_in_a_dial_task_ends_only_that_dial(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug anywhere under the dial task (here: dial_target raising a
    TypeError, a UnicodeError) becomes one ``dial_fail`` ``error`` and one
    log line; the link's nursery keeps serving the next dial."""
    faults = [TypeError("bug"), UnicodeError("label empty or too long")]

    async def buggy(addr: str, timeout: float, policy: Policy | None = None) -> Any:
        if faults:
            raise faults.pop(0)
        raise DialFailed(DialFailCode.REFUSED, "connection refused")

    monkeypatch.setattr(app, "dial_target", buggy)
    async with trio.open_nursery() as nursery:
        link = app.BrokerLink(_Agent(), nursery)  # type: ignore[arg-type]
        conn = _Conn()
        link.conn = conn  # type: ignore[assignment]
        for dial_id in (1, 2, 3):
            link.on_message(messages.Dial(id=dial_id, addr="example.test:443", timeout_ms=1000))
            with trio.fail_after(5):
                while len(conn.sent) < dial_id:
                    await trio.sleep(0.01)
        assert not link.dials  # every task ended and cleaned up
    fails = [m for m in conn.sent if isinstance(m, messages.DialFail)]
    assert [(m.id, m.code) for m in fails] == [
        (1, DialFailCode.ERROR),
        (2, DialFailCode.ERROR),
        (3, DialFailCode.REFUSED),
    ]
    assert "TypeError: bug" in fails[0].msg
    unexpected = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert len(unexpected) == 2
