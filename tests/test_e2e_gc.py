"""--gc-full-interval (tether/netio/gc_tenure.py) in a real broker: on by
default, its collector pauses reach /metrics while dials run through it; 0
leaves CPython's collector alone; a bad value is a one-line start-up error."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable

import pytest
import trio
from hostile import metric, tunnel_roundtrip
from procs import BrokerHandle, Proc, serve_echo, wait_for
from test_config_layering import broker_creds

from broker import config as broker_config
from tether.tools.certs import PkiPaths
from tether.tools.launch import BIN

pytestmark = [pytest.mark.e2e]


async def some_dials(broker: BrokerHandle, port: int, count: int = 30) -> None:
    for _ in range(count):
        await tunnel_roundtrip(broker, port, size=1000)


@pytest.mark.timeout(60)
async def test_the_broker_tenures_and_counts_its_collector_pauses(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    broker = broker_factory()
    agent_factory(broker)
    await broker.ready(agents=1)
    port = await serve_echo(nursery)

    async def paused() -> bool:
        await some_dials(broker, port)
        text = await broker.metrics()
        return metric(text, "tether_gc_pause_seconds_count", generation="0") > 0

    await wait_for(paused, 30, "collector pauses in /metrics")
    assert re.search(r"^tether_gc_tenured_objects \S+$", await broker.metrics(), re.MULTILINE)


@pytest.mark.timeout(60)
async def test_zero_leaves_the_collector_alone(
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    broker = broker_factory("--gc-full-interval=0")
    agent_factory(broker)
    await broker.ready(agents=1)
    port = await serve_echo(nursery)
    await some_dials(broker, port, 100)
    text = await broker.metrics()
    assert not re.search(r"^tether_gc_pause_seconds_count", text, re.MULTILINE)
    assert re.search(r"^tether_gc_tenured_objects 0\.0$", text, re.MULTILINE)


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_a_bad_interval_is_a_one_line_error(
    value: str, pki: PkiPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        broker_config.from_args([*broker_creds(pki), f"--gc-full-interval={value}"], {})
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--gc-full-interval must be 0 (off) or more" in err, err
    assert len(err.strip().splitlines()) <= 2, err


def test_the_flag_is_in_the_help() -> None:
    out = subprocess.run(
        [str(BIN / "tether-broker"), "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    assert "--gc-full-interval" in out
