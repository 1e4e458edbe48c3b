"""The typed control-stream handshake (protocol/handshake.py), in process."""

from __future__ import annotations

import time

import pytest

from protocol import handshake
from protocol.events import ControlRejected
from protocol.handshake import HandshakeError, Hello, Refusal, RefusalReason, Welcome
from protocol.session import Role, TunnelSession

pytestmark = [pytest.mark.timeout(5)]


def test_hello_round_trips_through_headers() -> None:
    hello = Hello(
        agent_id="edge-1",
        identifiers="host=n1&ipv4=10.0.0.5",
        cluster="edge-a",
        connected_servers=("b2", "b1"),
        token="s3cret",
    )
    headers = hello.to_headers()
    assert headers == {
        "tether-agent-id": "edge-1",
        "tether-agent-identifiers": "host=n1&ipv4=10.0.0.5",
        "tether-cluster": "edge-a",
        "tether-connected-servers": "b1,b2",
        "authorization": "Bearer s3cret",
    }
    back = Hello.from_headers(headers)
    assert back.agent_id == "edge-1" and back.cluster == "edge-a"
    assert set(back.connected_servers) == {"b1", "b2"} and back.token == "s3cret"
    assert back.path == handshake.CONTROL_PATH == "/tether.v1/connect"
    assert "s3cret" not in repr(back)


def test_a_minimal_hello_sends_only_what_it_has() -> None:
    headers = Hello(agent_id="a").to_headers()
    assert headers == {"tether-agent-id": "a", "tether-agent-identifiers": ""}
    back = Hello.from_headers(headers)
    assert back.cluster == "" and back.connected_servers == () and back.token is None


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "bad_agent_id"),
        ({"tether-agent-id": "-x"}, "bad_agent_id"),
        ({"tether-agent-id": "a", "tether-cluster": "b c"}, "bad_cluster"),
        ({"tether-agent-id": "a", "tether-agent-identifiers": "color=red"}, "bad_identifiers"),
    ],
)
def test_a_bad_hello_names_its_reason(headers: dict[str, str], reason: str) -> None:
    with pytest.raises(HandshakeError) as err:
        Hello.from_headers(headers)
    assert err.value.reason == reason
    assert str(err.value).startswith(f"{reason}: ")


@pytest.mark.parametrize(
    ("value", "token"),
    [("Bearer t", "t"), ("bearer  t ", "t"), ("Bearer ", None), ("Basic t", None), ("", None)],
)
def test_bearer_token(value: str, token: str | None) -> None:
    assert handshake.bearer_token({"authorization": value}) == token


def test_welcome_round_trips_and_defaults_for_old_brokers() -> None:
    welcome = Welcome("b-1", 3, frozenset({"busy"}))
    headers = welcome.to_headers()
    assert headers == {
        "tether-server-id": "b-1",
        "tether-server-count": "3",
        "tether-dial-fail-codes": "busy",
    }
    assert Welcome.from_headers(headers) == welcome
    assert Welcome.from_headers({"tether-server-id": "b"}) == Welcome("b", 1, frozenset())


@pytest.mark.parametrize("count", ["0", "1001", "x", "²", "-1", ""])
def test_a_bad_server_count_is_refused(count: str) -> None:
    with pytest.raises(HandshakeError) as err:
        Welcome.from_headers({"tether-server-id": "b", "tether-server-count": count})
    assert err.value.reason == "bad_server_count"
    # What agents have always done with it: one replica.
    lenient = Welcome.from_headers(
        {"tether-server-id": "b", "tether-server-count": count}, lenient=True
    )
    assert lenient == Welcome("b", 1)


def test_refusal_token_travels_in_a_header() -> None:
    refusal = Refusal(409, "identity_in_use", "identity_in_use: the live connection stays")
    assert refusal.to_headers() == {"tether-refusal": "identity_in_use"}
    token = Refusal.token_from_headers(refusal.to_headers())
    assert Refusal.reason_of(token) is RefusalReason.IDENTITY_IN_USE
    assert Refusal.reason_of("duplicate") is RefusalReason.DUPLICATE
    assert Refusal.reason_of("bad_token") is None
    # An older broker sends none; junk is no token.
    assert Refusal.token_from_headers({}) == ""
    assert Refusal.token_from_headers({"tether-refusal": "Not A Token"}) == ""
    with pytest.raises(HandshakeError):
        Refusal(403, "no spaces")


@pytest.mark.parametrize(
    ("sent", "read"), [({"tether-refusal": "duplicate"}, "duplicate"), ({}, "")]
)
def test_the_agent_session_reads_the_refusal_token(sent: dict[str, str], read: str) -> None:
    """The broker's token reaches the agent beside the body text; an older
    broker's rejection carries none."""
    agent = TunnelSession(Role.AGENT, clock=time.monotonic)
    broker = TunnelSession(Role.BROKER, clock=time.monotonic)
    agent.initiate()
    broker.initiate()
    agent.open_control(Hello(agent_id="a").to_headers(), "broker:8443")
    broker.receive_data(agent.data_to_send())
    broker.reject_control(409, "duplicate: already held", sent)
    evs = agent.receive_data(broker.data_to_send())
    assert [e for e in evs if isinstance(e, ControlRejected)] == [
        ControlRejected(409, read, "duplicate: already held")
    ]


@pytest.mark.parametrize("bad", ["ABC", "a b", "x" * 33, "é1", "a-b"])
def test_the_agent_instance_is_a_short_token(bad: str) -> None:
    """The instance id travels in its own header, a short lowercase token;
    an older agent sends none."""
    hello = Hello(agent_id="a", instance="0123abcd")
    assert hello.to_headers()["tether-agent-instance"] == "0123abcd"
    assert Hello.from_headers(hello.to_headers()).instance == "0123abcd"
    assert Hello.from_headers({"tether-agent-id": "a"}).instance == ""
    assert "tether-agent-instance" not in Hello(agent_id="a").to_headers()
    with pytest.raises(HandshakeError) as err:
        Hello.from_headers({"tether-agent-id": "a", "tether-agent-instance": bad})
    assert err.value.reason == "bad_instance"


@pytest.mark.parametrize(
    "headers",
    [
        {"tether-agent-hedge": "yes", "tether-agent-instance": "ab12"},
        {"tether-agent-hedge": "0", "tether-agent-instance": "ab12"},
        {"tether-agent-hedge": "1"},  # a hedge is bound to an instance
    ],
)
def test_the_hedge_marker_is_1_with_an_instance(headers: dict[str, str]) -> None:
    hello = Hello(agent_id="a", instance="ab12", hedge=True)
    assert hello.to_headers()["tether-agent-hedge"] == "1"
    assert Hello.from_headers(hello.to_headers()).hedge is True
    assert Hello.from_headers({"tether-agent-id": "a"}).hedge is False
    assert "tether-agent-hedge" not in Hello(agent_id="a", instance="ab12").to_headers()
    with pytest.raises(HandshakeError) as err:
        Hello.from_headers({"tether-agent-id": "a", **headers})
    assert err.value.reason == "bad_hedge"


def test_the_replaced_message_round_trips_and_older_agents_ignore_unknown_types() -> None:
    import msgpack

    from protocol import messages

    msg = messages.Replaced(instance="0123abcd", remote="10.0.0.9:4000")
    assert messages.decode(msgpack.unpackb(messages.encode(msg))) == msg
    assert messages.decode({"t": "replaced"}) == messages.Replaced()
    assert messages.decode({"t": "something_newer"}) is None
