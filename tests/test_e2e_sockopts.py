"""The agent's broker connection carries the TCP options it asks for, as the
kernel reports them (``ss``)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import pytest
from procs import BrokerHandle, Proc, wait_for

pytestmark = [pytest.mark.e2e]


def socket_lines(agent: Proc) -> str:
    ss = shutil.which("ss") or "/usr/bin/ss"
    out = subprocess.run(
        [ss, "-tinope", "state", "established"], capture_output=True, text=True, check=True
    ).stdout
    # ss prints each socket on two lines: the address line (with users:(...))
    # and the tcp_info line; keep both for the agent's process.
    lines = out.splitlines()
    keep = []
    for i, line in enumerate(lines):
        if f"pid={agent.pid}," in line:
            keep.append(line)
            if i + 1 < len(lines):
                keep.append(lines[i + 1])
    return "\n".join(keep)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cc", ["reno", "bbr"])
async def test_congestion_control_and_keepalive_on_the_tunnel(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    cc: str,
) -> None:
    broker = broker_factory()
    agent = agent_factory(broker, f"--tcp-congestion={cc}", "--keepalive-time=7")
    await broker.ready(agents=1)

    async def idle_with_keepalive() -> bool:
        # Once everything is acknowledged, the socket's timer is keepalive's.
        return "timer:(keepalive" in socket_lines(agent)

    await wait_for(idle_with_keepalive, 10, "the keepalive timer on an idle tunnel")
    info = socket_lines(agent)
    assert f" {cc} " in info, info
