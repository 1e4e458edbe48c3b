"""Mobility and hedged reconnect over an emulated link (issue 13 items 3
and 4): the broker in the link's cloud namespace, the agent and an echo
target in the edge namespace (benchmarks/chaos.py's Stack). The edge's
address changes under a running agent, or the link goes quiet; transfers
keep running meanwhile and every byte that comes back is checked."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from benchmarks.chaos import ChaosReport, Stack, _transfer
from benchmarks.linksim import LinkSim, check_available, list_namespaces
from benchmarks.linksim.sim import EDGE_ADDR, MOVED_EDGE_ADDR

pytestmark = [pytest.mark.e2e]

#: Keepalive alone would take 15 + 15 s to notice: every bound below is far under it.
SLOW_KEEPALIVE = ("--keepalive-time=15", "--keepalive-timeout=15")


async def first_working(stack: Stack, start: float, cap: float) -> float:
    """Seconds from ``start`` until one tunneled echo succeeds (a try every 0.2 s)."""
    rng = random.Random(3)
    with trio.fail_after(cap):
        while True:
            report = ChaosReport("probe")
            await _transfer(stack, rng, report, deadline=2.0)
            assert report.corrupted_bytes == 0
            if report.ok:
                return trio.current_time() - start
            await trio.sleep(0.2)


async def background_transfers(stack: Stack, report: ChaosReport, stop: trio.Event) -> None:
    rng = random.Random(5)
    while not stop.is_set():
        await _transfer(stack, rng, report, deadline=10.0)


async def run_scenario(
    tmp_path: Path, agent_args: Sequence[str], fault: str, cap: float
) -> tuple[list[float], ChaosReport, str]:
    check_available()
    report = ChaosReport("5g")
    took: list[float] = []
    with LinkSim("5g", seed=2, prefix="hedge") as link:
        stack = Stack(link, tmp_path, agent_args=[*SLOW_KEEPALIVE, *agent_args])
        try:
            with trio.fail_after(30):
                while not await stack.ready():
                    await trio.sleep(0.2)
            stop = trio.Event()
            async with trio.open_nursery() as n:
                for _ in range(3):
                    n.start_soon(background_transfers, stack, report, stop)
                for _ in range(2):
                    await trio.sleep(1.0)
                    if fault == "move":
                        await trio.to_thread.run_sync(link.move_edge)
                    else:
                        await trio.to_thread.run_sync(link.set_down, True)
                        await trio.sleep(6.0)
                        await trio.to_thread.run_sync(link.set_down, False)
                    start = trio.current_time()
                    took.append(await first_working(stack, start, cap))
                    await trio.sleep(1.0)
                stop.set()
            assert stack.agent.alive(), stack.agent.log()[-2000:]
            log = stack.agent.log()
        finally:
            stack.close()
    assert not [ns for ns in list_namespaces("hedge") if "hedge" in ns]
    print(f"\nfirst working request after {took} s; transfers: {report.summary()}")
    return took, report, log


@pytest.mark.timeout(180)
async def test_the_agent_follows_an_address_change_at_once(tmp_path: Path) -> None:
    """Old address removed, a new one (another subnet) added, the default
    route moved, twice (there and back): netlink tells the agent, which
    redials at once; a tunnel works again within seconds, not the 30 s
    keepalive would take, and no transfer ever returns a wrong byte."""
    took, report, log = await run_scenario(tmp_path, ["--hedge-after=0"], "move", cap=10)
    assert all(t < 5.0 for t in took), took
    assert re.search(r"network change \(address_gone\)", log), log[-2000:]
    assert f"local address {EDGE_ADDR} disappeared" in log
    assert f"local address {MOVED_EDGE_ADDR} disappeared" in log
    assert report.corrupted_bytes == 0
    assert report.ok > 0, report.failed


@pytest.mark.timeout(180)
async def test_polling_finds_an_address_change_without_netlink(tmp_path: Path) -> None:
    took, report, log = await run_scenario(
        tmp_path,
        ["--hedge-after=0", "--watch-network=poll", "--network-poll-interval=0.5"],
        "move",
        cap=10,
    )
    assert all(t < 5.0 for t in took), took
    assert "disappeared" in log
    assert report.corrupted_bytes == 0


@pytest.mark.timeout(180)
async def test_a_quiet_link_is_hedged_and_no_byte_is_corrupted(tmp_path: Path) -> None:
    """The link goes down for 6 s (keepalive would need 30 s): the agent
    probes after 1 s of silence, races fresh connections, and one is accepted
    within moments of the link's return; open transfers on the old
    connection finish intact or fail, never with wrong bytes."""
    took, report, log = await run_scenario(
        tmp_path, ["--hedge-after=1", "--watch-network=off"], "outage", cap=10
    )
    assert all(t < 3.0 for t in took), took
    assert len(re.findall(r"hedged reconnect to broker \S+ won", log)) >= 2, log[-3000:]
    assert report.corrupted_bytes == 0
    assert report.ok > 0, report.failed
