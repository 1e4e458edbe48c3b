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

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from control_flood import KINDS, flood_block, flood_until_closed
from hostile import (
    ENHANCE_YOUR_CALM,
    Meter,
    _LABEL,
    _SAMPLE,
    health_ok,
    idle_cpu,
    open_peer,
    tunnel_roundtrip,
    wait_log,
)
from procs import BrokerHandle, Proc, connect_tunnel, serve_echo, status_of, wait_for

from tether.certs import init_pki
from tether.launch import start_broker

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
    broker = broker_factory("--proxy-strategies=destHost")
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


# ------------------------------------------------------------ fairness

#: Sequential CONNECT dials per phase (or as many as fit in PHASE_MAX_S:
#: without budgets a dial took seconds), and phases (baseline, flood, ...).
DIALS = 200
PHASE_MAX_S = 20.0
PHASES = ("baseline", "flood", "baseline", "flood")
#: Absolute slack on the p50 comparison. The box is shared (2 cores, other
#: busy sessions): a dial is a few ms of three processes taking turns, and
#: one preemption by an unrelated process moves a p50 by a fraction of a ms.
#: 1 ms is well below what the unbudgeted flood cost (+12 ms and more).
P50_FLOOR_S = 0.001
#: /healthz must answer within this, flood or not (issue 11, item 3).
HEALTHZ_MAX_S = 0.050


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


async def _healthz(broker: BrokerHandle) -> float:
    started = time.perf_counter()
    assert await status_of(broker.health_port, "/healthz") == 200
    return time.perf_counter() - started


async def _measure(broker: BrokerHandle, target: str) -> tuple[list[float], list[float]]:
    dials: list[float] = []
    health: list[float] = []
    deadline = time.monotonic() + PHASE_MAX_S
    for i in range(DIALS):
        if time.monotonic() > deadline:
            break
        dials.append(await _dial(broker, target))
        if i % 5 == 0:
            health.append(await _healthz(broker))
    return dials, health


def _flooder(tmp: Path, broker: BrokerHandle, pki_dir: Path) -> Proc:
    """The hostile agent of cluster a, in its own process, niced: on a real
    deployment the attacker's CPU is not the broker's; on this shared box
    it would be, and the measurement is of the broker's fairness."""
    script = Path(__file__).with_name("control_flood.py")
    argv = ["nice", "-n", "19", sys.executable, str(script)]
    argv += [str(broker.agent_port), str(pki_dir), "agent-1", "600"]
    return Proc("flooder", argv, tmp / f"flooder-{time.monotonic_ns()}.log")


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_flooding_tenant_does_not_slow_another(
    tmp_path: Path, agent_factory: Callable[..., Proc], procs_started: list[Proc], nursery: trio.Nursery
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

    results: dict[str, list[tuple[list[float], list[float]]]] = {"baseline": [], "flood": []}
    floods: list[str] = []
    for phase in PHASES:
        flooder = None
        if phase == "flood":
            connected = broker.proc.log().count("cluster=a")
            flooder = _flooder(tmp_path, broker, tmp_path / "a")
            procs_started.append(flooder)

            async def flooding(before: int = connected) -> bool:
                return broker.proc.log().count("cluster=a") > before

            await wait_for(flooding, 20, "flooder connected")
            await trio.sleep(0.5)  # the flood is under way
        results[phase].append(await _measure(broker, target))
        if flooder is not None:
            flooder.stop(timeout=10)
            floods.append(flooder.log().strip().splitlines()[-1] if flooder.log() else "")
            assert flooder.log(), "the flooder said nothing"
        await trio.sleep(1.0)  # let the broker settle between phases

    def pooled(phase: str, which: int) -> list[float]:
        return [x for run in results[phase] for x in run[which]]

    base_p50 = statistics.median(pooled("baseline", 0))
    flood_p50 = statistics.median(pooled("flood", 0))
    per_phase = {
        phase: [round(statistics.median(run[0]) * 1000, 2) for run in runs]
        for phase, runs in results.items()
    }
    health_max = {phase: max(pooled(phase, 1)) for phase in results}
    summary = (
        f"dial p50 baseline {base_p50 * 1000:.2f} ms, flood {flood_p50 * 1000:.2f} ms "
        f"(per phase {per_phase}); healthz max baseline {health_max['baseline'] * 1000:.1f} ms, "
        f"flood {health_max['flood'] * 1000:.1f} ms; flooder: {floods}"
    )
    print(summary)
    assert all("calm=" in f for f in floods), floods
    assert flood_p50 <= 1.2 * base_p50 + P50_FLOOR_S, summary
    assert health_max["flood"] < HEALTHZ_MAX_S, summary
    await health_ok(broker)
