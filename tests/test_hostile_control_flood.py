"""One tenant cannot slow another (issue 11, item 3, row 4): control-message
budgets, through the real broker and agent processes.

- An authenticated agent that floods its control stream with any message
  type gets GOAWAY(ENHANCE_YOUR_CALM), a ``tether_bad_input_total`` sample
  ``flood_control_<type>`` and a log line; the broker keeps serving and goes
  back to idle.
- The fairness measurement: while an agent of cluster ``a`` floods every
  control message type, reconnecting after every GOAWAY, the dial latency of
  cluster ``b`` and ``/healthz`` stay where they were without the flood.
"""

from __future__ import annotations

import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from control_flood import CIDRS, KINDS, flood_block, flood_for, flood_until_closed
from hostile import (
    _LABEL,
    _SAMPLE,
    END_HEADERS,
    ENHANCE_YOUR_CALM,
    HEADERS,
    PREFACE,
    FrameReader,
    Meter,
    RawPeer,
    cpu_seconds,
    frame,
    header_block,
    health_ok,
    idle_cpu,
    metric,
    open_peer,
    request_headers,
    settings_frame,
    tls_to_agent_port,
    tunnel_roundtrip,
    wait_log,
)
from procs import BrokerHandle, Proc, connect_tunnel, serve_echo, status_of, wait_for

from protocol import session
from tether.tools.certs import init_pki
from tether.tools.launch import start_broker

pytestmark = [pytest.mark.e2e]


