"""Shared fixtures: certificates, and real broker/agent processes that are
always stopped at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from procs import BrokerHandle, Proc, start_agent, start_broker

from tether.tools.certs import PkiPaths, init_pki

# The CI machine is shared and two cores run the suite beside other work: a
# property test's per-example time says nothing about its correctness, so no
# per-example deadline (a hung example still ends at the test's timeout).
settings.register_profile("shared-machine", deadline=None)
settings.load_profile("shared-machine")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("pki"), agents=("agent-1", "agent-2", "agent-3"))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the test item, for fixtures' teardown."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


#: Lines of each process's log printed when a test that started it fails.
FAILURE_LOG_LINES = 40


@pytest.fixture
def procs_started(request: pytest.FixtureRequest) -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop(timeout=5)
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        # CI keeps only the test's output: the processes' own account of
        # what went wrong goes with it (pytest shows it under the failure).
        for proc in started:
            print(f"--- {proc.name} (pid {proc.pid}), last lines of {proc.log_path.name}:")
            print("    " + proc.tail(FAILURE_LOG_LINES))


@pytest.fixture
def broker_factory(
    tmp_path: Path, pki: PkiPaths, procs_started: list[Proc]
) -> Callable[..., BrokerHandle]:
    def make(*extra: str, mode: str = "http-connect", tcp: bool = True) -> BrokerHandle:
        handle = start_broker(tmp_path, pki, *extra, mode=mode, tcp=tcp)
        procs_started.append(handle.proc)
        return handle

    return make


@pytest.fixture
def agent_factory(tmp_path: Path, procs_started: list[Proc]) -> Callable[..., Proc]:
    def make(broker: BrokerHandle, *extra: str, agent_id: str = "agent-1", **kw: Any) -> Proc:
        proc = start_agent(tmp_path, broker, *extra, agent_id=agent_id, **kw)
        procs_started.append(proc)
        return proc

    return make


@pytest.fixture
async def tunnel_env(
    broker_factory: Callable[..., BrokerHandle], agent_factory: Callable[..., Proc]
) -> tuple[BrokerHandle, Proc]:
    """A broker with one connected agent, both ready."""
    broker = broker_factory()
    agent = agent_factory(broker)
    await broker.ready(agents=1)
    return broker, agent
