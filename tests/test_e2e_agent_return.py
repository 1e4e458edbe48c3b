"""``--agent-return-wait`` through real processes: a dial for an agent that
just left (killed, or a clean restart) waits for it and succeeds once it
is back; a dial no departed agent would have taken fails at once; one for
an agent that stays away fails after the wait with 503, counted. The same
with ``--workers=2``, where the agent may come back on the other worker.
The rules in process: tests/test_unit_departures.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
from hostile import metric
from procs import BrokerHandle, Proc, wait_for
from test_e2e_routing import serve_whoami, whoami

pytestmark = [pytest.mark.e2e]

WAIT = 5.0
NODE = "127.0.0.61"
STRANGER = "127.0.0.62"


async def _gone(broker: BrokerHandle, times: int) -> None:
    async def check() -> bool:
        return broker.proc.log().count("agent disconnected:") >= times

    await wait_for(check, 20, f"the broker to see the agent leave ({times})")


async def _dial_timed(broker: BrokerHandle, target: str) -> tuple[int, bytes, float]:
    started = trio.current_time()
    status, body = await whoami(broker, target)
    return status, body, trio.current_time() - started


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_dial_waits_for_a_departed_agent_and_only_for_one(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
    workers: str,
) -> None:
    broker = broker_factory(
        f"--workers={workers}",
        "--proxy-strategies=destHost",
        f"--agent-allowed-identifiers=agent-1:ipv4={NODE}",
        f"--agent-return-wait={WAIT}",
    )

    nodes: list[Proc] = []

    def start_node() -> Proc:
        nodes.append(agent_factory(broker, f"--agent-identifiers=ipv4={NODE}"))
        return nodes[-1]

    node = start_node()
    await broker.ready(agents=1)
    port = await serve_whoami(nursery, NODE)
    stranger_port = await serve_whoami(nursery, STRANGER)
    assert await whoami(broker, f"{NODE}:{port}") == (200, NODE.encode())

    # Killed (no goodbye): a dial made while it is gone waits for it.
    node.kill9()
    await _gone(broker, 1)
    results: list[tuple[int, bytes, float]] = []

    async def dial() -> None:
        results.append(await _dial_timed(broker, f"{NODE}:{port}"))

    async with trio.open_nursery() as n:
        n.start_soon(dial)
        await trio.sleep(1.0)
        assert not results  # held, not failed
        start_node()
    status, body, took = results[0]
    assert (status, body) == (200, NODE.encode())
    assert 1.0 <= took < WAIT, took

    # A host no departed agent would have taken: 503 at once.
    status, _body, took = await _dial_timed(broker, f"{STRANGER}:{stranger_port}")
    assert status == 503 and took < WAIT / 2, took

    # A clean stop that stays away: held for the wait, then 503.
    await trio.to_thread.run_sync(nodes[-1].stop)
    await _gone(broker, 2)
    status, _body, took = await _dial_timed(broker, f"{NODE}:{port}")
    assert status == 503 and WAIT - 0.5 <= took < WAIT + 3, took

    async def counted() -> bool:  # a supervisor scrapes its workers each second
        text = await broker.metrics()
        return (
            metric(text, "tether_dials_held_total", outcome="returned") == 1
            and metric(text, "tether_dials_held_total", outcome="not_back") == 1
        )

    await wait_for(counted, 10, "one dial held until its agent returned, one not back")
    assert broker.proc.alive()