def flood_reasons(text: str) -> dict[str, float]:
    """``tether_bad_input_total{source="agent"}`` samples whose reason is a
    control-message budget."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) != "tether_bad_input_total":
            continue
        labels = dict(_LABEL.findall(match.group(2) or ""))
        reason = labels.get("reason", "")
        if labels.get("source") == "agent" and reason.startswith("flood_control_"):
            out[reason] = out.get(reason, 0.0) + float(match.group(3))
    return out


async def _quiet(broker: BrokerHandle) -> None:
    spent = await idle_cpu(broker.proc.pid, 1.0)
    assert spent < 0.3, f"broker still burns {spent:.2f}s CPU per second after the flood"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", [*KINDS, "all"])
async def test_control_message_flood_gets_enhance_your_calm(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
    kind: str,
) -> None:
    """identifiers (4 KB, 200 CIDRs, two sets in turn), unsolicited
    dial_fail, drain, and types an agent may not send (cancel, unknown):
    each flood ends in GOAWAY(ENHANCE_YOUR_CALM) within seconds."""
    broker = broker_factory(
        "--proxy-strategies=destHost", "--agent-allowed-identifiers=agent-1:ipv4=127.0.0.1"
    )
    agent_factory(broker, "--agent-identifiers=ipv4=127.0.0.1")
    await broker.ready(agents=1)
    echo = await serve_echo(nursery)
    kinds = KINDS if kind == "all" else (kind,)
    peer = await open_peer(broker, agent_id="agent-2")
    async with Meter(broker.proc.pid) as meter:
        code = await flood_until_closed(peer, flood_block(kinds), timeout=10)
    await peer.aclose()
    print(meter.report(f"{kind} flood"))
    assert code == ENHANCE_YOUR_CALM, f"no GOAWAY(ENHANCE_YOUR_CALM) after {meter.wall:.1f}s"
    assert meter.wall < 5, meter.report("time to GOAWAY")
    with trio.fail_after(5):
        while not (reasons := flood_reasons(await broker.metrics())):
            await trio.sleep(0.05)
    if kind != "all":
        # 200 CIDRs are over the entry cap: the first message ends it.
        allowed = {f"flood_control_{kind}", f"flood_control_{kind}_size"}
        allowed |= {"flood_control_identifiers_entries"} if kind == "identifiers" else set()
        assert set(reasons) <= allowed, reasons
    assert await wait_log(broker, "exceeded its control_"), broker.proc.log()[-2000:]
    assert "protocol violation" in broker.proc.log()
    await _quiet(broker)
    await tunnel_roundtrip(broker, echo)
    await health_ok(broker)
    assert "Traceback" not in broker.proc.log()


@pytest.mark.timeout(60)
async def test_identifiers_header_over_the_entry_cap_is_refused(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    """The same 200-CIDR set in the connect header (parsed once per
    connection, so once per reconnect): 403 ``bad_identifiers`` before any
    parsing, a log line, a metric; the broker keeps serving."""
    broker = broker_factory(
        "--proxy-strategies=destHost", "--agent-allowed-identifiers=agent-1:ipv4=127.0.0.1"
    )
    agent_factory(broker, "--agent-identifiers=ipv4=127.0.0.1")
    await broker.ready(agents=1)
    echo = await serve_echo(nursery)
    with trio.fail_after(10):
        peer = RawPeer(await tls_to_agent_port(broker, "agent-2"))
        await peer.send(PREFACE + settings_frame({}))
        headers = request_headers(
            session.CONTROL_PATH,
            [("tether-agent-id", "agent-2"), ("tether-agent-identifiers", CIDRS)],
        )
        await peer.send(frame(HEADERS, END_HEADERS, 1, header_block(headers)))
        reader, reply = FrameReader(), None  # the 403's body is not a control message
        while reply is None and (data := await peer.stream.receive_some(1 << 16)):
            replies = [f for f in reader.feed(bytes(data)) if f.kind == HEADERS and f.sid == 1]
            reply = replies[0] if replies else None
    await peer.aclose()
    assert reply is not None and reply.status == "403", reply
    assert await wait_log(broker, "more than 64 identifiers"), broker.proc.log()[-2000:]
    text = await broker.metrics()
    assert metric(text, "tether_agent_connections_rejected_total", reason="bad_identifiers") >= 1, (
        text
    )
    await tunnel_roundtrip(broker, echo)
    await health_ok(broker)


# ------------------------------------------------------- reconnect loop


async def _reconnect_for(broker: BrokerHandle, seconds: float, flood: bool) -> tuple[int, float]:
    """Connections made in ``seconds`` by one hostile agent that reconnects
    at once, flooding each connection (or just opening it), and the broker
    CPU seconds they cost."""
    cpu0 = cpu_seconds(broker.proc.pid)
    if flood:
        stats = await flood_for(broker, "agent-2", seconds)
        # each attempt counts: those closed at accept (flood penalty) cost least
        count = stats["connections"] + stats["refused"]
    else:
        count = 0
        with trio.move_on_after(seconds):
            while True:  # from another address: the flooder's is penalized
                peer = await open_peer(broker, agent_id="agent-3", source="127.0.0.3")
                count += 1
                await peer.aclose()
    await trio.sleep(0.5)  # the last connection's teardown
    return count, cpu_seconds(broker.proc.pid) - cpu0


@pytest.mark.timeout(90)
async def test_a_reconnecting_flooder_costs_what_reconnecting_costs(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    """An agent that floods every control message type and reconnects after
    every GOAWAY costs the broker no more than any agent reconnecting in a
    loop (TLS handshake, control stream, registration): the budgets let only
    a few messages through per connection, and after three floods its
    address is refused at accept, which costs next to nothing (see
    test_an_address_that_keeps_flooding_is_refused_at_accept)."""
    broker = broker_factory(
        "--proxy-strategies=destHost", "--agent-allowed-identifiers=agent-1:ipv4=127.0.0.1"
    )
    agent_factory(broker, "--agent-identifiers=ipv4=127.0.0.1")
    await broker.ready(agents=1)
    echo = await serve_echo(nursery)
    totals = {True: [0, 0.0], False: [0, 0.0]}
    for flood in (False, True, False, True):  # interleaved against load drift
        count, cpu = await _reconnect_for(broker, 3.0, flood)
        totals[flood][0] += count
        totals[flood][1] += cpu
    per_conn = {k: v[1] / max(v[0], 1) for k, v in totals.items()}
    summary = (
        f"plain reconnects: {totals[False][0]}, {per_conn[False] * 1000:.2f} ms broker CPU each; "
        f"flooding reconnects: {totals[True][0]}, {per_conn[True] * 1000:.2f} ms each"
    )
    print(summary)
    assert totals[True][0] >= 4, summary  # the flooder kept trying
    # Without budgets one connection flooded for the whole 6 s at a full core.
    assert per_conn[True] <= 1.5 * per_conn[False] + 0.003, summary
    await _quiet(broker)
    await tunnel_roundtrip(broker, echo)


@pytest.mark.timeout(90)
async def test_an_address_that_keeps_flooding_is_refused_at_accept(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    """Three floods from one address within a minute are forgiven; from the
    fourth on, that address's new connections are closed at accept, before
    any TLS, for 1 s, then 2 s, ... (protocol/flood.py FloodPenalties). The
    agent already connected from the same address keeps its tunnels."""
    broker = broker_factory(
        "--proxy-strategies=destHost", "--agent-allowed-identifiers=agent-1:ipv4=127.0.0.1"
    )
    agent_factory(broker, "--agent-identifiers=ipv4=127.0.0.1")
    await broker.ready(agents=1)
    echo = await serve_echo(nursery)
    block = flood_block(KINDS)
    for _ in range(4):
        peer = await open_peer(broker, agent_id="agent-2", identifiers="host=evil")
        code = await flood_until_closed(peer, block, timeout=10, linger=False)
        await peer.aclose()
        assert code == ENHANCE_YOUR_CALM
    assert await wait_log(broker, "keeps flooding; its new connections are refused for 1s")
    # Within the penalty: closed at accept, without a TLS handshake.
    refused_before = metric(
        await broker.metrics(), "tether_bad_input_total", reason="flood_penalty"
    )
    tcp = await trio.open_tcp_stream("127.0.0.1", broker.agent_port)
    with trio.fail_after(5):
        assert await tcp.receive_some(1) == b""
    await tcp.aclose()
    text = await broker.metrics()
    assert metric(text, "tether_bad_input_total", reason="flood_penalty") == refused_before + 1
    await tunnel_roundtrip(broker, echo)  # the agent connected from there is untouched
    await trio.sleep(1.2)  # the first penalty is over: the address may connect again
    peer = await open_peer(broker, agent_id="agent-2", identifiers="host=evil")
    await peer.aclose()
    await health_ok(broker)


# ------------------------------------------------------------ fairness

#: Phases alternate, no flood and flood, so that the load of the rest of
#: the machine (which drifts over seconds) falls on both alike; each has
#: DIALS sequential CONNECT dials (or what fits in PHASE_MAX_S: without
#: budgets a dial took seconds).
PHASES = ("baseline", "flood") * 8
DIALS = 30
PHASE_MAX_S = 10.0
#: Absolute slack on the p50 comparison. The box is shared (2 cores, other
#: busy sessions): a dial is a few ms of three processes taking turns, and
#: one preemption by an unrelated process moves a p50 by a fraction of a ms.
#: 1 ms is well below what the unbudgeted flood cost (+12 ms and more).
P50_FLOOR_S = 0.001
#: /healthz must answer within this, flood or not (issue 11, item 3), at
#: the 95th percentile of the 240 samples of each kind: the few moments when
#: other processes hold both cores of the shared box (several test suites run
#: at once; the max of the *baseline* was seen at 57 ms) must not decide the
#: test; a flood that stalls the event loop does, as it stalls most samples.
HEALTHZ_MAX_S = 0.050


async def _penalized(broker: BrokerHandle) -> float:
    """Connections closed at accept because their address keeps flooding."""
    return metric(await broker.metrics(), "tether_bad_input_total", reason="flood_penalty")


def healthz_limit(baseline: float) -> float:
    """The issue's 50 ms, unless the machine alone (no flood) comes close to
    it: with a load of 8 on 2 cores the baseline p99 was seen at 25-36 ms.
    Then the flood may add what the dial p50 may add (20 %) plus 5 ms, for
    the same reason as P50_FLOOR_S with fewer samples. Without the budgets
    a flood put /healthz at seconds, far beyond either."""
    return max(HEALTHZ_MAX_S, 1.2 * baseline + 0.005)


async def _dial(broker: BrokerHandle, target: str) -> float:
    started = time.perf_counter()
    tunnel = await connect_tunnel(broker, target, via="uds")
    took = time.perf_counter() - started
    try:
        assert tunnel.status == 200, (tunnel.status, tunnel.body)
        await tunnel.send_all(b"x")
        assert await tunnel.receive_some(1) == b"x"
    finally:
        await tunnel.aclose()
    return took


def _pct(values: list[float], pct: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


async def _healthz(broker: BrokerHandle) -> float:
    started = time.perf_counter()
    assert await status_of(broker.health_port, "/healthz") == 200
    return time.perf_counter() - started


async def _measure(broker: BrokerHandle, target: str) -> tuple[list[float], list[float]]:
    dials: list[float] = []
    health: list[float] = []
    deadline = time.monotonic() + PHASE_MAX_S
    for _ in range(DIALS):
        if time.monotonic() > deadline:
            break
        dials.append(await _dial(broker, target))
        health.append(await _healthz(broker))
    return dials, health


def _flooder(tmp: Path, broker: BrokerHandle, pki_dir: Path) -> Proc:
    """The hostile agent of cluster a, in its own process, niced: on a real
    deployment the attacker's CPU is not the broker's; on this shared box
    it would be, and the measurement is of the broker's fairness."""
    script = Path(__file__).with_name("control_flood.py")
    argv = ["nice", "-n", "19", sys.executable, str(script)]
    argv += [str(broker.agent_port), str(pki_dir), "agent-1"]
    return Proc("flooder", argv, tmp / f"flooder-{time.monotonic_ns()}.log")


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_flooding_tenant_does_not_slow_another(
    tmp_path: Path,
    agent_factory: Callable[..., Proc],
    procs_started: list[Proc],
    nursery: trio.Nursery,
) -> None:
    pki_a = init_pki(tmp_path / "a", cluster="a", agents=("agent-1",))
    pki_b = init_pki(tmp_path / "b", cluster="b", agents=("agent-1",))
    config = tmp_path / "clusters.toml"
    config.write_text(
        f"""
[[clusters]]
name = "a"
agent_ca = "{pki_a.ca_cert}"
frontend_uds = "{tmp_path / "a.sock"}"

[[clusters]]
name = "b"
agent_ca = "{pki_b.ca_cert}"
frontend_uds = "{tmp_path / "b.sock"}"
"""
    )
    broker = start_broker(tmp_path, pki_a, f"--config={config}", "--server-port=0")
    procs_started.append(broker.proc)
    await broker.up()
    agent_factory(broker, pki=pki_b)
    await broker.ready(agents=1)
    broker.uds = str(tmp_path / "b.sock")
    echo = await serve_echo(nursery)
    target = f"127.0.0.1:{echo}"
    for _ in range(20):  # warm up (imports, first connections)
        await _dial(broker, target)

    flooder = _flooder(tmp_path, broker, tmp_path / "a")
    procs_started.append(flooder)

    async def flooder_ready() -> bool:
        return "control_flood ready" in flooder.log()

    await wait_for(flooder_ready, 20, "flooder ready")
    results: dict[str, list[tuple[list[float], list[float]]]] = {"baseline": [], "flood": []}
    cpu = {"baseline": 0.0, "flood": 0.0}  # the broker's CPU seconds, and wall seconds
    wall = {"baseline": 0.0, "flood": 0.0}
    for phase in PHASES:
        if phase == "flood":
            connected = broker.proc.log().count("cluster=a")
            penalized = await _penalized(broker)
            flooder.signal(signal.SIGUSR1)

            async def flooding(before: int = connected, refused: float = penalized) -> bool:
                # at it: connected again, or refused at accept for flooding before
                return (
                    broker.proc.log().count("cluster=a") > before
                    or await _penalized(broker) > refused
                )

            await wait_for(flooding, 20, "flooder at work")
        cpu0, wall0 = cpu_seconds(broker.proc.pid), time.monotonic()
        results[phase].append(await _measure(broker, target))
        cpu[phase] += cpu_seconds(broker.proc.pid) - cpu0
        wall[phase] += time.monotonic() - wall0
        if phase == "flood":
            flooder.signal(signal.SIGUSR2)
        await trio.sleep(0.3)  # the flood connection goes; the broker settles
    flooder.signal(signal.SIGTERM)

    async def flooder_done() -> bool:
        return "control_flood connections=" in flooder.log()

    await wait_for(flooder_done, 10, "flooder counts")
    floods = flooder.log().strip().splitlines()[-1]

    def pooled(phase: str, which: int) -> list[float]:
        return [x for run in results[phase] for x in run[which]]

    base_p50 = statistics.median(pooled("baseline", 0))
    flood_p50 = statistics.median(pooled("flood", 0))
    per_phase = {
        phase: [round(statistics.median(run[0]) * 1000, 2) for run in runs]
        for phase, runs in results.items()
    }
    health_max = {phase: max(pooled(phase, 1)) for phase in results}
    health_p99 = {phase: _pct(pooled(phase, 1), 99) for phase in results}
    health_p95 = {phase: _pct(pooled(phase, 1), 95) for phase in results}
    summary = (
        f"dial p50 baseline {base_p50 * 1000:.2f} ms, flood {flood_p50 * 1000:.2f} ms "
        f"(per phase {per_phase}); healthz max baseline {health_max['baseline'] * 1000:.1f} ms, "
        f"flood {health_max['flood'] * 1000:.1f} ms; healthz p99 baseline "
        f"{health_p99['baseline'] * 1000:.1f} ms, flood {health_p99['flood'] * 1000:.1f} ms; "
        f"healthz p95 baseline {health_p95['baseline'] * 1000:.1f} ms, "
        f"flood {health_p95['flood'] * 1000:.1f} ms; "
        f"broker cpu per dial baseline {cpu['baseline'] / len(pooled('baseline', 0)) * 1000:.2f} ms, "
        f"flood {cpu['flood'] / len(pooled('flood', 0)) * 1000:.2f} ms "
        f"(share of a core {cpu['baseline'] / wall['baseline']:.2f}, "
        f"{cpu['flood'] / wall['flood']:.2f}); flooder: {floods}"
    )
    print(summary)
    calm = int(floods.split("calm=")[1].split()[0])
    refused = int(floods.split("refused=")[1].split()[0])
    # Its first floods ended in GOAWAY(ENHANCE_YOUR_CALM); after that its
    # address was refused at accept for longer and longer (FloodPenalties).
    assert calm >= 4 and refused > 0, floods
    assert flood_p50 <= 1.2 * base_p50 + P50_FLOOR_S, summary
    assert health_p95["flood"] < healthz_limit(health_p95["baseline"]), summary
    await health_ok(broker)
