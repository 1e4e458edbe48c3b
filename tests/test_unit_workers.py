"""protocol/workers.py: the supervisor/worker messages, the host table and
the metrics merge (``tether-broker --workers N``)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import workers as wp

text = st.text(max_size=40)
small = st.integers(min_value=0, max_value=2**31 - 1)

messages = st.one_of(
    st.builds(wp.Hello, small, small, small),
    st.builds(wp.AgentUp, small, text, text, text, text),
    st.builds(wp.AgentDown, small, text, text),
    st.builds(wp.WorkerGone, small),
    st.builds(wp.Evict, text, text, text),
    st.builds(wp.Handover, text, text, st.binary(max_size=4096)),
)


@given(st.lists(messages, max_size=8), st.integers(min_value=1, max_value=64))
def test_round_trip_in_any_chunking(msgs: list[wp.Message], chunk: int) -> None:
    wire = b"".join(wp.encode(m) for m in msgs)
    decoder = wp.FrameDecoder()
    out: list[wp.Message] = []
    for i in range(0, len(wire), chunk):
        out += decoder.feed(wire[i : i + chunk])
    assert out == msgs
    assert decoder.pending == 0


def _frame(kind: int, body: bytes) -> bytes:
    return struct.pack(">IB", len(body) + 1, kind) + body


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (struct.pack(">I", wp.MAX_FRAME), "frame_size"),
        (struct.pack(">I", 0), "frame_size"),
        (_frame(99, b"{}"), "unknown_kind"),
        (_frame(4, b"\xff\xfe"), "bad_json"),
        (_frame(4, b"[1]"), "bad_json"),
        (_frame(4, b"{}"), "bad_field"),
        (_frame(4, b'{"worker":"0"}'), "bad_field"),
        (_frame(4, b'{"worker":true}'), "bad_field"),
        (_frame(4, b'{"worker":0,"extra":1}'), "bad_field"),
        (_frame(6, b'{"cluster":"c","frontend":"uds","data":"***"}'), "bad_field"),
        (_frame(5, b'{"cluster":1,"agent_id":"a","reason":"r"}'), "bad_field"),
    ],
)
def test_malformed_frames_raise_with_a_reason(wire: bytes, reason: str) -> None:
    with pytest.raises(wp.WorkerProtocolError) as info:
        wp.FrameDecoder().feed(wire)
    assert info.value.reason == reason


@given(st.binary(max_size=200))
def test_any_bytes_give_messages_or_a_protocol_error(data: bytes) -> None:
    try:
        wp.FrameDecoder().feed(data)
    except wp.WorkerProtocolError as exc:
        assert exc.reason in {"frame_size", "unknown_kind", "bad_json", "bad_field"}


def test_oversize_message_is_refused_at_encoding() -> None:
    with pytest.raises(ValueError):
        wp.encode(wp.Handover("c", "uds", b"x" * wp.MAX_FRAME))


# ------------------------------------------------------------ host table


def test_table_broadcasts_and_forgets_a_gone_worker() -> None:
    t = wp.HostTable()
    up = wp.AgentUp(0, "c", "a1", "ipv4=10.0.0.1", "cred-1")
    assert t.apply_up(up) == [(-1, up)]
    assert t.owner("c", "a1") == 0 and t.count(0) == 1
    assert t.snapshot() == [up]
    assert t.apply_gone(0) == [(-1, wp.WorkerGone(0))]
    assert len(t) == 0 and t.snapshot() == []


def test_same_credential_on_another_worker_replaces_the_old_one() -> None:
    t = wp.HostTable()
    t.apply_up(wp.AgentUp(0, "c", "a1", "", "cred-1"))
    again = wp.AgentUp(1, "c", "a1", "", "cred-1")
    assert t.apply_up(again) == [(0, wp.Evict("c", "a1", "replaced")), (-1, again)]
    assert t.owner("c", "a1") == 1
    # The old worker's late AgentDown does not remove the newcomer.
    assert t.apply_down(wp.AgentDown(0, "c", "a1")) == []
    assert t.owner("c", "a1") == 1


@pytest.mark.parametrize("credential", ["cred-2", ""])
def test_other_credential_loses_to_the_live_connection(credential: str) -> None:
    t = wp.HostTable()
    t.apply_up(wp.AgentUp(0, "c", "a1", "", "cred-1"))
    out = t.apply_up(wp.AgentUp(1, "c", "a1", "", credential))
    assert out == [(1, wp.Evict("c", "a1", "identity_in_use"))]
    assert t.owner("c", "a1") == 0


def test_same_id_in_two_clusters_is_two_agents() -> None:
    t = wp.HostTable()
    t.apply_up(wp.AgentUp(0, "a", "x", "", "k"))
    t.apply_up(wp.AgentUp(1, "b", "x", "", "k"))
    assert (t.owner("a", "x"), t.owner("b", "x")) == (0, 1)


@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.integers(0, 2),
            st.sampled_from(["a1", "a2"]),
            st.sampled_from(["k1", "k2"]),
        ),
        max_size=30,
    )
)
def test_every_agent_has_exactly_one_owner(ops: list[tuple[bool, int, str, str]]) -> None:
    """The table answers what a worker that applied every broadcast holds."""
    t = wp.HostTable()
    view: dict[tuple[str, str], int] = {}
    for up, worker, agent, cred in ops:
        out = (
            t.apply_up(wp.AgentUp(worker, "c", agent, "", cred))
            if up
            else t.apply_down(wp.AgentDown(worker, "c", agent))
        )
        for target, msg in out:
            if target != -1:
                continue
            if isinstance(msg, wp.AgentUp):
                view[(msg.cluster, msg.agent_id)] = msg.worker
            elif isinstance(msg, wp.AgentDown):
                view.pop((msg.cluster, msg.agent_id), None)
    assert view == {(m.cluster, m.agent_id): m.worker for m in t.snapshot()}  # type: ignore[union-attr]


# --------------------------------------------------------------- metrics


def test_merge_metrics_labels_each_worker_and_keeps_help_once() -> None:
    w0 = b'# HELP x_total X\n# TYPE x_total counter\nx_total 1.0\ny{a="b"} 2\n'
    w1 = b"# HELP x_total X\n# TYPE x_total counter\nx_total 3.0\n"
    merged = wp.merge_metrics({"0": w0, "1": w1}).decode().splitlines()
    assert merged.count("# HELP x_total X") == 1
    assert 'x_total{worker="0"} 1.0' in merged
    assert 'x_total{worker="1"} 3.0' in merged
    assert 'y{worker="0",a="b"} 2' in merged
    assert merged.index('x_total{worker="1"} 3.0') < merged.index('y{worker="0",a="b"} 2')


def test_merged_agents_name_their_worker() -> None:
    rows = wp.merged_agents(
        [(1, [{"cluster": "c", "agent_id": "b"}, "junk"]), (0, [{"cluster": "c", "agent_id": "a"}])]
    )
    assert rows == [
        {"cluster": "c", "agent_id": "a", "worker": 0},
        {"cluster": "c", "agent_id": "b", "worker": 1},
    ]


# ------------------------------------------------ the worker's tier rule

hosts = st.sampled_from(["10.0.0.1", "10.0.0.2", "10.1.2.3", "db", "web"])
idents = st.builds(
    lambda parts: "&".join(parts),
    st.lists(
        st.sampled_from(
            [
                "ipv4=10.0.0.1",
                "cidr=10.0.0.0/24",
                "cidr=10.0.0.0/8",
                "host=db",
                "default-route=true",
            ]
        ),
        max_size=3,
        unique=True,
    ),
)


@given(
    st.lists(idents, min_size=1, max_size=6),
    hosts,
    st.sampled_from([("destHost", "defaultRoute", "default"), ("destHost",), ("default",)]),
)
def test_tier_names_exactly_the_eligible_agents(
    claims: list[str], host: str, strategies: tuple[str, ...]
) -> None:
    """A worker keeps a dial when its own agent is in the tier the host's
    choice came from: ``tier`` must rank the registry's eligible set first."""
    from broker.routing_index import ClusterIndex
    from broker.workers import RemoteAgent, tier
    from protocol.identifiers import AgentIdentifiers

    index: ClusterIndex[RemoteAgent] = ClusterIndex()
    agents = [
        RemoteAgent(i % 2, "c", f"a{i}", AgentIdentifiers.parse(c)) for i, c in enumerate(claims)
    ]
    for a in agents:
        index.add(a)
    eligible = index.eligible(strategies, host)
    ranks = {id(a): tier(a.identifiers, host, strategies) for a in agents}
    if eligible:
        best = min(ranks.values())
        assert {id(a) for a in eligible} == {id(a) for a in agents if ranks[id(a)] == best}
    else:
        assert all(r[0] == len(strategies) for r in ranks.values())


def test_router_keeps_the_newcomer_when_the_old_owner_reports_down() -> None:
    """Worker 0's agent reconnected to worker 1; worker 0's late AgentDown
    (after the supervisor's Evict) must not remove worker 1's entry."""
    from broker.workers import HostRouter

    router = HostRouter(("default",))
    router.up(wp.AgentUp(0, "c", "a1", ""))
    router.up(wp.AgentUp(1, "c", "a1", ""))
    router.down("c", "a1", 0)
    chosen = router.choose("c", "10.0.0.1")
    assert chosen is not None and chosen.worker == 1
    router.gone(1)
    assert router.choose("c", "10.0.0.1") is None and len(router) == 0
